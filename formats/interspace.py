"""Interspace pruning (Wimmer et al. 2022): K x K filters as sparse coefficients over a filter basis.

Every convolution with a kernel larger than 1x1 (weight O x I x K x K) becomes an
``InterspaceConv2d`` with coefficients ``lam`` (O x I x K^2) and one basis ``F`` (K^2 x K x K) per
layer, so that ``W[o, i] = sum_n lam[o, i, n] * F[n]``. Masks, scores and freezing apply to the
coefficients; the basis is trained densely (or held fixed). The 2-D DCT-II basis (orthonormal) is the
default; the spatial unit basis makes interspace pruning identical to standard pruning, bit for bit.
Coefficients are drawn from the portable stream of the layer's own ``weight`` name with its usual
bound: with an orthonormal basis the initial filters have the usual variance, and with the spatial
basis they are exactly the usual initial filters.
"""
from __future__ import annotations

from formats.errors import UserError
import math

import torch
import torch.nn.functional as F
from torch import nn

BASES = ("dct", "spatial")


def dct_basis(size: int) -> torch.Tensor:
    """The orthonormal 2-D DCT-II basis: K^2 filters of K x K, ordered by (vertical, horizontal) frequency."""
    x = torch.arange(size, dtype=torch.float64)
    u = torch.arange(size, dtype=torch.float64).unsqueeze(1)
    scale = torch.full((size, 1), math.sqrt(2.0 / size), dtype=torch.float64)
    scale[0, 0] = math.sqrt(1.0 / size)
    one_d = scale * torch.cos(math.pi * (2 * x + 1) * u / (2 * size))  # (K frequencies, K positions)
    return torch.einsum("ux,vy->uvxy", one_d, one_d).reshape(size * size, size, size).float()


def spatial_basis(size: int) -> torch.Tensor:
    """The unit basis: filter n is 1 at position n and 0 elsewhere."""
    return torch.eye(size * size).reshape(size * size, size, size)


def make_basis(name: str, size: int) -> torch.Tensor:
    if name == "dct":
        return dct_basis(size)
    if name == "spatial":
        return spatial_basis(size)
    raise UserError(f"unknown basis {name!r}; known: {', '.join(BASES)}")


def interspace_weight(coefficients: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """W = lam F: (O, I, K^2) coefficients times (K^2, K, K) basis -> (O, I, K, K) filters."""
    out_channels, in_channels, count = coefficients.shape
    size = basis.shape[-1]
    return (coefficients @ basis.reshape(count, size * size)).reshape(out_channels, in_channels, size, size)


class InterspaceConv2d(nn.Module):
    """A Conv2d whose filters are ``interspace_weight(coefficients, basis)``; same arguments as the conv."""

    def __init__(self, conv: nn.Conv2d, basis: torch.Tensor, trainable_basis: bool = True):
        super().__init__()
        if conv.kernel_size[0] != conv.kernel_size[1]:
            raise UserError(f"interspace pruning needs square kernels, got {conv.kernel_size}")
        size = conv.kernel_size[0]
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups, self.padding_mode = conv.dilation, conv.groups, conv.padding_mode
        self._reversed_padding = conv._reversed_padding_repeated_twice
        device = conv.weight.device
        self.coefficients = nn.Parameter(
            torch.empty(conv.out_channels, conv.in_channels // conv.groups, size * size, device=device)
        )
        self.basis = nn.Parameter(basis.to(device).clone(), requires_grad=trainable_basis)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone())

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        weight = interspace_weight(self.coefficients, self.basis)
        if inputs.dim() == 4 and inputs.is_contiguous(memory_format=torch.channels_last):
            weight = weight.contiguous(memory_format=torch.channels_last)  # else oneDNN reorders it, slower
        if self.padding_mode != "zeros":
            inputs = F.pad(inputs, self._reversed_padding, mode=self.padding_mode)
            return F.conv2d(inputs, weight, self.bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(inputs, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"basis={tuple(self.basis.shape)}, trainable_basis={self.basis.requires_grad}")


def interspace_layers(model: nn.Module) -> list[str]:
    """Names of the convolutions interspace pruning applies to: 2-D, square, kernel larger than 1x1."""
    return [
        name for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d) and module.kernel_size[0] == module.kernel_size[1] > 1
    ]


def to_interspace(model: nn.Module, basis: str = "dct", trainable_basis: bool = True) -> list[str]:
    """Replace, in place, every eligible convolution of ``model`` by an InterspaceConv2d; returns their names."""
    if basis not in BASES:
        raise UserError(f"unknown basis {basis!r}; known: {', '.join(BASES)}")
    layers = interspace_layers(model)
    for name in layers:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        conv = getattr(parent, child)
        with torch.device(conv.weight.device):
            setattr(parent, child, InterspaceConv2d(conv, make_basis(basis, conv.kernel_size[0]), trainable_basis))
    return layers


def to_standard_state_dict(state: dict[str, torch.Tensor], layers: list[str]) -> dict[str, torch.Tensor]:
    """The plain model's state dict: each interspace layer's coefficients and basis become W = lam F."""
    result = {}
    for key, value in state.items():
        layer, _, leaf = key.rpartition(".")
        if layer in layers and leaf == "coefficients":
            result[f"{layer}.weight"] = interspace_weight(value, state[f"{layer}.basis"])
        elif not (layer in layers and leaf == "basis"):
            result[key] = value
    return result
