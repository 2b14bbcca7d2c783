"""Selection: scores + density + scope + mode -> a Plan of boolean masks (True = trained).

``density`` is the one internal number: the fraction of compressible entries that are trained.
Global scope keeps the top ``round(density * N)`` entries over all scored parameters together;
layer scope keeps ``round(density * n_l)`` in every layer. Ties are broken by position (earlier
parameter, then lower flat index), so a selection is deterministic on every machine.
"""
from __future__ import annotations

from compress.errors import UserError, UserTypeError
from dataclasses import dataclass, field

import torch

MODES = ("prune", "freeze")
SCOPES = ("global", "layer")


@dataclass
class Plan:
    """What is trained: one boolean mask per compressible parameter, and what happens to the rest."""

    mode: str  # "prune" (untrained entries are zero) or "freeze" (kept at their seeded init)
    masks: dict[str, torch.Tensor]
    density: float  # requested density
    scope: str
    score: str
    extras: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(int(m.numel()) for m in self.masks.values())

    @property
    def trained(self) -> int:
        return sum(int(m.sum()) for m in self.masks.values())

    @property
    def actual_density(self) -> float:
        return self.trained / self.total if self.total else 1.0

    def collapsed_layers(self) -> list[str]:
        """Parameters with no trained entry at all (layer collapse)."""
        return [name for name, mask in self.masks.items() if mask.numel() and not bool(mask.any())]


def check_density(density: object) -> float:
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise UserTypeError(f"density must be a number in (0, 1], got {type(density).__name__}")
    if not 0.0 < float(density) <= 1.0:
        raise UserError(
            f"density must be in (0, 1] (the fraction of weights trained), got {density}; "
            "sparsity = 1 - density"
        )
    return float(density)


def check_choice(kind: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise UserError(f"unknown {kind} {value!r}; known: {', '.join(choices)}")
    return str(value)


def _top_k_flat(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest entries of a 1-D tensor, ties broken by lower index."""
    n = flat.numel()
    if k >= n:
        return torch.ones(n, dtype=torch.bool)
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool)
    threshold = torch.kthvalue(flat, n - k + 1).values
    above = flat > threshold
    tied = flat == threshold
    needed = k - int(above.sum())
    return above | (tied & (torch.cumsum(tied, 0) <= needed))


def top_k_masks(scores: dict[str, torch.Tensor], density: float, scope: str) -> dict[str, torch.Tensor]:
    """Masks keeping the highest scores at ``density`` with ``scope`` (global or layer)."""
    density = check_density(density)
    check_choice("scope", scope, SCOPES)
    for name, value in scores.items():
        if not torch.isfinite(value).all():
            raise UserError(f"score of {name} has non-finite entries (nan or inf); cannot select")
    if scope == "layer":
        return {
            name: _top_k_flat(value.detach().flatten().double().cpu(), round(density * value.numel()))
            .reshape(value.shape)
            .to(value.device)
            for name, value in scores.items()
        }
    flat = torch.cat([value.detach().flatten().double().cpu() for value in scores.values()])
    keep = _top_k_flat(flat, round(density * flat.numel()))
    masks, offset = {}, 0
    for name, value in scores.items():
        masks[name] = keep[offset : offset + value.numel()].reshape(value.shape).to(value.device)
        offset += value.numel()
    return masks


def select(
    scores: dict[str, torch.Tensor], density: float, scope: str = "global", mode: str = "prune", score: str = ""
) -> Plan:
    """Turn scores into a Plan: the top entries at ``density`` are trained, the rest pruned or frozen."""
    check_choice("mode", mode, MODES)
    if not scores:
        raise UserError("nothing to select: no compressible parameters were scored")
    return Plan(mode=mode, masks=top_k_masks(scores, density, scope), density=density, scope=scope, score=score)
