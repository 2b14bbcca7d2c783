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
        return sum(int(torch.count_nonzero(m)) for m in self.masks.values())

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
    needed = k - int(torch.count_nonzero(above))
    return above | (tied & (torch.cumsum(tied, 0) <= needed))


_BITS_OF = {torch.float32: torch.int32, torch.float64: torch.int64}


def _order_key(value: float, dtype: torch.dtype) -> int:
    """An integer in the order of the floats of ``dtype``: the bit pattern, negative ones with the magnitude bits
    flipped (equal floats, 0.0 and -0.0 included, get equal keys)."""
    bits = int(torch.tensor([value + 0.0], dtype=dtype).view(_BITS_OF[dtype]))
    return bits ^ torch.iinfo(_BITS_OF[dtype]).max if bits < 0 else bits


def _float_of_key(key: int, dtype: torch.dtype) -> float:
    """The float of ``dtype`` whose order key is ``key`` (the inverse of ``_order_key``)."""
    bits = key ^ torch.iinfo(_BITS_OF[dtype]).max if key < 0 else key
    return float(torch.tensor([bits], dtype=_BITS_OF[dtype]).view(dtype))


CONCATENATE_BELOW = 2**22  # entries: below, top_k_over concatenates (fast); above, it bisects (no copy)


def top_k_over(values: list[torch.Tensor], k: int, concatenate_below: int = CONCATENATE_BELOW) -> list[torch.Tensor]:
    """Flat boolean masks of the k largest entries of ``values`` taken together, ties broken by position
    (earlier tensor, then lower index): ``_top_k_flat`` of their concatenation.

    From ``concatenate_below`` entries on, the concatenation is not made: the k-th largest value is found by
    bisection over the order keys of the floats between the smallest and the largest value (at most 32 counting
    passes for float32 scores, 64 for others, which are compared as float64), so no copy of the scores is made,
    where a concatenated ``kthvalue`` needs a copy, a sort buffer and int64 indices, 7x the float32 scores of a
    large model. Below it, the concatenation is faster (SynFlow selects 100 times).
    """
    n = sum(value.numel() for value in values)
    if k >= n or k <= 0:
        return [torch.full((value.numel(),), k > 0, dtype=torch.bool, device=value.device) for value in values]
    exact_in_float32 = (torch.float16, torch.bfloat16, torch.float32)
    dtype = torch.float32 if all(value.dtype in exact_in_float32 for value in values) else torch.float64
    if n < concatenate_below:
        devices = [value.device for value in values]
        chosen = _top_k_flat(torch.cat([value.detach().flatten().to(dtype).cpu() for value in values]), k)
        return [mask.to(device) for mask, device in zip(chosen.split([value.numel() for value in values]), devices)]
    flat = [value.detach().flatten() for value in values if value.numel()]  # .to(dtype) below copies only a
    # tensor of another dtype, one at a time
    low = _order_key(min(float(value.to(dtype).min()) for value in flat), dtype)
    high = _order_key(max(float(value.to(dtype).max()) for value in flat), dtype)
    while low < high:  # the largest key that at least k values reach: the k-th largest value's
        middle = (low + high + 1) // 2
        threshold = _float_of_key(middle, dtype)
        if sum(int(torch.count_nonzero(value.to(dtype) >= threshold)) for value in flat) >= k:
            low = middle
        else:
            high = middle - 1
    threshold = _float_of_key(low, dtype)
    needed = k - sum(int(torch.count_nonzero(value.to(dtype) > threshold)) for value in flat)
    masks = []
    for value in values:
        value = value.detach().flatten().to(dtype)
        mask = value > threshold
        if needed > 0:  # the first ``needed`` ties in order (their positions only: ties are few)
            tied = (value == threshold).nonzero().flatten()
            mask[tied[:needed]] = True
            needed -= tied.numel()
        masks.append(mask)
    return masks


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
    total = sum(value.numel() for value in scores.values())
    keep = top_k_over(list(scores.values()), round(density * total))
    return {name: mask.reshape(value.shape) for (name, value), mask in zip(scores.items(), keep)}


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
