"""Which layers the sparse engine takes, and which kernels each gets under ``--engine sparse`` and ``auto``.

``auto`` is a fixed rule, not a timing taken at the start of a run: the kernel decides the floating-point
rounding, so a rule keeps two runs of one config (and a run and its resume) identical. Its thresholds are the
crossovers that ``examples/benchmarks/bench_engine.py`` measures (``--crossover``; BENCHMARKS.md), with a margin:

* every engine layer trains its entries as a vector, so its optimizer state and update cost K entries; this never
  costs more than the dense engine (which also pays a masking pass over every entry);
* a Linear layer computes its weight gradient with the ``sampled`` kernel (an SDDMM) when its density is at most
  ``SAMPLED_MAX_DENSITY`` and its weight has at least ``SAMPLED_MIN_WEIGHTS`` entries (below that, the fixed cost
  of a sparse kernel exceeds the dense product it replaces);
* in prune mode a Linear layer also runs its forward and input gradient on CSR under the same rule, with
  ``CSR_MAX_DENSITY``;
* convolutions keep the dense kernels (``gather``) under ``auto``: on the CPU, oneDNN's dense weight gradient
  beats an SDDMM over the unfolded input at every density the benchmark measures (``--engine sparse`` still uses
  it for Conv2d layers, to compare);
* on CUDA ``auto`` keeps the dense kernels everywhere: no GPU measurement supports another choice yet.
"""
from __future__ import annotations

import torch
from torch import nn

from compress.engine.kernels import LayerKernels, sampled_conv_supported

ENGINES = ("dense", "sparse", "auto")
SAMPLED_MAX_DENSITY = 0.02  # measured: break-even at 5% on a 784x300 layer, 0.6-0.7x at 2%, 0.3-0.6x at 1%
CSR_MAX_DENSITY = 0.01  # measured: 0.5-1.5x at 5%, 0.4-1.1x at 2%, 0.2-0.8x at 1% (layers of 235k-2M weights)
SAMPLED_MIN_WEIGHTS = 50_000
ENGINE_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def engine_layer(module: nn.Module) -> bool:
    """Whether the sparse engine can take ``module``'s masked weight: a plain Linear/ConvNd (exactly those types,
    so a subclass with its own forward keeps the dense path) with numeric zero padding."""
    if type(module) not in ENGINE_LAYERS:
        return False
    if isinstance(module, nn.Linear):
        return True
    return module.padding_mode == "zeros" and not isinstance(module.padding, str)


def choose_kernels(engine: str, module: nn.Module, mask: torch.Tensor, mode: str, device: torch.device) -> LayerKernels:
    """The kernels of one engine layer (see the module docstring)."""
    density = float(torch.count_nonzero(mask)) / max(mask.numel(), 1)
    linear = isinstance(module, nn.Linear)
    if engine == "sparse":
        grad = "sampled" if linear or sampled_conv_supported(module) else "gather"
        return LayerKernels(grad=grad, forward="csr" if linear and mode == "prune" else "dense")
    if device.type != "cpu" or not linear or mask.numel() < SAMPLED_MIN_WEIGHTS:
        return LayerKernels()
    return LayerKernels(grad="sampled" if density <= SAMPLED_MAX_DENSITY else "gather",
                        forward="csr" if mode == "prune" and density <= CSR_MAX_DENSITY else "dense")
