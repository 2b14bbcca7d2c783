"""A strategy's levels in a run directory: each level trains once, a finished level is skipped, and an
interrupted one continues from its checkpoint (bit-exact, on the CPU).

A single-level strategy (``oneshot``) trains in the run directory itself. A multilevel one (``imp``)
keeps level K in ``level_K/`` (its masks, plan, checkpoint, metrics, model and summary; level 0 also
the weights at the rewind point), its control branches in ``level_K/branch_NAME/``, and writes the
run's ``summary.json`` (the last level's, with a table of every level) when the last level is done.
The masks of a level are stored when it starts and loaded, never recomputed, when it is resumed.
"""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from compress.params import compressible_parameters
from compress.run.checkpoint import read_checkpoint, write_metrics
from compress.run.pipeline import Prepared, initialised_model, log, plan_from_masks, plan_rows
from compress.run.rundir import (FINAL_MASKS_FILE, MASKS_FILE, MODEL_FILE, REWIND_FILE, SUMMARY_FILE, level_directory,
                                 read_json_object, read_tensor_file, write_json, write_tensors)
from compress.run.runner import train_prepared, write_level_files
from compress.run.staging import remove_stale_siblings, sibling
from compress.selection import Plan
from compress.strategies import STRATEGIES, LevelContext
from formats.atomic import fsync_directory, output_error
from formats.errors import OutputError, UserError


def _fix(shown: str | Path) -> str:
    return f"start a new run with --out {shown} --overwrite and the run's options"


def stored_masks(directory: Path, shown: str | Path, name: str = MASKS_FILE) -> dict[str, torch.Tensor] | None:
    """The masks a level was started with (None: a dense level), or another masks file of it, checked to be
    boolean."""
    path = directory / name
    if not path.exists():
        return None
    masks = read_tensor_file(path, "the level's masks", _fix(shown))
    bad = sorted(name for name, mask in masks.items() if mask.dtype != torch.bool)
    if bad:
        raise UserError(f"{path} holds non-boolean masks ({', '.join(bad[:3])}); {_fix(shown)}")
    return masks


def stored_label(directory: Path) -> str:
    """How a level's plan was described when it started (the summary's "score"), from its masks' metadata."""
    try:
        with safe_open(str(directory / MASKS_FILE), "pt") as handle:
            return (handle.metadata() or {}).get("score", "")
    except (SafetensorError, OSError, RuntimeError, ValueError):
        return ""


def level_context(prepared: Prepared) -> LevelContext:
    config, model = prepared.config, prepared.model
    params = compressible_parameters(model, config.include_bias)

    def fresh_state(seed: int) -> dict[str, torch.Tensor]:
        fresh, _ = initialised_model(config, prepared.data, seed)
        return {k: v.detach().clone() for k, v in fresh.state_dict().items()}

    return LevelContext(config=config, options=config.strategy_settings(), params=params,
                        shapes={n: tuple(model.get_parameter(n).shape) for n in params},
                        initial_state={k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                        fresh_state=fresh_state)


def _create_level_directory(directory: Path, plan: Plan | None, rows) -> None:
    """Set a level's directory up atomically: written beside it under a temporary name, then renamed."""
    remove_stale_siblings(directory)
    staging = sibling(directory, "setup")
    try:
        staging.mkdir()
        write_level_files(staging, plan, rows)
        os.rename(staging, directory)
        fsync_directory(directory.parent)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise output_error(directory, error) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def run_level(prepared: Prepared, directory: Path, shown: str | Path, plan: Plan | None,
              state: dict[str, torch.Tensor] | None, *, level: int | None = None, branch: str | None = None,
              rewind_at: int | None = None, progress: bool = True,
              keep_trained: bool = True) -> tuple[dict, dict[str, torch.Tensor] | None, Plan | None]:
    """Train one level in ``directory`` (created if new; resumed or skipped if not); returns its summary, its
    final weights (a copy; None without ``keep_trained``: a single level needs none, and a large model's copy
    costs its size) and the plan it trained under (its stored masks). ``state`` is the full state dict the level
    starts from (None: the model as it is)."""
    config, model = prepared.config, prepared.model
    finished = (directory / SUMMARY_FILE).is_file()
    if not finished and not directory.is_dir():
        _create_level_directory(directory, plan, plan_rows(model, plan, config.mode))
    masks = stored_masks(directory, shown)
    if masks is not None and plan is not None and _same_masks(masks, plan.masks):
        masks = plan.masks  # what was just stored: keep one copy of the masks in memory, not two
    if masks is not None:
        plan = plan_from_masks(config, model, masks, stored_label(directory) or (plan.score if plan else "stored"))
    elif plan is not None:
        raise UserError(f"{directory / MASKS_FILE} is missing; start a new run with --out {shown} --overwrite")
    strategy = STRATEGIES.get(config.strategy)
    if finished:
        summary = read_json_object(directory / SUMMARY_FILE, f"delete {directory} and resume to train it again")
        final = stored_masks(directory, shown, FINAL_MASKS_FILE) if strategy.moving_masks else None
        if final is not None:
            plan = plan_from_masks(config, model, final, plan.score)
        trained = (read_tensor_file(directory / MODEL_FILE, "the level's trained model", _fix(shown))
                   if keep_trained else None)
        return summary, trained, plan
    if state is not None:
        model.load_state_dict(state)
    moving = strategy.moving_masks and plan is not None
    checkpoint = read_checkpoint(directory, model, config.train_settings(), shown,
                                 plan.masks if plan is not None else None, moving=moving)
    if checkpoint.model_state:
        model.load_state_dict(checkpoint.model_state)
    mask_updater = None
    if moving:
        if checkpoint.masks is not None:
            plan = plan_from_masks(config, model, checkpoint.masks, plan.score)
        mask_updater = strategy.mask_updater(config, config.strategy_settings(), steps_per_epoch(prepared),
                                             checkpoint.epoch * steps_per_epoch(prepared), checkpoint.strategy)
    write_metrics(directory, checkpoint.history)
    on_step_end = None
    if rewind_at is not None:
        rewind = directory / REWIND_FILE
        if rewind_at == 0 and not rewind.exists():
            write_tensors(rewind, model.state_dict())

        def on_step_end(step: int) -> None:
            if step + 1 == rewind_at:
                write_tensors(rewind, model.state_dict())
    if checkpoint.epoch:
        log(f"resuming {directory} after epoch {checkpoint.epoch}")
    label = " ".join(part for part in (f"level {level}" if level is not None else "",
                                       f"branch {branch}" if branch else "") if part)
    extra = {"level": level, "branch": branch, "strategy": config.strategy} if level is not None else {}
    summary = train_prepared(dataclasses.replace(prepared, plan=plan, rows=plan_rows(model, plan, config.mode)),
                             directory, shown, start_epoch=checkpoint.epoch, history=checkpoint.history,
                             optimizer_state=checkpoint.optimizer_state, progress=progress, on_step_end=on_step_end,
                             strategy_state={"strategy": config.strategy, "level": level, "branch": branch},
                             summary_extra=extra, label=label,
                             quiet_done=level is not None, mask_updater=mask_updater)
    trained = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()} if keep_trained else None
    return summary, trained, plan


