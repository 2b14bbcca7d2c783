"""``set``: Sparse Evolutionary Training (Mocanu et al. 2018): drop the smallest trained weights of each
layer, regrow as many at seeded random untrained positions (see ``compress.strategies.dynamic``)."""
from __future__ import annotations

import torch

from compress.strategies import register
from compress.strategies.dynamic import DynamicSparse


@register("set")
class SparseEvolutionaryTraining(DynamicSparse):
    name = "set"
    description = "dynamic sparse training: drop the smallest weights, regrow at random (SET)"

    def grow_scores(self, name: str, gradient: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return torch.rand(gradient.numel(), generator=generator, dtype=torch.float64)
