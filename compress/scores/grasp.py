"""GraSP (Wang et al. 2020): keep the weights whose removal least reduces the gradient flow.

The reference scores ``S = -theta * (H g)`` and removes the highest; this module returns
``theta * (H g)`` so that, like every registered score, higher means keep. ``g`` is computed with
the logits divided by a temperature of 200, as in the reference code.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from compress.scores import SCORES, parameters_by_name, require_batches
from compress.scores.snip import loss_gradients

TEMPERATURE = 200.0


def hessian_gradient_product(model, batches, params, temperature: float = TEMPERATURE,
                             mode: str = "eval") -> list[torch.Tensor]:
    """H g for the loss on ``batches`` with logits / ``temperature``, where g is that loss's gradient, the
    model in ``mode`` (see ``loss_gradients``)."""
    weights = parameters_by_name(model, params)
    grad = loss_gradients(model, batches, params, temperature, mode)  # leaves the model in ``mode``
    product = [torch.zeros_like(w) for w in weights]
    for inputs, labels in batches:
        loss = F.cross_entropy(model(inputs) / temperature, labels)
        first = torch.autograd.grad(loss, weights, create_graph=True, allow_unused=True)
        pairs = [(f, g) for f, g in zip(first, grad) if f is not None]
        inner = sum((f * g).sum() for f, g in pairs)
        hvp = torch.autograd.grad(inner, weights, allow_unused=True)
        for acc, h in zip(product, hvp):
            if h is not None:
                acc.add_(h)
    return product


@SCORES.register("grasp")
def grasp_score(model, batches, params, context):
    """theta * (H g): the negated GraSP score, so the top-k is the set the reference keeps."""
    require_batches("grasp", batches)
    weights = parameters_by_name(model, params)
    hg = hessian_gradient_product(model, batches, params, mode=context.mode)
    return {p: w.detach() * h for p, w, h in zip(params, weights, hg)}
