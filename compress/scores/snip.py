"""SNIP (Lee et al. 2019): connection sensitivity |theta * dL/dtheta|, normalised by its global sum."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from compress.scores import SCORES, parameters_by_name, require_batches


def loss_gradients(model, batches, params, temperature: float = 1.0, mode: str = "eval") -> list[torch.Tensor]:
    """dL/dtheta of the summed mean cross-entropy of logits / ``temperature`` over ``batches``, the model in
    ``mode`` (eval by default, as the references: BatchNorm on its running statistics, no dropout)."""
    weights = parameters_by_name(model, params)
    model.train(mode == "train")
    total = [torch.zeros_like(w) for w in weights]
    for inputs, labels in batches:
        loss = F.cross_entropy(model(inputs) / temperature, labels)
        for acc, grad in zip(total, torch.autograd.grad(loss, weights, allow_unused=True)):
            if grad is not None:
                acc.add_(grad)
    return total


@SCORES.register("snip")
def snip_score(model, batches, params, context):
    """|theta * g| / its sum over the scored entries still trained (the normalisation does not change the
    top-k)."""
    require_batches("snip", batches)
    weights = parameters_by_name(model, params)
    grads = loss_gradients(model, batches, params, mode=context.mode)
    raw = [context.restrict(p, (w.detach() * g).abs()) for p, w, g in zip(params, weights, grads)]
    total = sum(float(r.sum()) for r in raw)
    scale = 1.0 / total if total > 0 else 1.0
    return {p: r * scale for p, r in zip(params, raw)}
