"""Resume: continue a run directory from its checkpoint after validating everything read back."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from compress.config import RunConfig, config_from_dict
from compress.run.checkpoint import read_checkpoint, write_metrics
from compress.run.lock import RunLock
from compress.run.pipeline import log, prepare
from compress.run.rundir import CONFIG_FILE, MASKS_FILE, SUMMARY_FILE, read_json_object
from compress.run.runner import train_prepared
from compress.selection import Plan
from formats.errors import UserError


def resume_run(run_dir: str | Path, *, progress: bool = True) -> dict:
    """Continue an interrupted run from its last finished epoch; ends with the uninterrupted weights."""
    shown, run_dir = run_dir, Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{shown} is not a run directory (it does not exist, or its setup never finished); "
                        f"start the run with --out {shown}")
    if not (run_dir / CONFIG_FILE).is_file():
        raise UserError(f"{shown} is not a run directory (no {CONFIG_FILE}); start it with --out")
    with RunLock(run_dir, shown):
        if (run_dir / SUMMARY_FILE).is_file():
            summary = read_json_object(run_dir / SUMMARY_FILE,
                                       f"delete it and run --resume {shown} again to finish the run anew")
            log(f"{shown} is already finished; nothing to resume")
            return summary
        prepared = prepare(read_run_config(run_dir, shown), quiet=True)
        check_masks(run_dir, prepared.plan, shown)
        checkpoint = read_checkpoint(run_dir, prepared.model, prepared.config.train_settings(), shown)
        if checkpoint.model_state:
            prepared.model.load_state_dict(checkpoint.model_state)
        write_metrics(run_dir, checkpoint.history)
        log(f"resuming {shown} after epoch {checkpoint.epoch}")
        return train_prepared(prepared, run_dir, shown, start_epoch=checkpoint.epoch, history=checkpoint.history,
                              optimizer_state=checkpoint.optimizer_state, progress=progress)


def read_run_config(run_dir: Path, shown: str | Path) -> RunConfig:
    """The run's config.json as a resolved config; anything else is a ``UserError`` naming the file."""
    path = run_dir / CONFIG_FILE
    fix = f"restore it, or start a new run with --out {shown} --overwrite and the run's options"
    values = read_json_object(path, fix)
    try:
        return config_from_dict(values, source=str(path)).resolved()
    except (ValueError, TypeError) as error:
        raise UserError(f"{path} does not hold a valid run config ({' '.join(str(error).split())}); {fix}") from None


def check_masks(run_dir: Path, plan: Plan | None, shown: str | Path) -> None:
    """The stored masks must be readable and equal to the recomputed plan."""
    if plan is None:
        return
    path = run_dir / MASKS_FILE
    fix = f"start a new run with --out {shown} --overwrite and the run's options"
    if not path.is_file():
        raise UserError(f"{path} is missing (the run's setup did not finish); {fix}")
    try:
        stored = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise UserError(f"{path} is truncated or corrupted ({' '.join(str(error).split())}); {fix}") from None
    if set(stored) != set(plan.masks):
        raise UserError(f"{path} holds masks of other parameters than the run's model "
                        f"({', '.join(sorted(set(stored) ^ set(plan.masks))[:3])}); {fix}")
    for name, mask in plan.masks.items():
        value = stored[name]
        if value.dtype != torch.bool or value.shape != mask.shape or not torch.equal(value, mask.cpu()):
            raise UserError(f"{run_dir}: the stored mask of {name} differs from the recomputed one (the data, "
                            f"the code or {CONFIG_FILE} changed since the run started); {fix}")
