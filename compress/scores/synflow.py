"""SynFlow (Tanaka et al. 2020): data-free, iterative synaptic-flow pruning.

The network is linearised (every parameter and buffer replaced by its absolute value, BatchNorm in
eval mode, float64 against overflow), fed an all-ones input, and ``R = sum(output)``; the score is
``|theta * dR/dtheta|``. With a target density the mask is pruned over ``ROUNDS`` rounds along the
exponential schedule ``density ** (r / ROUNDS)``, rescoring the masked network each round. Every
round selects with the context's scope (layer scope keeps ``round(d_r * n_l)`` per layer) and starts
from the context's masks. Entries pruned in an earlier round score 0 and survivors score > 0, so the
top-k of the returned score, with the same scope, is the iterative mask.
"""
from __future__ import annotations

from compress.errors import UserError
import torch

from compress.scores import SCORES, parameters_by_name
from compress.selection import top_k_masks

ROUNDS = 100


def synaptic_flow(model, params, input_shape) -> list[torch.Tensor]:
    """|theta * dR/dtheta| with R the summed output for an all-ones input; ``model`` already linearised."""
    weights = parameters_by_name(model, params)
    ones = torch.ones((1, *input_shape), dtype=torch.float64, device=weights[0].device)
    grads = torch.autograd.grad(model(ones).sum(), weights, allow_unused=True)
    return [
        (w.detach() * g).abs() if g is not None else torch.zeros_like(w) for w, g in zip(weights, grads)
    ]


@torch.no_grad()
def linearise(model) -> None:
    """Replace every parameter and floating buffer by its absolute value, in float64, eval mode."""
    model.double().eval()
    for tensor in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
        tensor.abs_()


def input_shape_of(batches, model) -> tuple[int, ...]:
    if batches:
        return tuple(batches[0][0].shape[1:])
    shape = getattr(model, "input_shape", None)
    if shape is None:
        raise UserError("synflow needs the input shape: pass one batch (its labels are not used)")
    return tuple(shape)


@SCORES.register("synflow")
def synflow_score(model, batches, params, context):
    """Iterative SynFlow scores (single-shot when the density is None or 1), pruned with the context's
    scope from its masks; entries outside the final mask score 0."""
    input_shape = input_shape_of(batches, model)
    linearise(model)
    weights = parameters_by_name(model, params)
    originals = [w.detach().clone() for w in weights]
    start = [context.mask(p, w) for p, w in zip(params, weights)]
    density = context.density
    rounds = ROUNDS if density is not None and density < 1.0 else 1
    masks = start
    scores = None
    for round_index in range(1, rounds + 1):
        with torch.no_grad():  # entries removed before scoring stay as they are in the model
            for w, original, mask, alive in zip(weights, originals, masks, start):
                w.copy_(torch.where(mask | ~alive, original, 0.0))
        scores = synaptic_flow(model, params, input_shape)
        if rounds > 1:
            # Pruned entries rank below every live one (scores are >= 0), so they are never re-selected.
            ranked = {p: torch.where(m, s, -1.0) for p, s, m in zip(params, scores, masks)}
            selected = top_k_masks(ranked, density ** (round_index / rounds), context.scope)
            masks = [selected[p] & m for p, m in zip(params, masks)]
    # A per-layer count can exceed the entries still carrying flow: such survivors score the smallest
    # positive float32, so that the top-k of the result (same scope) is exactly the iterative mask.
    tiny = torch.finfo(torch.float32).tiny
    return {p: torch.where(m, s.float().clamp(min=tiny), 0.0) for p, s, m in zip(params, scores, masks)}
