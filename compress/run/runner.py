"""A new run: check the target, set the run directory up atomically, train, and finish it."""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from compress.config import RunConfig, stored_run_config
from compress.init import initial_values
from compress.run.checkpoint import save_checkpoint, write_metrics
from compress.run.pipeline import Prepared, log, prepare
from compress.run.rundir import (CONFIG_FILE, FINAL_MASKS_FILE, MASKS_FILE, MODEL_FILE, PLAN_FILE, SUMMARY_FILE,
                                 foreign_entries,
                                 level_directory, name_list, read_json, read_json_object, write_json, write_tensors)
from compress.run.staging import Setup, check_writable, resolve_target
from compress.run.summary import make_summary
from compress.training import MaskConstraint, train
from formats.errors import OutputError, UserError


def train_run(config: RunConfig, out: str | Path, *, overwrite: bool = False, progress: bool = True) -> dict:
    """Run the whole pipeline into run directory ``out`` and return the summary.

    An existing finished run with the same config is not retrained (its summary is returned); an
    unfinished or different one is an error unless ``overwrite`` (or resume it with ``resume_run``).
    ``overwrite`` replaces only a run directory that holds nothing but files of this project.
    """
    resolved = config.resolved()
    target = resolve_target(out)
    check_writable(out, target)
    replace = False
    if target.is_dir() and any(target.iterdir()):
        if not overwrite:
            return _existing_run(out, target, resolved)
        _check_replaceable(out, target)
        replace = True
    with Setup(out, target, replace=replace) as setup:
        from compress.run.levels import check_strategy, run_strategy

        prepared = prepare(resolved)
        check_strategy(prepared)
        try:
            _write_setup_files(setup.staging, prepared)
        except OutputError as error:
            raise OutputError(f"cannot set up run directory {out} (nothing was left behind): {error}") from None
        setup.publish()
        return run_strategy(prepared, target, out, progress=progress)


def _existing_run(out, target: Path, resolved: RunConfig) -> dict:
    """The summary of the same finished run in ``target``; anything else there is an error."""
    if (target / SUMMARY_FILE).is_file() and (target / CONFIG_FILE).is_file():
        try:
            stored = read_json(target / CONFIG_FILE, "")
        except UserError:
            stored = None
        if isinstance(stored, dict) and same_config(stored, resolved):
            summary = read_json_object(target / SUMMARY_FILE, "rerun it with --overwrite")
            log(f"{out} already holds this finished run; nothing to do")
            return summary
        raise UserError(f"{out} holds a finished run with a different config; choose another --out or pass --overwrite")
    if (target / CONFIG_FILE).is_file():
        raise UserError(f"{out} already exists and is not empty; continue it with --resume {out}, "
                        "or choose another --out, or pass --overwrite")
    raise UserError(f"{out} already exists and is not a run directory of compress; choose another --out "
                    "(--resume and --overwrite work only on run directories)")


def _check_replaceable(out, target: Path) -> None:
    """--overwrite replaces only a run directory of this project that holds nothing else."""
    foreign = foreign_entries(target)
    if not (target / CONFIG_FILE).is_file():
        held = f"; it holds {name_list(foreign)}" if foreign else ""
        raise UserError(f"--overwrite replaces only a run directory of compress, and {out} is not one (no "
                        f"{CONFIG_FILE}{held}); nothing was deleted: choose another --out")
    if foreign:
        raise UserError(f"{out} holds files compress did not write: {name_list(foreign)}; --overwrite replaces only "
                        "a run directory's own files, so nothing was deleted: move them away or choose another --out")


def _write_setup_files(directory: Path, prepared: Prepared) -> None:
    """config.json, and the files of the first level: in the run directory, or in level_0 (multilevel)."""
    from compress.strategies import STRATEGIES

    write_json(directory / CONFIG_FILE, _jsonable(prepared.config.to_dict()))
    if STRATEGIES.get(prepared.config.strategy).multilevel:
        directory = level_directory(directory, 0)
        directory.mkdir()
    write_level_files(directory, prepared.plan, prepared.rows)


def write_level_files(directory: Path, plan, rows) -> None:
    """What a level starts with: its masks (none when dense), the plan table and an empty metrics file."""
    if plan is not None:
        write_tensors(directory / MASKS_FILE, plan.masks, {"mode": plan.mode, "score": str(plan.score)})
    write_json(directory / PLAN_FILE, [asdict(r) | {"density": r.density} for r in rows])
    write_metrics(directory, [])


