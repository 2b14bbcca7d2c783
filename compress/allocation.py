"""How many entries of each layer a density trains: one total (global), the same fraction of every layer
(layer, called ``uniform`` at ``--allocation``), or Erdős-Rényi-kernel densities (erk, Evci et al. 2020).

ERK gives a layer of shape (d_1, ..., d_r) a density proportional to (d_1 + ... + d_r) / (d_1 * ... * d_r),
scaled so that the layers together train ``round(density * N)`` entries; a layer whose density would
exceed 1 is kept dense and the scale recomputed for the rest (the layer with the highest raw density
first, as the RigL reference does). Counts are rounded by largest remainder, so that ERK's total is
exact; ties go to the earlier layer.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

from compress.errors import UserError

SCOPES = ("global", "layer", "erk")
ALLOCATIONS = {"global": "global", "uniform": "layer", "erk": "erk"}  # --allocation name -> scope


def scope_of_allocation(allocation: str) -> str:
    """The scope of an ``--allocation`` name (erk, uniform, global)."""
    if allocation not in ALLOCATIONS:
        raise UserError(f"unknown allocation {allocation!r}; known: {', '.join(ALLOCATIONS)}")
    return ALLOCATIONS[allocation]


def erk_densities(shapes: Mapping[str, Sequence[int]], density: float) -> dict[str, float]:
    """The ERK density of every layer at overall ``density`` (before rounding to counts)."""
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    raw = {name: sum(shape) / sizes[name] if sizes[name] else 0.0 for name, shape in shapes.items()}
    target = density * sum(sizes.values())
    dense: set[str] = set()
    while True:
        sparse = [name for name in shapes if name not in dense and sizes[name]]
        budget = target - sum(sizes[name] for name in dense)
        divisor = sum(raw[name] * sizes[name] for name in sparse)
        scale = budget / divisor if divisor else 0.0
        too_dense = [name for name in sparse if scale * raw[name] > 1.0]
        if not too_dense:
            break
        highest = max(raw[name] for name in too_dense)
        dense.add(next(name for name in too_dense if raw[name] == highest))
    return {name: 1.0 if name in dense else scale * raw[name] for name in shapes}


def _largest_remainder(real: dict[str, float], caps: dict[str, int], total: int) -> dict[str, int]:
    """Integer counts summing to ``total`` (within the caps), each the floor or ceiling of its real count."""
    counts = {name: min(int(math.floor(value)), caps[name]) for name, value in real.items()}
    left = total - sum(counts.values())
    order = sorted(real, key=lambda name: -(real[name] - math.floor(real[name])))
    for name in order:
        if left <= 0:
            break
        if counts[name] < caps[name]:
            counts[name] += 1
            left -= 1
    return counts


def layer_counts(shapes: Mapping[str, Sequence[int]], density: float, scope: str) -> dict[str, int] | None:
    """Entries trained per layer at ``density``: ``round(density * n_l)`` (layer), ERK's exact counts (erk),
    or None for global scope, where only the total ``round(density * N)`` is fixed."""
    if scope == "global":
        return None
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    if scope == "layer":
        return {name: round(density * n) for name, n in sizes.items()}
    if scope == "erk":
        real = {name: d * sizes[name] for name, d in erk_densities(shapes, density).items()}
        return _largest_remainder(real, sizes, round(density * sum(sizes.values())))
    raise UserError(f"unknown scope {scope!r}; known: {', '.join(SCOPES)}")
