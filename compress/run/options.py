"""What the ``train`` and ``plan`` commands do with their options."""
from __future__ import annotations

import json
from pathlib import Path

from compress.config import build_config
from compress.distributed import device_for, launched, rank_directory
from compress.progress import log_interval
from compress.run.pipeline import plan_run
from compress.run.resume import read_run_config, resume_run
from compress.run.rundir import CONFIG_FILE, is_run_directory
from compress.run.runner import train_run
from compress.run.table import format_plan
from formats.errors import UserError


def train_from_options(
    config_file: str | None,
    overrides: dict,
    *,
    out: str | None,
    resume: str | None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """What ``compress train`` does: resume ``resume``, or build the config and train into ``out``."""
    if progress:
        log_interval()  # a bad COMPRESS_PROGRESS_SECONDS is refused before anything is written
    given = {k: v for k, v in overrides.items() if v is not None and k != "device"}
    if resume is not None:
        if out is not None or config_file is not None or given or overwrite:
            extra = [f"--{k.replace('_', '-')}" for k in given] + (["--overwrite"] if overwrite else [])
            raise UserError(
                f"--resume takes every setting from {Path(resume) / CONFIG_FILE}; drop --out, --config and "
                f"the other options ({', '.join(extra) or '--out/--config'})"
            )
    elif out is None:
        raise UserError("give a run directory with --out DIR (or continue one with --resume DIR)")
    with launched(overrides.get("device")) as world:
        device = device_for(world, overrides.get("device"))
        shown = progress and world.rank == 0  # one rank reports
        if resume is not None:
            trained_with = read_run_config(Path(resume), resume).world_size if is_run_directory(Path(resume)) else world.size
            if trained_with != world.size:  # (anything else wrong with the directory: resume_run says what)
                launcher = f"torchrun --nproc-per-node {trained_with} -m " if trained_with > 1 else ""
                raise UserError(f"{resume} was trained by {trained_with} process(es), this is {world.size}: resume "
                                f"it with the same number ({launcher}compress train --resume {resume})")
            with rank_directory(world, resume, copy=True) as target:
                return resume_run(target, progress=shown, device=device)
        config = build_config(config_file, {**overrides, "device": device, "world_size": world.size})
        with rank_directory(world, out, copy=False) as target:
            return train_run(config, target, overwrite=overwrite, progress=shown)


def plan_from_options(config_file: str | None, overrides: dict, as_json: bool = False) -> str:
    """What ``compress plan`` does: build the config, score and select, and return the table (or JSON)."""
    prepared = plan_run(build_config(config_file, overrides))
    if as_json:
        return json.dumps([{"layer": r.name, "shape": r.shape, "total": r.weights, "trained": r.trained,
                            "density": r.density, "mode": r.mode, "kind": r.kind} for r in prepared.rows], indent=2)
    return format_plan(prepared)
