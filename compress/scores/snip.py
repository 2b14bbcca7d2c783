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
    total: list[torch.Tensor | None] = [None] * len(weights)
    for inputs, labels in batches:
        loss = F.cross_entropy(model(inputs) / temperature, labels)
        grads = torch.autograd.grad(loss, weights, allow_unused=True)
        for i, grad in enumerate(grads):  # the first batch's gradients are the sums: no extra copy
            if grad is not None:
                total[i] = grad if total[i] is None else total[i].add_(grad)
        del grads
    return [torch.zeros_like(w) if t is None else t for w, t in zip(weights, total)]


@SCORES.register("snip")
def snip_score(model, batches, params, context):
    """|theta * g| / its sum over the scored entries still trained (the normalisation does not change the
    top-k)."""
    require_batches("snip", batches)
    weights = parameters_by_name(model, params)
    grads = loss_gradients(model, batches, params, mode=context.mode)
    raw = [context.restrict(p, g.mul_(w.detach()).abs_()) for p, w, g in zip(params, weights, grads)]  # in place
    del grads
    total = sum(float(r.sum()) for r in raw)
    scale = 1.0 / total if total > 0 else 1.0
    return {p: r.mul_(scale) for p, r in zip(params, raw)}
