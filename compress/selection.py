"""Selection: scores + density + scope + mode -> a Plan of boolean masks (True = trained).

``density`` is the one internal number: the fraction of compressible entries that are trained.
Global scope keeps the top ``round(density * N)`` entries over all scored parameters together;
layer scope keeps ``round(density * n_l)`` in every layer, erk scope the ERK count of every layer
(``compress.allocation``). Ties are broken by position (earlier
parameter, then lower flat index), so a selection is deterministic on every machine.

Selectors (registered in ``SELECTORS``) turn one or more scores into masks: ``topk`` here, ``cops`` in
``compress.cops``; ``select_with`` validates the scores and options and returns a Plan.
"""
from __future__ import annotations

from compress.errors import UserError, UserTypeError
from dataclasses import dataclass, field
from typing import Callable

import torch

from compress.allocation import SCOPES, layer_counts
from formats.registry import Registry

MODES = ("prune", "freeze")


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
    """Masks keeping the highest scores at ``density`` with ``scope`` (global, layer or erk)."""
    density = check_density(density)
    check_choice("scope", scope, SCOPES)
    for name, value in scores.items():
        if not torch.isfinite(value).all():
            raise UserError(f"score of {name} has non-finite entries (nan or inf); cannot select")
    counts = layer_counts({name: tuple(value.shape) for name, value in scores.items()}, density, scope)
    if counts is not None:
        return {
            name: _top_k_flat(value.detach().flatten().double().cpu(), counts[name])
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


@dataclass(frozen=True)
class Selector:
    """A registered way to turn ``arity`` scores into masks: ``selector(scores, density, scope, options)``."""

    function: Callable[[list[dict[str, torch.Tensor]], float, str, dict], dict[str, torch.Tensor]]
    arity: int  # how many scores it takes
    label: Callable[[list[str], dict], str]  # (score names, options) -> the plan's score label
    defaults: dict = field(default_factory=dict)  # its options and their defaults
    check: Callable[[dict], dict] = dict  # validates (and normalises) complete options; raises UserError

    def __call__(self, scores: list[dict[str, torch.Tensor]], density: float, scope: str, options: dict):
        return self.function(scores, density, scope, options)

    def options(self, given: dict) -> dict:
        """The defaults updated with ``given``, validated; an unknown option lists the known ones."""
        unknown = sorted(set(given) - set(self.defaults))
        if unknown:
            known = ", ".join(sorted(self.defaults)) or "none"
            raise UserError(f"unknown option(s) {', '.join(map(repr, unknown))}; known: {known}")
        return self.check({**self.defaults, **given})

    def describe(self, score_names: list[str], options: dict) -> str:
        """The plan's label, e.g. ``snip`` or ``cops(snip,grasp;gamma=0.5)``."""
        return self.label(list(score_names), self.options(options))


SELECTORS: Registry[Selector] = Registry("selector")


def register_selector(name: str, arity: int, label: Callable[[list[str], dict], str], defaults: dict | None = None,
                      check: Callable[[dict], dict] = dict):
    """Decorator: register ``function(scores, density, scope, options) -> masks`` as selector ``name``."""

    def add(function):
        SELECTORS.register(name)(Selector(function, arity, label, defaults or {}, check))
        return function

    return add


@register_selector("topk", 1, label=lambda names, options: names[0])
def topk_selector(scores, density, scope, options):
    """The top entries of the one score."""
    return top_k_masks(scores[0], density, scope)


def select_with(
    selector: str,
    scores: list[dict[str, torch.Tensor]],
    density: float,
    scope: str,
    mode: str,
    options: dict,
    score_names: list[str],
) -> Plan:
    """Turn scores into a Plan with a registered selector; the Plan's ``score`` is its description."""
    chosen = SELECTORS.get(selector)
    check_choice("mode", mode, MODES)
    density = check_density(density)
    check_choice("scope", scope, SCOPES)
    if len(scores) != chosen.arity:
        raise UserError(f"selector {selector!r} takes exactly {chosen.arity} score(s), got {len(scores)}")
    if len(score_names) != len(scores):
        raise UserError(f"give one name per score: {len(score_names)} name(s) for {len(scores)} score(s)")
    if not scores[0]:
        raise UserError("nothing to select: no compressible parameters were scored")
    shapes = {name: value.shape for name, value in scores[0].items()}
    for names, other in zip(score_names[1:], scores[1:]):
        if {name: value.shape for name, value in other.items()} != shapes:
            raise UserError(f"score {names!r} covers other parameters or shapes than {score_names[0]!r}; "
                            "score the same parameters with every score")
    options = chosen.options(options)
    masks = chosen(scores, density, scope, options)
    return Plan(mode=mode, masks=masks, density=density, scope=scope, score=chosen.label(list(score_names), options))


def select(
    scores: dict[str, torch.Tensor], density: float, scope: str = "global", mode: str = "prune", score: str = ""
) -> Plan:
    """Turn scores into a Plan: the top entries at ``density`` are trained, the rest pruned or frozen."""
    return select_with("topk", [scores], density, scope, mode, {}, [score])


import compress.cops  # noqa: E402,F401  (registers the "cops" selector)
