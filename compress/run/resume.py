"""Resume: continue a run directory from its checkpoint after validating everything read back."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from compress.config import RunConfig, stored_run_config
from compress.run.lock import RunLock
from compress.run.pipeline import log, prepare
from compress.run.rundir import CONFIG_FILE, MASKS_FILE, SUMMARY_FILE, level_directory, read_json_object
from formats.errors import UserError


def resume_run(run_dir: str | Path, *, progress: bool = True, device: str | None = None) -> dict:
    """Continue an interrupted run from its last finished epoch (of its last level); ends with the weights of
    an uninterrupted run. The stored masks are loaded, never scored again. ``device`` overrides the one the
    run started on (a runtime option, not part of the run's identity)."""
    from compress.run.levels import run_strategy, stored_label, stored_masks
    from compress.strategies import STRATEGIES

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
        config = read_run_config(run_dir, shown)
        if device is not None:
            config = dataclasses.replace(config, device=device).resolved()
        strategy = STRATEGIES.get(config.strategy)
        first = level_directory(run_dir, 0) if strategy.multilevel else run_dir
        masks = stored_masks(first, shown)
        if masks is None and strategy.initial_density(config, config.strategy_settings()) is not None:
            raise UserError(f"{first / MASKS_FILE} is missing (the run's setup did not finish); start a new run "
                            f"with --out {shown} --overwrite and the run's options")
        prepared = prepare(config, quiet=True, masks=masks, masks_label=stored_label(first))
        log(f"resuming {shown}")
        return run_strategy(prepared, run_dir, shown, progress=progress)


def read_run_config(run_dir: Path, shown: str | Path) -> RunConfig:
    """The run's config.json as a resolved config; anything else is a ``UserError`` naming the file."""
    path = run_dir / CONFIG_FILE
    fix = f"restore it, or start a new run with --out {shown} --overwrite and the run's options"
    values = read_json_object(path, fix)
    try:
        return stored_run_config(values, source=str(path)).resolved()
    except (ValueError, TypeError) as error:
        raise UserError(f"{path} does not hold a valid run config ({' '.join(str(error).split())}); {fix}") from None