def _same_masks(stored: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> bool:
    return stored.keys() == masks.keys() and all(
        stored[name].shape == masks[name].shape and torch.equal(stored[name].bool(), masks[name].cpu().bool())
        for name in masks)


def _level_row(summary: dict) -> dict:
    keys = ("level", "density", "trained_compressible_params", "trained_params", "test_acc", "epochs",
            "train_seconds")
    return {key: summary.get(key) for key in keys}


def steps_per_epoch(prepared: Prepared) -> int:
    return math.ceil(len(prepared.data.train) / prepared.config.batch_size)


def check_strategy(prepared: Prepared) -> None:
    """The strategy's checks against the model and the data (before the run directory is made)."""
    config = prepared.config
    sizes = {n: prepared.model.get_parameter(n).numel() for n in compressible_parameters(prepared.model, config.include_bias)}
    STRATEGIES.get(config.strategy).check_model(config, config.strategy_settings(), sizes, steps_per_epoch(prepared))


def run_strategy(prepared: Prepared, run_dir: Path, shown: str | Path, *, progress: bool = True) -> dict:
    """Train every level of the run's strategy in ``run_dir`` and return the run's summary."""
    config = prepared.config
    strategy = STRATEGIES.get(config.strategy)
    if not strategy.multilevel:
        return run_level(prepared, run_dir, shown, prepared.plan, None, progress=progress, keep_trained=False)[0]
    options = config.strategy_settings()
    context = level_context(prepared)
    check_strategy(prepared)
    rewind_at = strategy.rewind_step(options, steps_per_epoch(prepared))
    plan, state, level, rows = prepared.plan, context.initial_state, 0, []
    rewind_state = None
    while True:
        summary, trained, plan = run_level(prepared, level_directory(run_dir, level), shown, plan, state,
                                           level=level, rewind_at=rewind_at if level == 0 else None, progress=progress)
        if level == 0 and rewind_at is not None:
            rewind_state = read_tensor_file(level_directory(run_dir, 0) / REWIND_FILE, "the rewind point", _fix(shown))
        row = _level_row(summary)
        log(f"level {level}: density {summary['density']:.4%}, test acc {summary['test_acc']:.2%}")
        for branch in strategy.branches(options) if level > 0 else []:
            start = strategy.branch_start(context, branch, level, plan, rewind_state)
            branch_summary, _, _ = run_level(prepared, level_directory(run_dir, level, branch), shown, start.plan,
                                          start.state, level=level, branch=branch, progress=progress,
                                          keep_trained=False)
            row.setdefault("branches", {})[branch] = _level_row(branch_summary)
            log(f"level {level} branch {branch}: test acc {branch_summary['test_acc']:.2%}")
        rows.append(row)
        following = strategy.next_level(context, level, trained, plan, rewind_state)
        if following is None:
            break
        level, plan, state = level + 1, following.plan, following.state
    result = dict(summary, levels=rows, level=level,
                  total_epochs=sum(r["epochs"] for r in rows) + sum(b["epochs"] for r in rows for b in r.get("branches", {}).values()),
                  total_train_seconds=round(sum(r["train_seconds"] for r in rows)
                                            + sum(b["train_seconds"] for r in rows for b in r.get("branches", {}).values()), 3))
    try:
        write_json(run_dir / SUMMARY_FILE, result)
    except OutputError as error:
        raise OutputError(f"{error}; continue the run with --resume {shown} once that is fixed") from None
    log(f"done: {level + 1} levels; last level: test acc {summary['test_acc']:.2%} with "
        f"{summary['trained_params']:,} of {summary['total_params']:,} parameters trained (density "
        f"{summary['density']:.4%}); run in {shown}")
    return result
