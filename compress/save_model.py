"""Pack a live model (your own class, not in ``formats.models``) into an artifact: ``compress.save``.

The artifact records the class name and every tensor of the state dict (name, shape, dtype); load it into
a fresh instance with ``formats.load(path, model=MyNet())``. The masks come from a ``Sparse`` (see
``compress.sparsify``), or from a model pruned with ``torch.nn.utils.prune`` (its ``weight_orig`` and
``weight_mask``; the artifact then holds plain ``weight`` tensors, so it loads into an unpruned instance),
or there are none (a dense artifact).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import formats
from compress.errors import UserError
from compress.init import init_rules
from compress.packing import check_run_consistency
from compress.sparsify import Sparse
from formats.artifact import VALUE_DTYPES, custom_architecture, dense_fp32_bytes, parse_artifact, write_artifact
from formats.atomic import check_output_file, write_atomic
from formats.rng import GENERATOR_NAME, GENERATOR_VERSION

PRUNE_SUFFIXES = ("_orig", "_mask")


def save(model: nn.Module, path: str | Path, sparse: Sparse | None = None, *, values: str = "fp16",
         force: bool = False, manifest: dict | None = None) -> dict:
    """Write ``model`` with only its trained values, coded masks and seed to ``path``; returns the byte report
    (``formats.read_info``). An existing ``path`` is replaced only with ``force``."""
    if not isinstance(model, nn.Module):
        raise UserError(f"save takes a torch.nn.Module, got {type(model).__name__}")
    if values not in VALUE_DTYPES:
        raise UserError(f"unknown values {values!r}; known: {', '.join(VALUE_DTYPES)}")
    if sparse is not None and not isinstance(sparse, Sparse):
        raise UserError(f"sparse= takes what compress.sparsify returned, got {type(sparse).__name__}")
    if sparse is not None and sparse.model is not model:
        raise UserError("sparse= belongs to another model: pass the model that compress.sparsify was given")
    path = Path(path)
    check_output_file(path, force)
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    if sparse is not None:
        masks, mode, seed = sparse.masks, sparse.mode, sparse.seed
        check_run_consistency(state, masks, mode, seed, model)
        info = {"method": sparse.method, "score": str(sparse.plan.score), "scope": sparse.plan.scope}
    else:
        state, masks = from_torch_prune(state)
        mode, seed = ("prune" if masks else "dense"), 0
        info = {"method": "torch.nn.utils.prune" if masks else "dense"}
    rules = {name: rule.as_dict() for name, rule in init_rules(model).items()} if mode == "freeze" else {}
    trained = sum(int(torch.count_nonzero(m)) for m in masks.values())
    described = {
        **info,
        "trained_params": trained + sum(p.numel() for n, p in model.named_parameters()
                                        if n not in masks and n.removesuffix("_orig") not in masks),
        "total_params": sum(p.numel() for p in model.parameters()),
        "density": trained / sum(m.numel() for m in masks.values()) if masks else 1.0,
        "test_acc": None, "normalization": {}, **(manifest or {}),
    }
    state = {name: tensor.contiguous() for name, tensor in state.items()}  # channels_last models too
    dense_bytes = dense_fp32_bytes(state)
    try:
        data = write_artifact(state, masks, mode=mode, seed=seed,
                              architecture=custom_architecture(type(model).__qualname__, state), init_rules=rules,
                              manifest=described, values=values, dense_fp32_bytes=dense_bytes,
                              generator={"name": GENERATOR_NAME, "version": GENERATOR_VERSION})
        parse_artifact(data)  # what a reader accepts, checked before anything is written
    except (TypeError, ValueError) as error:
        raise UserError(f"cannot save {type(model).__name__}: {' '.join(str(error).split())}") from None
    write_atomic(path, data, overwrite=force)
    return formats.read_info(path)


def from_torch_prune(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A state dict of ``torch.nn.utils.prune`` (``X_orig`` and ``X_mask``) as plain ``X = X_orig * X_mask``
    tensors, and the masks; other state dicts come back unchanged, without masks."""
    plain, masks = {}, {}
    for name, tensor in state.items():
        if name.endswith("_mask") and name[: -len("_mask")] + "_orig" in state:
            continue
        if name.endswith("_orig") and name[: -len("_orig")] + "_mask" in state:
            base = name[: -len("_orig")]
            mask = state[base + "_mask"].bool()
            plain[base] = torch.where(mask, tensor, torch.zeros((), dtype=tensor.dtype))
            masks[base] = mask
            continue
        plain[name] = tensor
    return plain, masks
