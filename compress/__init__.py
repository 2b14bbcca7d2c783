"""compress: train networks in which only a few weights are learned, and ship them small.

Pipeline: ``score`` -> ``select`` -> ``train`` -> pack; ``sparsify`` and ``save`` do the same for your own
model in your own training loop. Untrained weights are pruned (zero) or frozen
at their seeded random init, which the portable generator in ``formats.rng`` regenerates anywhere.
"""
from compress.config import RunConfig
from compress.init import initialise
from formats.models import build_model
from compress.run import plan_run, resume_run, train_run
from compress.save_model import save
from compress.scores import SCORES, score
from compress.selection import Plan, select
from compress.sparsify import Sparse, sparsify
from compress.training import MaskConstraint, TrainSettings, train

__version__ = "0.1.0"

__all__ = [
    "RunConfig", "initialise", "build_model", "plan_run", "resume_run", "train_run",
    "SCORES", "score", "Plan", "select", "MaskConstraint", "TrainSettings", "train", "__version__",
    "sparsify", "Sparse", "save",
]
