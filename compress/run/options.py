"""What the ``train`` and ``plan`` commands do with their options."""
from __future__ import annotations

import json
from pathlib import Path

from compress.config import build_config
from compress.progress import log_interval
from compress.run.pipeline import plan_run
from compress.run.resume import resume_run
from compress.run.rundir import CONFIG_FILE
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
        return resume_run(resume, progress=progress, device=overrides.get("device"))
    if out is None:
        raise UserError("give a run directory with --out DIR (or continue one with --resume DIR)")
    return train_run(build_config(config_file, overrides), out, overwrite=overwrite, progress=progress)


def plan_from_options(config_file: str | None, overrides: dict, as_json: bool = False) -> str:
    """What ``compress plan`` does: build the config, score and select, and return the table (or JSON)."""
    prepared = plan_run(build_config(config_file, overrides))
    if as_json:
        return json.dumps([{"layer": r.name, "shape": r.shape, "total": r.weights, "trained": r.trained,
                            "density": r.density, "mode": r.mode, "kind": r.kind} for r in prepared.rows], indent=2)
    return format_plan(prepared)
