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

import copy

from compress.errors import UserError
import torch

from compress.progress import track
from compress.scores import SCORES, parameters_by_name
from compress.selection import top_k_masks
from formats.interspace import InterspaceConv2d, interspace_weight

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
    scope from its masks; entries outside the final mask score 0. Interspace layers are linearised as
    |lam| |F| (every parameter replaced by its absolute value); see ``synflow-composed`` for |lam F|."""
    return _iterative(model, batches, params, context, composed=False)


@SCORES.register("synflow-composed")
def synflow_composed_score(model, batches, params, context):
    """SynFlow through the absolute composed filter of every interspace layer: the linearised network computes
    with |lam F|, the filter the layer applies, where ``synflow`` uses |lam| |F| (which is not |lam F| for a
    basis with signs, such as the DCT); the coefficients score |lam * dR/dlam|. On a network without
    interspace layers, and with the spatial unit basis, it is ``synflow`` exactly."""
    return _iterative(model, batches, params, context, composed=True)


def _iterative(model, batches, params, context, composed: bool):
    input_shape = input_shape_of(batches, model)
    model = copy.deepcopy(model)  # linearising changes the parameters: a copy, so the caller's stay as they are
    layers = {f"{name}.coefficients": module for name, module in model.named_modules()
              if isinstance(module, InterspaceConv2d)} if composed else {}
    signed = {name: (module.coefficients.detach().double().clone(), module.basis.detach().double().clone())
              for name, module in layers.items()}
    linearise(model)
    weights = parameters_by_name(model, params)
    originals = [signed[p][0] if p in signed else w.detach().clone() for p, w in zip(params, weights)]
    start = [context.mask(p, w) for p, w in zip(params, weights)]
    rounds = ROUNDS if context.density is not None and context.density < 1.0 else 1
    with track(range(1, rounds + 1), rounds, f"scoring with {context.name}", enabled=context.progress and rounds > 1,
               count=lambda _: 1, unit="rounds") as progress_rounds:
        masks, scores = _rounds(model, params, input_shape, context, signed, weights, originals, start, rounds,
                                progress_rounds)
    # A per-layer count can exceed the entries still carrying flow: such survivors score the smallest
    # positive float32, so that the top-k of the result (same scope) is exactly the iterative mask.
    tiny = torch.finfo(torch.float32).tiny
    return {p: torch.where(m, s.float().clamp(min=tiny), 0.0) for p, s, m in zip(params, scores, masks)}


def _rounds(model, params, input_shape, context, signed, weights, originals, start, rounds, round_indices):
    """SynFlow's rounds: score, then keep the top density^(round / rounds) of the live entries."""
    masks, scores, density = start, None, context.density
    for round_index in round_indices:
        current = [torch.where(mask | ~alive, original, 0.0) for original, mask, alive in zip(originals, masks, start)]
        with torch.no_grad():  # entries removed before scoring stay as they are in the model
            for p, w, value in zip(params, weights, current):
                if p not in signed:
                    w.copy_(value)
        if signed:
            scores = composed_flow(model, params, input_shape, dict(zip(params, current)), signed)
        else:
            scores = synaptic_flow(model, params, input_shape)
        if rounds > 1:
            # Pruned entries rank below every live one (scores are >= 0), so they are never re-selected.
            ranked = {p: torch.where(m, s, -1.0) for p, s, m in zip(params, scores, masks)}
            selected = top_k_masks(ranked, density ** (round_index / rounds), context.scope)
            masks = [selected[p] & m for p, m in zip(params, masks)]
    return masks, scores


def composed_flow(model, params, input_shape, current: dict, signed: dict) -> list[torch.Tensor]:
    """|theta * dR/dtheta| with every interspace layer computing with |lam F| (``current`` holds the signed,
    masked coefficients): passed to the linearised model as coefficients |lam F| over the spatial unit basis
    (torch.func.functional_call; the model itself is not changed)."""
    leaves = {name: current[name].detach().clone().requires_grad_(True) for name in signed}
    overrides = {}
    for name, (_, basis) in signed.items():
        size = basis.shape[-1]
        filters = interspace_weight(leaves[name], basis).abs()
        layer = name.rpartition(".")[0]
        overrides[name] = filters.reshape(filters.shape[0], filters.shape[1], size * size)
        overrides[f"{layer}.basis"] = torch.eye(size * size, dtype=basis.dtype, device=basis.device).reshape(
            size * size, size, size)
    weights = parameters_by_name(model, params)
    ones = torch.ones((1, *input_shape), dtype=torch.float64, device=weights[0].device)
    output = torch.func.functional_call(model, overrides, (ones,), strict=False)
    targets = [leaves[p] if p in leaves else w for p, w in zip(params, weights)]
    grads = torch.autograd.grad(output.sum(), targets, allow_unused=True)
    return [(t.detach() * g).abs() if g is not None else torch.zeros_like(t) for t, g in zip(targets, grads)]
