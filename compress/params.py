"""Which parameters of a model are compressible (masked): conv and linear weights by default, and the
coefficients of interspace convolutions."""
from __future__ import annotations

from torch import nn

from compress.init import WEIGHTED_LAYERS


def compressible_parameters(model: nn.Module, include_bias: bool = False) -> list[str]:
    """Names of the conv/linear weights (and biases if asked) of ``model``, in registration order."""
    from formats.interspace import InterspaceConv2d

    names = []
    for module_name, module in model.named_modules():
        if not isinstance(module, (*WEIGHTED_LAYERS, InterspaceConv2d)):
            continue
        prefix = f"{module_name}." if module_name else ""
        names.append(prefix + ("coefficients" if isinstance(module, InterspaceConv2d) else "weight"))
        if include_bias and module.bias is not None:
            names.append(prefix + "bias")
    return names
