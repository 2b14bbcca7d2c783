"""The files of a run directory: their names, which names the project writes, and their atomic writers.

Every file of a run directory is written through ``formats.atomic.write_atomic`` (temporary, fsync,
rename, directory fsync), so a kill or a full disk leaves the old file or the whole new one.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from formats.artifact import SAFETENSORS_DTYPE_NAMES, safetensors_header
from formats.atomic import write_atomic
from formats.errors import UserError

CONFIG_FILE = "config.json"
MASKS_FILE = "masks.safetensors"
PLAN_FILE = "plan.json"
CHECKPOINT_FILE = "checkpoint.safetensors"
METRICS_FILE = "metrics.jsonl"
MODEL_FILE = "model.safetensors"
SUMMARY_FILE = "summary.json"
LOCK_FILE = "compress.lock"
REWIND_FILE = "rewind.safetensors"  # multilevel strategies: the weights at the rewind point of level 0
FINAL_MASKS_FILE = "final_masks.safetensors"  # masks that moved during training: those the model ended with

RUN_FILES = (CONFIG_FILE, MASKS_FILE, PLAN_FILE, CHECKPOINT_FILE, METRICS_FILE, MODEL_FILE, SUMMARY_FILE, LOCK_FILE,
             REWIND_FILE, FINAL_MASKS_FILE)
# the sub-directories of multilevel strategies: level_K, and the branches level_K/branch_NAME
_LEVEL = re.compile(r"^(level_[0-9]+|branch_[a-z]+)$")


def level_directory(run_dir: Path, level: int, branch: str | None = None) -> Path:
    """``RUN/level_K`` (or ``RUN/level_K/branch_NAME``): one level of a multilevel strategy."""
    directory = run_dir / f"level_{level}"
    return directory / f"branch_{branch}" if branch else directory

# write_atomic's temporaries: .NAME.PID.RANDOM.tmp
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.\d+\.[0-9a-f]+\.tmp$")


def is_project_file(path: Path) -> bool:
    """Whether ``path`` is a plain file the project writes into a run directory (or a temporary of one), or a
    level directory holding only such files."""
    if path.is_symlink():
        return False
    if path.is_dir():
        return bool(_LEVEL.match(path.name)) and all(is_project_file(entry) for entry in path.iterdir())
    if not path.is_file():
        return False
    if path.name in RUN_FILES:
        return True
    match = _TEMPORARY.match(path.name)
    return bool(match) and match["name"] in RUN_FILES


def foreign_entries(directory: Path) -> list[str]:
    """The names in ``directory`` that the project did not write, sorted (directories end in ``/``)."""
    return sorted(p.name + ("/" if p.is_dir() else "") for p in directory.iterdir() if not is_project_file(p))


def is_run_directory(directory: Path) -> bool:
    """A run directory of this project: it has a config.json and holds only files the project writes."""
    return (directory / CONFIG_FILE).is_file() and not foreign_entries(directory)


def name_list(names: list[str], limit: int = 5) -> str:
    """``a, b, c`` or ``a, b, c and 4 more``."""
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


def write_json(path: Path, value) -> None:
    write_atomic(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """A safetensors file of ``tensors`` written atomically, streamed tensor by tensor from their memory:
    ``safetensors.torch.save`` would first build the whole file in memory, a second copy of a large model."""
    header, ordered = safetensors_header(
        {name: (SAFETENSORS_DTYPE_NAMES[t.dtype], list(t.shape), t.numel() * t.element_size())
         for name, t in tensors.items()}, metadata)

    def write(file) -> None:
        file.write(header)
        for name in ordered:  # one tensor at a time: a copy only of a tensor not contiguous on the CPU
            file.write(tensors[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())

    write_atomic(path, write)


def read_json(path: Path, fix: str):
    """The JSON value in ``path``; a missing or unreadable file is a ``UserError`` ending in ``fix``."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path} is missing; {fix}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read {path} ({error}); {fix}") from None
    try:
        return json.loads(text)
    except ValueError as error:
        raise UserError(f"{path} is not valid JSON ({error}); {fix}") from None


def read_json_object(path: Path, fix: str) -> dict:
    value = read_json(path, fix)
    if not isinstance(value, dict):
        raise UserError(f"{path} holds a JSON {type(value).__name__}, not an object; {fix}")
    return value


def read_tensor_file(path: Path, what: str, fix: str) -> dict[str, torch.Tensor]:
    """A safetensors file of a run directory; a missing or damaged one is a ``UserError`` ending in ``fix``."""
    if not path.is_file():
        raise UserError(f"{path} is missing ({what}); {fix}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise UserError(f"{path} is truncated or corrupted ({what}: {' '.join(str(error).split())}); {fix}") from None