RUNTIME_KEYS = ("device", "workers")  # how a run is executed, not what it is: never part of its identity


def same_config(stored: dict, resolved: RunConfig) -> bool:
    """Whether a stored config.json describes ``resolved``; keys added since it was written take defaults,
    and runtime options (the device) do not count."""
    try:
        stored_resolved = stored_run_config(stored).resolved()
    except (ValueError, TypeError):
        return False

    def identity(config: RunConfig) -> dict:
        return {k: v for k, v in _jsonable(config.to_dict()).items() if k not in RUNTIME_KEYS}

    return identity(stored_resolved) == identity(resolved)


def _jsonable(value):
    return json.loads(json.dumps(value))


def train_prepared(prepared: Prepared, out: Path, shown: str | Path, *, start_epoch: int = 0,
                   history: list[dict] | None = None, optimizer_state: dict[str, torch.Tensor] | None = None,
                   progress: bool = True, on_step_end=None, strategy_state: dict | None = None,
                   summary_extra: dict | None = None, label: str = "", quiet_done: bool = False,
                   mask_updater=None) -> dict:
    """Train from ``start_epoch`` (after the epochs of ``history``), checkpointing each epoch, then finish.

    ``out`` is the run directory, or one level's directory for a multilevel strategy; the current masks
    and ``strategy_state`` (with the ``mask_updater``'s state) go into every checkpoint. Masks moved by a
    ``mask_updater`` are written to ``final_masks.safetensors`` at the end, before the model.
    """
    config, model = prepared.config, prepared.model
    history = list(history or [])
    initial = None
    if prepared.plan is not None and prepared.plan.mode == "freeze":
        initial = initial_values(model, config.seed, list(prepared.plan.masks))
    constraint = MaskConstraint(model, prepared.plan, initial)
    masks = {n: m.cpu() for n, m in prepared.plan.masks.items()} if prepared.plan is not None else None
    started = time.perf_counter()
    where = f" ({label})" if label else ""

    def on_epoch_end(epoch: int, metrics: dict, optimizer_tensors: dict[str, torch.Tensor]) -> None:
        history.append(metrics)
        current, state = masks, strategy_state
        if mask_updater is not None:
            current, state = constraint.masks(), {**(strategy_state or {}), **mask_updater.state()}
        save_checkpoint(out, model, optimizer_tensors, history, current, state)  # the truth; metrics follow
        write_metrics(out, history)
        val = f"  val acc {metrics['val_acc']:.2%}" if "val_acc" in metrics else ""
        test = f"  test acc {metrics['test_acc']:.2%}" if "test_acc" in metrics else ""
        log(f"epoch {metrics['epoch']}/{config.epochs}{where}: train loss {metrics['train_loss']:.4f}{test}{val}  "
            f"({metrics['seconds']:.1f} s)")

    try:
        train(model, prepared.data, config.train_settings(), constraint, seed=config.seed, device=prepared.device,
              start_epoch=start_epoch, optimizer_state=optimizer_state, on_epoch_end=on_epoch_end,
              on_step_end=on_step_end, progress=progress, mask_updater=mask_updater,
              loss_scale_state=history[-1].get("loss_scale") if history else None)
        if mask_updater is not None:
            final = constraint.masks()
            write_tensors(out / FINAL_MASKS_FILE, final, {"mode": prepared.plan.mode, "score": str(prepared.plan.score)})
            prepared = dataclasses.replace(prepared, plan=dataclasses.replace(prepared.plan, masks=final))
        write_tensors(out / MODEL_FILE, model.state_dict(), {"format": "compress-run-model", "model": config.model})
        summary = make_summary(prepared, history, time.perf_counter() - started)
        summary.update(summary_extra or {})
        write_json(out / SUMMARY_FILE, summary)
    except OutputError as error:
        raise OutputError(f"{error}; the run keeps its last finished epoch: continue it with --resume {shown} "
                          "once that is fixed") from None
    if not quiet_done:
        log(f"done: test acc {summary['test_acc']:.2%} with {summary['trained_params']:,} of "
            f"{summary['total_params']:,} parameters trained (density {summary['density']:.4%}); run in {shown}")
    return summary
