"""Method presets: a method name is a score plus a default mode (``--score``/``--mode`` override them)."""
from __future__ import annotations

from dataclasses import dataclass

from compress.registry import Registry


@dataclass(frozen=True)
class Method:
    score: str | None  # None: no selection (dense training)
    mode: str
    description: str


METHODS: Registry[Method] = Registry("method")

METHODS.register("dense")(Method(None, "prune", "no selection: every weight is trained (density 1)"))
METHODS.register("freezenet")(Method("snip", "freeze", "SNIP score, untrained weights frozen at their seeded init"))
METHODS.register("snip")(Method("snip", "prune", "SNIP connection sensitivity |theta*g|, rest pruned"))
METHODS.register("grasp")(Method("grasp", "prune", "GraSP gradient-flow score, rest pruned"))
METHODS.register("synflow")(Method("synflow", "prune", "iterative data-free SynFlow, rest pruned"))
METHODS.register("magnitude")(Method("magnitude", "prune", "largest |theta| at init, rest pruned"))
METHODS.register("cops")(Method("cops", "prune", "COPS: top of one score subject to keeping gamma of another's best (--scores, --gamma), rest pruned"))
METHODS.register("random")(Method("random", "prune", "uniformly random selection, rest pruned"))
