"""The pipeline as one call: build, score, select, train and write a run directory (resumable).

A run directory holds ``config.json`` (the resolved config), ``masks.safetensors`` (True = trained),
``plan.json`` (the per-layer table), ``checkpoint.safetensors`` (model, optimizer and metrics history
after the last finished epoch), ``metrics.jsonl`` (one line per epoch, written from the checkpoint),
``compress.lock`` (held by the process working on it), and at the end ``model.safetensors`` (the
trained state dict under the model's own names) and ``summary.json``. No pickle anywhere.

Modules: ``pipeline`` (prepare: data, model, scores, plan), ``table`` (the plan table), ``rundir``
(file names and atomic writers), ``staging`` (atomic setup, --overwrite), ``lock`` (one process per
directory), ``checkpoint`` (the source of truth, validated on read), ``summary``, ``runner`` (a new
run), ``resume`` and ``options`` (the CLI's entry points).
"""
from compress.run.checkpoint import Checkpoint, read_checkpoint, save_checkpoint, write_metrics
from compress.run.lock import RunLock
from compress.run.options import plan_from_options, train_from_options
from compress.run.pipeline import (LayerRow, Prepared, check_trains_something, describe_device, load_run_data, log,
                                   plan_rows, plan_run, prepare, resolve_device, scoring_batches)
from compress.run.resume import read_run_config, resume_run
from compress.run.rundir import (CHECKPOINT_FILE, CONFIG_FILE, LOCK_FILE, MASKS_FILE, METRICS_FILE, MODEL_FILE,
                                 PLAN_FILE, RUN_FILES, SUMMARY_FILE, foreign_entries, is_run_directory)
from compress.run.runner import same_config, train_prepared, train_run
from compress.run.staging import check_writable
from compress.run.summary import make_summary
from compress.run.table import format_plan

__all__ = [
    "CHECKPOINT_FILE", "CONFIG_FILE", "LOCK_FILE", "MASKS_FILE", "METRICS_FILE", "MODEL_FILE", "PLAN_FILE",
    "RUN_FILES", "SUMMARY_FILE", "Checkpoint", "LayerRow", "Prepared", "RunLock",
    "check_trains_something", "check_writable", "describe_device", "foreign_entries", "format_plan",
    "is_run_directory", "load_run_data", "log", "make_summary", "plan_from_options", "plan_rows", "plan_run",
    "prepare", "read_checkpoint", "read_run_config", "resolve_device", "resume_run", "same_config",
    "save_checkpoint", "scoring_batches", "train_from_options", "train_prepared", "train_run", "write_metrics",
]
