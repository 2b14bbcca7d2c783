"""The sparse engine over one training: which layers it takes, their trained values as vectors, and the optimizer
state over those vectors.

``SparseEngine.build`` takes every masked weight of a plain Linear/ConvNd (``choice.engine_layer``); anything else
(interspace coefficients, masked biases) stays on the dense path of ``MaskConstraint``. ``installed`` swaps each
taken module for an ``EngineLayer`` holding the same Parameter objects, takes the weight out of autograd (its
trained values are the vector ``SparseLayer.values`` now) and, on the way out, writes the values back and puts the
original modules and ``requires_grad`` back: the model is a plain module again. The optimizer gets the value
vectors in a group of their own, with the weight decay as a coupled L2 term (what the dense engine folds into the
gradient), so its momentum and Adam moments are vectors over the trained entries; a checkpoint stores them that way,
with the flat indices they belong to (``optimizer/<weight>/<key>`` of K entries, ``optimizer-index/<weight>``:
uint16 for a weight of up to 65,536 entries, else int32 or int64; ``index_dtype``).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from compress.engine.choice import ENGINES, choose_kernels, engine_layer
from compress.engine.kernels import EngineLayer, SparseLayer

INDEX_PREFIX = "optimizer-index/"


class SparseEngine:
    """The engine layers of one model under one constraint (empty with ``--engine dense``)."""

    def __init__(self, layers: dict[str, SparseLayer]):
        self.layers = layers

    @classmethod
    def build(cls, engine: str, model: nn.Module, constraint, device: torch.device) -> "SparseEngine":
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}")
        layers = {}
        if engine != "dense":
            for name in constraint.names:
                module_name, _, attribute = name.rpartition(".")
                module = model.get_submodule(module_name)
                if attribute != "weight" or not engine_layer(module):
                    continue
                mask = constraint.mask(name)
                layers[name] = SparseLayer(name, module, mask, choose_kernels(engine, module, mask, constraint.mode,
                                                                              device))
        return cls(layers)

    def __bool__(self) -> bool:
        return bool(self.layers)

    def values(self) -> list[torch.Tensor]:
        """The trained-value vectors, the optimizer's parameters for these layers."""
        return [layer.values for layer in self.layers.values()]

    @contextmanager
    def installed(self, model: nn.Module) -> Iterator["SparseEngine"]:
        """The engine layers stand in for their modules for the duration; the model is plain again afterwards."""
        if not self.layers:
            yield self
            return
        originals = {id(layer.module): layer for layer in self.layers.values()}
        swapped = []
        for parent in list(model.modules()):
            for child_name, child in list(parent.named_children()):
                if id(child) in originals:
                    swapped.append((parent, child_name, child))
        try:
            for layer in self.layers.values():
                layer.module.weight.requires_grad_(False)
            for parent, child_name, child in swapped:
                setattr(parent, child_name, EngineLayer(originals[id(child)]))
            yield self
        finally:
            for parent, child_name, child in swapped:
                setattr(parent, child_name, child)
            for layer in self.layers.values():
                layer.write_back()
                layer.module.weight.requires_grad_(True)

    def write_back(self) -> None:
        for layer in self.layers.values():
            layer.write_back()

    def capture(self, enabled: bool) -> None:
        """Have the next backward also form every engine layer's dense weight gradient (RigL's update steps)."""
        for layer in self.layers.values():
            layer.capture = enabled
            layer.dense_grad = None

    def dense_gradients(self) -> dict[str, torch.Tensor]:
        """The dense weight gradients the last captured backward formed (zero for a layer that got none): the
        tensors themselves, which ``capture(False)`` lets go of."""
        return {name: layer.dense_grad.detach() if layer.dense_grad is not None
                else torch.zeros_like(layer.module.weight) for name, layer in self.layers.items()}

    def all_reduce_gradients(self, world_size: int) -> None:
        """Average the value gradients (and captured dense gradients) over the ranks: DistributedDataParallel only
        sees the module's parameters, not the value vectors."""
        for layer in self.layers.values():
            for tensor in (layer.values.grad, layer.dense_grad):
                if tensor is not None:
                    dist.all_reduce(tensor)
                    tensor.div_(world_size)

    @torch.no_grad()
    def follow_masks(self, constraint, optimizer: torch.optim.Optimizer) -> None:
        """After the masks moved (``constraint`` holds the new ones): rebuild every moved layer's index, read its
        values from the weight (dropped entries are on the plan, grown ones start from it), and move the optimizer
        state of the kept entries to their new positions; grown entries start with zero state."""
        for name, layer in self.layers.items():
            mask = constraint.mask(name)
            new_index = mask.reshape(-1).nonzero().reshape(-1)
            if torch.equal(new_index, layer.index):
                continue
            old_index, old_values = layer.index, layer.values
            state = optimizer.state.pop(old_values, {})
            layer.set_mask(mask)
            kept_old, kept_new = _positions_of_kept(old_index, layer.index)
            moved = {}
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == old_index.shape and value.dim() == 1:
                    fresh = torch.zeros(layer.index.shape, dtype=value.dtype, device=value.device)
                    fresh[kept_new] = value[kept_old]
                    moved[key] = fresh
                else:
                    moved[key] = value
            if layer.values is not old_values:
                _replace_parameter(optimizer, old_values, layer.values)
            if moved:
                optimizer.state[layer.values] = moved

    def state_names(self) -> dict[int, str]:
        """The checkpoint name of every value vector: its weight's name."""
        return {id(layer.values): name for name, layer in self.layers.items()}

    def index_tensors(self) -> dict[str, torch.Tensor]:
        """The flat indices the vector state belongs to (``optimizer-index/<weight>``), for the checkpoint, in the
        narrowest type that holds the weight's positions: uint16 up to 65,536 entries, int32 below 2**31, else
        int64 (the indices are a third of the state of Adam's two moments in int32, a sixth in uint16)."""
        return {INDEX_PREFIX + name: layer.index.cpu().to(index_dtype(layer.weight.numel()))
                for name, layer in self.layers.items()}

    def vectors(self) -> dict[str, torch.Tensor]:
        """The value vector of every engine layer, by its weight's name."""
        return {name: layer.values for name, layer in self.layers.items()}


def index_dtype(size: int) -> torch.dtype:
    """The narrowest integer type of the flat positions of a weight of ``size`` entries."""
    return torch.uint16 if size <= 2**16 else torch.int32 if size < 2**31 else torch.int64


def _positions_of_kept(old_index: torch.Tensor, new_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions in the old and the new (sorted) index vectors of the entries both contain."""
    common = old_index[torch.isin(old_index, new_index)]
    return torch.searchsorted(old_index, common), torch.searchsorted(new_index, common)


def _replace_parameter(optimizer: torch.optim.Optimizer, old: torch.Tensor, new: torch.Tensor) -> None:
    for group in optimizer.param_groups:
        group["params"] = [new if param is old else param for param in group["params"]]
