"""``rigl``: Rigged Lottery (Evci et al. 2020): drop the smallest trained weights of each layer, regrow as
many where the dense loss gradient is largest (see ``compress.strategies.dynamic``)."""
from __future__ import annotations

import torch

from compress.strategies import register
from compress.strategies.dynamic import DynamicSparse


@register("rigl")
class RiggedLottery(DynamicSparse):
    name = "rigl"
    description = "dynamic sparse training: drop the smallest weights, regrow where the gradient is largest (RigL)"

    def grow_scores(self, name: str, gradient: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return gradient.double().abs()
