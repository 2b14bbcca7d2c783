"""Method presets: a method name is a strategy, a score and a default mode (``--score``/``--mode`` override
the last two)."""
from __future__ import annotations

from dataclasses import dataclass

from formats.registry import Registry


@dataclass(frozen=True)
class Method:
    score: str | None  # None: no at-init selection (dense training, or a strategy that selects later)
    mode: str
    description: str
    strategy: str = "oneshot"  # the registered strategy that owns the masks over time
    selector: str = "topk"  # the registered selector that turns its score(s) into masks
    scores: tuple[str, ...] = ()  # the default scores of a selector that combines several


METHODS: Registry[Method] = Registry("method")

METHODS.register("dense")(Method(None, "prune", "no selection: every weight is trained (density 1)"))
METHODS.register("freezenet")(Method("snip", "freeze", "SNIP score, untrained weights frozen at their seeded init"))
METHODS.register("snip")(Method("snip", "prune", "SNIP connection sensitivity |theta*g|, rest pruned"))
METHODS.register("grasp")(Method("grasp", "prune", "GraSP gradient-flow score, rest pruned"))
METHODS.register("synflow")(Method("synflow", "prune", "iterative data-free SynFlow, rest pruned"))
METHODS.register("magnitude")(Method("magnitude", "prune", "largest |theta| at init, rest pruned"))
METHODS.register("cops")(Method(None, "prune", "COPS: top of one score subject to keeping gamma of another's best "
                                               "(--scores, --gamma), rest pruned", selector="cops",
                                 scores=("snip", "grasp")))
METHODS.register("random")(Method("random", "prune", "uniformly random selection, rest pruned"))
METHODS.register("imp")(Method(None, "prune", "lottery tickets: iterative magnitude pruning with rewinding "
                                             "(--levels or --density, --prune-fraction, --rewind)", "imp"))
METHODS.register("set")(Method("random", "prune", "dynamic sparse training (SET): drop the smallest weights, regrow "
                                             "at random (--update-every, --drop-fraction, --allocation)", "set"))
METHODS.register("rigl")(Method("random", "prune", "dynamic sparse training (RigL): drop the smallest weights, regrow "
                                              "where the gradient is largest (--update-every, --drop-fraction, "
                                              "--allocation)", "rigl"))
