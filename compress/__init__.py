"""compress: train networks in which only a few weights are learned, and ship them small.

Pipeline: ``score`` -> ``select`` -> ``train`` -> pack. Untrained weights are pruned (zero) or frozen
at their seeded random init, which the portable generator in ``compress.rng`` regenerates anywhere.
"""
from compress.config import RunConfig
from compress.init import initialise
from compress.models import build_model
from compress.run import plan_run, resume_run, train_run
from compress.scores import SCORES, score
from compress.selection import Plan, select
from compress.training import MaskConstraint, TrainSettings, train

__version__ = "0.1.0"

__all__ = [
    "RunConfig", "initialise", "build_model", "plan_run", "resume_run", "train_run",
    "SCORES", "score", "Plan", "select", "MaskConstraint", "TrainSettings", "train", "__version__",
]
