"""Portable initialisation: every conv and linear parameter is drawn from the seeded Philox stream.

The rule is PyTorch's default layer init (kaiming-uniform with a = sqrt(5) for weights, which is
U(-1/sqrt(fan_in), 1/sqrt(fan_in)), and the same bound for biases), so models train as they do
with torch's own init, but the values are a pure function of (seed, parameter name) and can be
regenerated bit-exactly anywhere: the packed artifact stores only the seed and each rule's bound.
Normalisation layers start at weight 1, bias 0. Interspace coefficients are drawn from the stream of
their layer's ``weight`` name (see ``formats.interspace``); their basis keeps its constructed value.
Parameters of any other module keep their constructor's init; they are never compressible and are
always stored as values.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from formats.rng import check_seed, uniform

WEIGHTED_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


@dataclass(frozen=True)
class InitRule:
    """How one parameter's initial value is generated: U[-bound, bound) from the (seed, name) stream."""

    kind: str
    bound: float
    stream: str | None = None  # the stream name when it is not the parameter's (interspace coefficients)

    def generate(self, seed: int, name: str, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        if self.kind != "uniform":
            raise ValueError(f"unknown init rule {self.kind!r}; known: uniform")
        return uniform(seed, self.stream or name, shape, self.bound)

    def as_dict(self) -> dict:
        return {"kind": self.kind, "bound": self.bound, **({"stream": self.stream} if self.stream else {})}


def _fan_in(weight: torch.Tensor) -> int:
    return int(weight[0].numel()) if weight.dim() > 1 else int(weight.numel())


def init_rules(model: nn.Module) -> dict[str, InitRule]:
    """The rule of every conv/linear weight and bias of ``model``, keyed by parameter name."""
    from formats.interspace import InterspaceConv2d

    rules: dict[str, InitRule] = {}
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, InterspaceConv2d):
            fan_in = _fan_in(module.coefficients)
            bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            rules[prefix + "coefficients"] = InitRule("uniform", bound, stream=prefix + "weight")
        elif isinstance(module, WEIGHTED_LAYERS):
            fan_in = _fan_in(module.weight)
            bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            rules[prefix + "weight"] = InitRule("uniform", bound)
        else:
            continue
        if module.bias is not None:
            rules[prefix + "bias"] = InitRule("uniform", bound)
    return rules


@torch.no_grad()
def initialise(model: nn.Module, seed: int) -> nn.Module:
    """Re-initialise ``model`` in place from ``seed`` (portable for conv/linear, constant for norms)."""
    seed = check_seed(seed)
    parameters = dict(model.named_parameters())
    for name, rule in init_rules(model).items():
        parameter = parameters[name]
        parameter.copy_(rule.generate(seed, name, parameter.shape).to(parameter.device, parameter.dtype))
    for module in model.modules():
        if isinstance(module, NORM_LAYERS):
            if getattr(module, "weight", None) is not None:
                module.weight.fill_(1.0)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
            if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
                module.reset_running_stats()
    return model


def initial_values(model: nn.Module, seed: int, names: list[str]) -> dict[str, torch.Tensor]:
    """Regenerate the initial values of the named conv/linear parameters without touching ``model``."""
    rules = init_rules(model)
    parameters = dict(model.named_parameters())
    missing = [name for name in names if name not in rules]
    if missing:
        raise ValueError(f"no portable init rule for {missing}; only conv, linear and interspace parameters have one")
    return {
        name: rules[name].generate(seed, name, parameters[name].shape).to(parameters[name].device)
        for name in names
    }
