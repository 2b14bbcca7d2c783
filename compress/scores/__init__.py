"""Pruning scores: one module per score, registered in ``SCORES``; higher score = more worth training.

A score function takes ``(model, batches, params, *, density, seed)`` and returns a dict from parameter
name to a float32 CPU tensor of the parameter's shape. It may modify ``model`` freely: ``score`` hands
it a private copy, so the caller's model is never touched (a classic bug of public SNIP/GraSP code).
"""
from __future__ import annotations

from compress.errors import UserError
import copy
from typing import Callable, Iterable, Protocol

import torch
from torch import nn

from compress.params import compressible_parameters
from compress.registry import Registry

Batch = tuple[torch.Tensor, torch.Tensor]


class ScoreFunction(Protocol):
    def __call__(
        self, model: nn.Module, batches: list[Batch], params: list[str], *, density: float | None, seed: int
    ) -> dict[str, torch.Tensor]: ...


SCORES: Registry[ScoreFunction] = Registry("score")


def score(
    model: nn.Module,
    name: str,
    batches: Iterable[Batch] = (),
    params: list[str] | None = None,
    *,
    density: float | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Score the compressible parameters of ``model`` with the registered score ``name``.

    ``batches`` are (inputs, labels) pairs (data-free scores ignore them); ``density`` is the target
    density, used only by iterative scores (SynFlow); ``seed`` drives random scores.
    """
    function = SCORES.get(name)
    batches = list(batches)
    params = compressible_parameters(model) if params is None else list(params)
    known = dict(model.named_parameters())
    unknown = [p for p in params if p not in known]
    if unknown:
        raise UserError(f"cannot score {unknown}: not parameters of the model")
    if density is not None and not 0.0 < density <= 1.0:
        raise UserError(f"density must be in (0, 1], got {density}")
    scores = function(copy.deepcopy(model), batches, params, density=density, seed=seed)
    result = {}
    for param in params:
        value = scores[param].detach().to("cpu", torch.float32)
        if value.shape != known[param].shape:
            raise RuntimeError(f"score {name!r} returned shape {tuple(value.shape)} for {param}")
        result[param] = value
    return result


def require_batches(name: str, batches: list[Batch]) -> None:
    """Data-driven scores need at least one batch."""
    if not batches:
        raise UserError(f"score {name!r} needs at least one data batch (set --score-batches >= 1)")


def parameters_by_name(model: nn.Module, params: list[str]) -> list[nn.Parameter]:
    named = dict(model.named_parameters())
    return [named[p] for p in params]


from compress.scores import grasp, magnitude, random_score, snip, synflow  # noqa: E402,F401  (registration)

__all__ = ["SCORES", "score", "Batch"]
