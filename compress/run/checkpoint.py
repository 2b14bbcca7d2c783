"""The checkpoint: the single source of truth of a run in progress.

``checkpoint.safetensors`` holds the model and optimizer after the last finished epoch, and in its
metadata that epoch and the metrics history of every epoch so far (JSON). ``metrics.jsonl`` is
written from that history after each checkpoint and rebuilt from it on resume, so a kill between the
two writes loses nothing. Everything read back is validated: a damaged file is a ``UserError``.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from compress.run.rundir import CHECKPOINT_FILE, METRICS_FILE, write_tensors
from compress.engine import INDEX_PREFIX
from compress.training import TrainSettings, optimizer_state_keys
from formats.atomic import write_atomic
from formats.errors import UserError

CHECKPOINT_FORMAT = "compress-run-checkpoint"


@dataclass
class Checkpoint:
    """What a resume starts from: the finished epochs, their metrics, and the model/optimizer tensors."""

    epoch: int
    history: list[dict]
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor] | None = None  # the masks at that epoch, when they move within a level
    strategy: dict = field(default_factory=dict)  # the strategy's state kept in the checkpoint


def save_checkpoint(run_dir: Path, model: nn.Module, optimizer_tensors: dict[str, torch.Tensor], history: list[dict],
                    masks: dict[str, torch.Tensor] | None = None, strategy: dict | None = None) -> None:
    """Write the checkpoint after epoch ``len(history)``: model, optimizer state (``optimizer_state_tensors``), the
    current masks, and in its metadata the metrics history and the strategy's state (JSON)."""
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    tensors.update(optimizer_tensors)
    tensors.update({f"mask/{name}": pack_mask(mask) for name, mask in (masks or {}).items()})
    metadata = {"format": CHECKPOINT_FORMAT, "epoch": str(len(history)),
                "metrics": json.dumps(history, sort_keys=True), "keys": json.dumps(sorted(tensors)),
                "strategy": json.dumps(strategy or {}, sort_keys=True)}
    write_tensors(run_dir / CHECKPOINT_FILE, tensors, metadata)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A mask as bits (uint8, 8 entries a byte, numpy's packbits order): an eighth of its bool bytes."""
    return torch.from_numpy(np.packbits(mask.detach().cpu().numpy().reshape(-1)))


def write_metrics(run_dir: Path, history: list[dict]) -> None:
    """``metrics.jsonl`` as a whole, one line per epoch, from the history."""
    write_atomic(run_dir / METRICS_FILE, "".join(json.dumps(m, sort_keys=True) + "\n" for m in history).encode())


def read_checkpoint(run_dir: Path, model: nn.Module, settings: TrainSettings, shown: str | Path,
                    masks: dict[str, torch.Tensor] | None = None, moving: bool = False) -> Checkpoint:
    """The validated checkpoint of ``run_dir`` for ``model``; epoch 0 (nothing) when there is none yet.

    Masks in the checkpoint must equal ``masks`` (the level's stored masks); with ``moving`` (masks that
    move during training) they are the masks of that epoch, returned, and must train as many entries of
    every parameter as ``masks`` do."""
    path = run_dir / CHECKPOINT_FILE
    if not path.exists():
        return Checkpoint(0, [], {}, {})
    fix = f"delete it to restart the run from epoch 0, or start a new run with --out {shown} --overwrite"

    def bad(problem: str) -> UserError:
        return UserError(f"{path} {problem}: {fix}")

    try:
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise bad(f"is truncated or corrupted ({' '.join(str(error).split())})") from None
    epoch = _epoch(metadata.get("epoch"), settings.epochs, bad)
    history = _history(metadata, epoch, run_dir, bad)
    recorded = metadata.get("keys")
    if recorded is not None:
        try:
            recorded = json.loads(recorded)
        except ValueError:
            recorded = None
        if not isinstance(recorded, list):
            raise bad("has a damaged key list in its metadata")
        missing = sorted(set(recorded) - set(tensors))
        if missing:
            raise bad(f"lacks the tensor(s) {', '.join(missing[:3])}")
    stored_masks = {k[len("mask/"):]: tensors.pop(k) for k in list(tensors) if k.startswith("mask/")}
    moved = None
    if moving and epoch:
        moved = _moved_masks(stored_masks, masks or {}, bad)
    elif stored_masks and (sorted(stored_masks) != sorted(masks or {})
                           or any(not torch.equal(stored_masks[n], pack_mask(masks[n])) for n in stored_masks)):
        raise bad(f"holds masks that differ from {run_dir}'s masks.safetensors")
    model_state = _model_state(tensors, model, bad)
    optimizer_state = _optimizer_state(tensors, model, settings, bad)
    try:
        strategy = json.loads(metadata.get("strategy", "{}"))
    except (ValueError, RecursionError):
        strategy = None
    if not isinstance(strategy, dict):
        raise bad("has a damaged strategy state in its metadata")
    return Checkpoint(epoch, history, model_state, optimizer_state, moved, strategy)


def unpack_mask(bits: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of ``pack_mask`` for a mask of ``shape``."""
    count = int(np.prod(shape, dtype=np.int64))
    flat = np.unpackbits(bits.numpy().astype(np.uint8, copy=False), count=count)
    return torch.from_numpy(flat.astype(bool)).reshape(shape)


def _moved_masks(stored: dict[str, torch.Tensor], start: dict[str, torch.Tensor], bad) -> dict[str, torch.Tensor]:
    """The masks a checkpoint holds for moving masks: one per masked parameter, with its start's count."""
    if sorted(stored) != sorted(start):
        raise bad("holds masks of other parameters than the run's masks.safetensors")
    masks = {}
    for name, mask in start.items():
        bits = stored[name]
        if bits.dtype != torch.uint8 or bits.dim() != 1 or bits.numel() != (mask.numel() + 7) // 8:
            raise bad(f"holds a mask of {name} that is not {mask.numel()} packed bits")
        masks[name] = unpack_mask(bits, mask.shape)
        stored_count, run_count = int(torch.count_nonzero(masks[name])), int(torch.count_nonzero(mask))
        if stored_count != run_count:
            raise bad(f"holds a mask of {name} training {stored_count} entries, not the run's {run_count}")
    return masks


def _epoch(raw, epochs: int, bad) -> int:
    if raw is None:
        raise bad("has no epoch number in its metadata")
    if not isinstance(raw, str) or not re.fullmatch(r"[0-9]{1,9}", raw) or int(raw) > epochs:
        raise bad(f"has epoch {raw!r}, not a whole number from 0 to the run's {epochs} epochs")
    return int(raw)


def _history(metadata: dict, epoch: int, run_dir: Path, bad) -> list[dict]:
    """The metrics of epochs 1..epoch: from the checkpoint, or (checkpoints of older versions) metrics.jsonl."""
    if "metrics" in metadata:
        try:
            history = json.loads(metadata["metrics"])
        except ValueError:
            raise bad("has a damaged metrics history in its metadata") from None
        where = "its metrics history"
    else:
        try:
            lines = (run_dir / METRICS_FILE).read_text(encoding="utf-8").splitlines()
            history = [json.loads(line) for line in lines[:epoch]]
        except (OSError, ValueError):
            raise bad(f"has no metrics history and {METRICS_FILE} cannot be read") from None
        where = f"{METRICS_FILE} (the checkpoint has no metrics history)"
    if not isinstance(history, list) or len(history) != epoch:
        raise bad(f"is at epoch {epoch} but {where} does not hold exactly {epoch} epochs")
    for number, metrics in enumerate(history, start=1):
        if (not isinstance(metrics, dict) or metrics.get("epoch") != number or isinstance(metrics.get("epoch"), bool)
                or not _is_number(metrics.get("train_loss"))):
            raise bad(f"has a damaged entry for epoch {number} in {where}")
    return history


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _model_state(tensors: dict[str, torch.Tensor], model: nn.Module, bad) -> dict[str, torch.Tensor]:
    expected = model.state_dict()
    state = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    missing = [k for k in expected if k not in state]
    if missing:
        raise bad(f"lacks the model tensor(s) {', '.join(missing[:3])}")
    unknown = sorted(set(state) - set(expected))
    if unknown:
        raise bad(f"holds model tensor(s) this run's model does not have ({', '.join(unknown[:3])})")
    for name, value in expected.items():
        if state[name].shape != value.shape or state[name].dtype != value.dtype:
            raise bad(f"holds {name} as {state[name].dtype} {list(state[name].shape)}, but the model has "
                      f"{value.dtype} {list(value.shape)}")
    return state


def _optimizer_state(tensors: dict[str, torch.Tensor], model: nn.Module, settings: TrainSettings,
                     bad) -> dict[str, torch.Tensor]:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    needed = optimizer_state_keys(settings)
    state, seen = {}, {}
    vector_lengths = {}  # the sparse engine's state: vectors over the trained entries at these flat indices
    for key, value in tensors.items():
        if key.startswith(INDEX_PREFIX):
            name = key[len(INDEX_PREFIX):]
            if name not in params or not _valid_index(value, params[name].numel()):
                raise bad(f"holds {key}, which is not a sorted index into a parameter of this run's model")
            vector_lengths[name] = value.numel()
            state[key] = value
    for key, value in tensors.items():
        if key.startswith("model/") or key.startswith(INDEX_PREFIX):
            continue
        if not key.startswith("optimizer/") or key.count("/") < 2:
            raise bad(f"holds an unexpected tensor {key}")
        name, state_key = key[len("optimizer/"):].rsplit("/", 1)
        if name not in params or state_key not in needed:
            raise bad(f"holds optimizer state {key} that this run's {settings.optimizer} optimizer does not use")
        entries = torch.Size([vector_lengths[name]]) if name in vector_lengths else params[name].shape
        expected_shape = torch.Size([]) if state_key == "step" else entries
        if value.shape != expected_shape or not value.is_floating_point():
            raise bad(f"holds optimizer state {key} of shape {list(value.shape)}, expected {list(expected_shape)}")
        state[key] = value
        seen.setdefault(name, set()).add(state_key)
    for name, keys in seen.items():
        if keys != needed:
            raise bad(f"lacks optimizer state {', '.join(sorted(needed - keys))} of {name}")
    orphans = sorted(set(vector_lengths) - set(seen))
    if orphans:
        raise bad(f"holds an index of optimizer state but no state of {', '.join(orphans[:3])}")
    return state


def _valid_index(index: torch.Tensor, size: int) -> bool:
    """A 1-D uint16/int32/int64 tensor of strictly increasing flat positions below ``size``."""
    if index.dtype not in (torch.uint16, torch.int32, torch.int64) or index.dim() != 1:
        return False
    if index.numel() == 0:
        return True
    index = index.to(torch.int64)  # uint16 has no comparisons on the CPU
    return bool(index[0] >= 0) and bool(index[-1] < size) and bool((index[1:] > index[:-1]).all())
