"""The autograd functions of the sparse engine: a masked Linear or ConvNd whose weight gradient is computed for
its trained entries only, as a vector over them, while the input gradient stays exact.

The weight itself is a constant of the function (it holds the current trained values, written back after every
optimizer step); the trained values are a separate input (``values``, a vector over the trained entries in
row-major order) that receives the gradient. Per layer the gradient kernel is

* ``sampled``: only the K products of the trained entries are formed, an SDDMM (sampled dense-dense matrix
  product, ``torch.sparse.sampled_addmm``). Linear: the output gradient (O x N) against the inputs (N x I), sampled
  at the mask. Conv2d: the same on the unfolded input (im2col, N*L columns), which costs the unfold's memory and
  only pays on layers whose unfolded input is small.
* ``gather``: the dense weight gradient (one ``mm`` or ``convolution_backward``), of which the K trained entries
  are kept. It costs what the dense engine's gradient costs, but the optimizer then works on K entries only.

and in prune mode a Linear layer may also run its forward and input-gradient products on a CSR copy of its
weight (``forward="csr"``, ``torch.sparse.mm``): the untrained entries are exactly zero there, so the product
skips them. A layer asked for its dense gradient (``capture``: RigL's growth criterion at an update step) gets it
from the ``gather`` kernel at that step, whatever its kernel.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

GRAD_KERNELS = ("sampled", "gather")
FORWARD_KERNELS = ("dense", "csr")


@dataclass
class LayerKernels:
    """The kernels of one layer (see the module docstring)."""

    grad: str = "gather"
    forward: str = "dense"


class SparseLayer:
    """One masked layer under the sparse engine: its trained entries (``index``: flat positions in the weight's
    logical row-major order, sorted, whatever its memory layout: ``take``/``put_`` index that order), their values
    (the leaf the optimizer trains) and the structures its kernels need."""

    def __init__(self, name: str, module: nn.Module, mask: torch.Tensor, kernels: LayerKernels):
        self.name = name
        self.module = module
        self.kernels = kernels
        self.capture = False  # compute the dense weight gradient at the next backward (RigL's update step)
        self.dense_grad: torch.Tensor | None = None
        weight = module.weight
        self.values = torch.zeros(0, device=weight.device, dtype=weight.dtype, requires_grad=True)
        self.set_mask(mask)

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    @torch.no_grad()
    def set_mask(self, mask: torch.Tensor) -> None:
        """Train the entries of ``mask`` from now on. The values are read from the weight (which holds the trained
        values and, elsewhere, the plan's), in place when the count is unchanged."""
        weight = self.module.weight
        self.index = mask.to(weight.device, torch.bool).reshape(-1).nonzero().reshape(-1)
        current = weight.take(self.index)
        if current.numel() == self.values.numel():
            self.values.copy_(current)
        else:
            self.values = current.clone().requires_grad_(True)
        outputs, fan_in = weight.shape[0], weight[0].numel()
        shape, transposed_shape = (outputs, fan_in), (fan_in, outputs)
        self._pattern = self._csr = self._csr_transposed = None  # the CSR structures, for the sparse kernels only
        if self.kernels.grad == "sampled" or self.kernels.forward == "csr":
            structure = _csr_structure(self.index, shape)
            self._pattern = _csr(*structure, torch.zeros_like(self.values.detach()), shape)
            if self.kernels.forward == "csr":
                # W as CSR over the values themselves (no copy: the optimizer's in-place steps show through), and
                # W^T for the input gradient, its entries ordered by column (refilled from the values per use)
                self._csr = _csr(*structure, self.values.detach(), shape)
                transposed = (self.index % fan_in) * outputs + self.index // fan_in
                self._transpose_order = torch.argsort(transposed)
                self._csr_transposed = _csr(*_csr_structure(transposed[self._transpose_order], transposed_shape),
                                            torch.empty_like(self.values.detach()), transposed_shape)

    @torch.no_grad()
    def write_back(self) -> None:
        """Put the trained values into the weight (after every optimizer step)."""
        self.module.weight.put_(self.index, self.values.detach())

    def csr_weight(self) -> torch.Tensor:
        """The weight as CSR (O x fan-in) over the trained entries; prune mode only (the rest is zero). It shares
        its values with ``values``."""
        return self._csr

    @torch.no_grad()
    def csr_weight_transposed(self) -> torch.Tensor:
        """W^T as CSR (fan-in x O), its values refilled from ``values``."""
        torch.index_select(self.values.detach(), 0, self._transpose_order, out=self._csr_transposed.values())
        return self._csr_transposed


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """A CSR tensor from structures built here (valid by construction: torch's invariant checks are skipped, and its
    note that CSR support is in beta is silenced)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def _csr_structure(index: torch.Tensor, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """crow and col indices of a CSR matrix of ``shape`` whose entries are the sorted flat positions ``index``."""
    rows, columns = index // shape[1], index % shape[1]
    counts = torch.bincount(rows, minlength=shape[0])
    crow = torch.zeros(shape[0] + 1, dtype=torch.int64, device=index.device)
    crow[1:] = torch.cumsum(counts, 0)
    return crow, columns


def _sampled(layer: SparseLayer, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """The entries of ``left @ right`` at the layer's trained positions, in index order (an SDDMM). The CPU kernel
    takes ``left`` row-major and ``right`` column-major (each dot product then reads two contiguous rows); handed
    other layouts it makes copies of its own, slower than the two transposes made here."""
    left, right = left.contiguous(), right.t().contiguous().t()
    product = torch.sparse.sampled_addmm(layer._pattern, left, right, beta=0.0)
    return product.values()


class SparseLinearFunction(torch.autograd.Function):
    """y = x W^T + b with the gradient of W formed at the trained entries only (``values``).

    The sparse kernels read the inputs column-major (the SDDMM's right operand, the CSR product's dense one): a layer
    with a CSR forward transposes its inputs once, in the forward pass, and saves that copy instead of the inputs,
    for its SDDMM too. A layer with a dense forward transposes them in the backward pass, in the SDDMM's call:
    moving that copy to the forward pass measured level with ``auto`` and 7% slower with ``--engine sparse`` on
    lenet300 in freeze mode (``bench_engine.py``), as its small layers then keep a second copy of inputs that a
    ReLU keeps anyway."""

    @staticmethod
    def forward(ctx, inputs, values, weight, bias, layer: SparseLayer):
        ctx.layer = layer
        ctx.input_shape, ctx.input_dtype = inputs.shape, inputs.dtype
        ctx.has_bias = bias is not None
        flat = inputs.reshape(-1, inputs.shape[-1])
        ctx.transposed = layer.kernels.forward == "csr"
        saved = flat.t().contiguous() if ctx.transposed else flat
        ctx.save_for_backward(saved, weight)
        if ctx.transposed and not torch.is_autocast_enabled(inputs.device.type):
            out = torch.sparse.mm(layer.csr_weight(), saved.to(weight.dtype)).t()
            if bias is not None:
                out = out + bias
            return out.reshape(*inputs.shape[:-1], weight.shape[0])
        return F.linear(inputs, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        layer: SparseLayer = ctx.layer
        saved, weight = ctx.saved_tensors
        grad_output = grad_output.to(weight.dtype)
        flat_out = grad_output.reshape(-1, grad_output.shape[-1])
        flat_in = (saved.t() if ctx.transposed else saved).to(weight.dtype)
        sampled = layer.kernels.grad == "sampled" and not layer.capture
        csr = ctx.transposed  # a CSR forward: the input gradient on W^T in CSR too
        # the output gradient row-major by output (O x N), which both sparse kernels read: made once
        flat_out_t = flat_out.t().contiguous() if (sampled and ctx.needs_input_grad[1]) or (
            csr and ctx.needs_input_grad[0]) else None
        grad_inputs = grad_values = grad_bias = None
        if ctx.needs_input_grad[0]:
            if csr:
                grad_inputs = torch.sparse.mm(layer.csr_weight_transposed(), flat_out_t).t()
            else:
                grad_inputs = flat_out @ weight
            grad_inputs = grad_inputs.reshape(ctx.input_shape).to(ctx.input_dtype)
        if ctx.needs_input_grad[1]:
            if sampled:
                grad_values = _sampled(layer, flat_out_t, flat_in)
            else:
                dense = flat_out.t() @ flat_in
                if layer.capture:
                    layer.dense_grad = dense
                grad_values = dense.take(layer.index)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = flat_out.sum(0)
        return grad_inputs, grad_values, None, grad_bias, None


class SparseConvFunction(torch.autograd.Function):
    """A convolution (1, 2 or 3 spatial dimensions) with the gradient of W formed at the trained entries only."""

    @staticmethod
    def forward(ctx, inputs, values, weight, bias, layer: SparseLayer):
        module = layer.module
        ctx.layer = layer
        ctx.save_for_backward(inputs, weight)
        ctx.bias_shape = None if bias is None else list(bias.shape)
        return torch.ops.aten.convolution(inputs, weight, bias, module.stride, module.padding, module.dilation,
                                          False, [0] * len(module.stride), module.groups)

    @staticmethod
    def backward(ctx, grad_output):
        layer: SparseLayer = ctx.layer
        module = layer.module
        inputs, weight = ctx.saved_tensors
        grad_output = grad_output.to(weight.dtype)
        typed_inputs = inputs.to(weight.dtype)
        dense_weight_grad = layer.capture or layer.kernels.grad == "gather"
        need_bias = ctx.bias_shape is not None and ctx.needs_input_grad[3]
        grad_inputs, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
            grad_output, typed_inputs, weight, ctx.bias_shape, module.stride, module.padding, module.dilation, False,
            [0] * len(module.stride), module.groups,
            [ctx.needs_input_grad[0], dense_weight_grad and ctx.needs_input_grad[1], need_bias])
        grad_values = None
        if ctx.needs_input_grad[1]:
            if dense_weight_grad:
                if layer.capture:
                    layer.dense_grad = grad_weight
                grad_values = grad_weight.take(layer.index)
            else:
                grad_values = _sampled_conv2d(layer, grad_output, typed_inputs)
        if grad_inputs is not None:
            grad_inputs = grad_inputs.to(inputs.dtype)
        return grad_inputs, grad_values, None, grad_bias if need_bias else None, None


def _sampled_conv2d(layer: SparseLayer, grad_output: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """The weight gradient of a Conv2d (groups 1) at the trained entries: an SDDMM on the unfolded input."""
    module = layer.module
    batch, out_channels = grad_output.shape[0], grad_output.shape[1]
    unfolded = F.unfold(inputs, module.kernel_size, module.dilation, module.padding, module.stride)  # N, C*k*k, L
    left = grad_output.reshape(batch, out_channels, -1).transpose(0, 1).reshape(out_channels, -1)  # O, N*L
    right = unfolded.transpose(0, 1).reshape(unfolded.shape[1], -1).t()  # N*L, C*k*k
    return _sampled(layer, left, right)


def sampled_conv_supported(module: nn.Module) -> bool:
    """Whether the ``sampled`` kernel applies to a conv layer: a Conv2d with groups 1."""
    return isinstance(module, nn.Conv2d) and module.groups == 1


class EngineLayer(nn.Module):
    """Stands in for a masked Linear/ConvNd while the sparse engine trains: it holds the very same Parameter
    objects under the same names (state dicts and the optimizer see no difference), shares the original's forward
    and backward hooks (they run, given this module), and runs the layer through the engine's autograd function.
    The engine puts the original module back when it is done."""

    def __init__(self, layer: SparseLayer):
        super().__init__()
        original = layer.module
        self.weight = original.weight
        self.bias = original.bias
        for hooks in ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks",
                      "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called"):
            if hasattr(original, hooks):
                setattr(self, hooks, getattr(original, hooks))
        self._function = SparseLinearFunction if isinstance(layer.module, nn.Linear) else SparseConvFunction
        self._layer = layer

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self._function.apply(inputs, self._layer.values, self.weight, self.bias, self._layer)

    def extra_repr(self) -> str:
        return f"{type(self._layer.module).__name__} {self._layer.name}: {len(self._layer.index)} trained entries"
