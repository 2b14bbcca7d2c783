"""Reproduce the papers' comparisons on real Fashion-MNIST: train, pack and tabulate every run.

    python examples/reproduce/sweep.py --quick            # a small slice, under 10 minutes on 2 cores
    python examples/reproduce/sweep.py                    # the full sweep (hours; resumable, in parts)
    python examples/reproduce/sweep.py --part lenet       # only the LeNet part (or lottery, dynamic, resnet)
    python examples/reproduce/sweep.py --part lenet --models lenet300   # one model of a part
    python examples/reproduce/sweep.py --dry-run          # what is left to run and how long it should take
    python examples/reproduce/sweep.py --report           # redraw tables and plots from the record only
    python examples/reproduce/sweep.py --part lenet --models lenet5 --device cuda --jobs 12   # on a GPU
    python examples/reproduce/sweep.py --methods freezenet --densities 0.0064 --only-seed 0   # one setting

Part "lenet": LeNet-300-100 and LeNet-5-Caffe, dense and at densities 10%, 5%, 2%, 1%, 0.64% (157x),
0.3%, 0.1% with SNIP (prune), FreezeNet (SNIP score, freeze), random (freeze), GraSP, SynFlow and COPS
(snip+grasp, gamma 0.5), 3 seeds each, 10 epochs on the full 60k training set.
Part "lottery": lottery tickets (IMP, open_lth's definition) on the LeNets, prune and freeze mode: one run per
model, mode and seed removes half of the still-trained weights per level (rewind to init) down to 0.1%; every
level trains 10 epochs, as one at-init run does in total, so IMP's accuracy at a density costs (levels + 1)
times the training; each level is a row at its nominal density 0.5^level, with the training seconds of all
levels up to it. On resnet20 (the resnet part's settings), IMP against IP-IMP (IMP on interspace
coefficients) down to 2%.
Part "dynamic": dynamic sparse training, RigL and SET (prune and freeze mode, ERK per-layer densities, the
defaults of `compress train`: masks moved every 100 steps before 75% of training, 30% at first, cosine-decayed)
on LeNet-5-Caffe at the LeNet densities, 10 epochs like the at-init runs; and IP-RigL (RigL on interspace
coefficients) against RigL on resnet20 with the resnet part's settings.
Part "cops": COPS on LeNet-5-Caffe at 1% and 0.5% with gamma 0.25, 0.5, 0.75, 0.9 and the score pairs
(snip, grasp) and (snip, synflow), and SNIP, GraSP and SynFlow alone at the same densities, 3 seeds: whether any
setting reaches the better of its two scores.
Part "long": dense, FreezeNet and SNIP at 0.64% on LeNet-5-Caffe for 60 epochs, 3 seeds: whether the gap to
dense closes with longer training (the FreezeNet paper's 99.2% of dense was after full training on MNIST).
Part "resnet": resnet20 on 5,000 training images (a random subset drawn from the run's seed, so each
seed has its own and every method of a seed the same; test: all 10k),
dense and standard against interspace pruning for SNIP, SynFlow and FreezeNet at densities 10%, 5%, 2%,
SynFlow through the absolute composed filters (synflow-composed+ip, interspace only), and interspace pruning
with its trained bases counted inside the density (snip/synflow/freezenet+ip-budget: --basis-in-budget), 3
seeds, 10 epochs, tested after the last epoch only (--eval-every 10, the test pass would cost a third of the
time).

Every method uses the same hyperparameters (the model's defaults of `compress train`: SGD, momentum
0.9, cosine schedule, batch 128, weight decay 5e-4 (1e-4 for resnet20), lr 0.05 for LeNets and 0.1
for resnet20) and the same epochs. Every run is packed (fp16 values).

Every finished run is one row of the record (`runs.csv` in the results directory, for the full sweep
docs/benchmarks/full/, which is committed): a run whose row is there with the same settings is not
trained again, so the sweep can be completed in parts, on different machines. Run directories
(checkpoints, artifacts) go to --out; an interrupted run resumes from its last epoch. The tables
(`results.md`, `results.json`) and plots (PNG, one per model) are drawn from the whole record.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import multiprocessing
import os
import re
import statistics
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import redirect_stderr
from dataclasses import dataclass, field
from pathlib import Path

LENET_DENSITIES = [0.1, 0.05, 0.02, 0.01, 0.0064, 0.003, 0.001]
RESNET_DENSITIES = [0.1, 0.05, 0.02]
LENET_METHODS = {
    "snip": {"method": "snip"},
    "freezenet": {"method": "freezenet"},
    "random-freeze": {"method": "random", "mode": "freeze"},
    "grasp": {"method": "grasp"},
    "synflow": {"method": "synflow"},
    "cops": {"method": "cops", "scores": "snip,grasp", "gamma": 0.5},
}
RESNET_METHODS = {"snip": {"method": "snip"}, "synflow": {"method": "synflow"}, "freezenet": {"method": "freezenet"}}
# SynFlow through the absolute composed filters |lam F| of interspace layers (on standard layers it is synflow):
# interspace only, beside synflow+ip, whose |lam| |F| is the reference code's linearisation.
RESNET_IP_ONLY_METHODS = {"synflow-composed": {"method": "synflow", "score": "synflow-composed"}}
# Interspace pruning at equal trained parameters (issue 17): --basis-in-budget counts the trained basis entries inside
# the density, so that "+ip-budget" trains as many parameters as the standard run at the same density.
RESNET_IP_BUDGET_METHODS = {"snip": {"method": "snip"}, "synflow": {"method": "synflow"},
                            "freezenet": {"method": "freezenet"}}
# SNIP and GraSP score in eval mode by default (as the references), but every run recorded before --score-mode
# existed scored in train mode, and a run of the sweep still does unless its options say otherwise
# (RECORDED_SCORE_MODE), so recorded rows stay valid. These runs score resnet20 (BatchNorm: the modes differ) in
# eval mode, to compare with the train-mode rows of snip (issue 17).
RECORDED_SCORE_MODE = "train"
# Every recorded run trained on the dense engine; the sweep keeps it (the sparse engine agrees to floating-point
# tolerance, not bit for bit), so that a recorded row and a rerun of it are the same run.
RECORDED_ENGINE = "dense"
RESNET_SCORE_MODE_METHODS = {"snip-eval": {"method": "snip", "score_mode": "eval"},
                             "grasp": {"method": "grasp", "score_mode": "train"},
                             "grasp-eval": {"method": "grasp", "score_mode": "eval"}}
# Lottery tickets: one IMP run per model, mode and seed prunes half the remaining weights per level down to the
# target; every level (trained `epochs` epochs, like one at-init run) is a row at its density.
LOTTERY_METHODS = {"imp": {"method": "imp", "prune_fraction": 0.5},
                   "imp-freeze": {"method": "imp", "mode": "freeze", "prune_fraction": 0.5}}
LOTTERY_TARGET = 0.001
# IP-IMP against IMP on resnet20 (the resnet part's settings), down to the resnet part's lowest density.
LOTTERY_RESNET_METHODS = {"imp": {"method": "imp", "prune_fraction": 0.5},
                          "imp+ip": {"method": "imp", "prune_fraction": 0.5, "interspace": True}}
LOTTERY_RESNET_TARGET = 0.02
# Dynamic sparse training (ERK per-layer densities, --update-every 100, --drop-fraction 0.3, --update-until 0.75:
# the defaults) on LeNet-5-Caffe at the LeNet densities, and IP-RigL against RigL on resnet20.
# random-erk(-freeze): the same random ERK masks kept fixed, the control that separates moving the mask from
# allocating it by ERK.
DYNAMIC_METHODS = {"rigl": {"method": "rigl"}, "rigl-freeze": {"method": "rigl", "mode": "freeze"},
                   "set": {"method": "set"}, "set-freeze": {"method": "set", "mode": "freeze"},
                   "random-erk-freeze": {"method": "random", "mode": "freeze", "scope": "erk"}}
DYNAMIC_RESNET_METHODS = {"rigl": {"method": "rigl"}, "rigl+ip": {"method": "rigl", "interspace": True},
                          "random-erk": {"method": "random", "scope": "erk"}}
# COPS settings beyond the paper's one (issue 17): gamma and the score pair, on LeNet-5-Caffe at 1% and 0.5%.
COPS_GAMMAS = (0.25, 0.5, 0.75, 0.9)
COPS_PAIRS = ("snip,grasp", "snip,synflow")
COPS_DENSITIES = (0.01, 0.005)
# The single scores COPS combines, at the same densities in the same part: the claim compares COPS with the better
# of its two scores, and the lenet part has no run at 0.5%.
COPS_SINGLE_SCORES = ("snip", "grasp", "synflow")
# Long training (issue 17): does the gap to dense close after 60 epochs? LeNet-5-Caffe at 0.64% (157x).
LONG_METHODS = {"dense": {"method": "dense"}, "freezenet": {"method": "freezenet", "density": 0.0064},
                "snip": {"method": "snip", "density": 0.0064}}
LONG_EPOCHS = 60
FULL = {"seeds": 3, "lenet_epochs": 10, "lenet_subset": None, "resnet_epochs": 10, "resnet_subset": 5000}
QUICK = {"seeds": 1, "lenet_epochs": 1, "lenet_subset": 10_000, "resnet_epochs": 1, "resnet_subset": 2000}
RECORD_FIELDS = ["part", "model", "method", "density", "seed", "settings", "test_acc", "trained_params",
                 "total_params", "artifact_bytes", "dense_fp32_bytes", "seconds", "threads", "torch", "device"]
# The record's artifact bytes are of the plain layout (format versions 1 to 4), the layout of every row recorded
# before the compact one (version 5, `compress pack`'s default, about 30% smaller: bench_artifact_size.py) existed,
# so that all rows stay comparable.
RECORD_LAYOUT = "plain"
# Columns added after the first rows were recorded, with the value those rows had (all ran on a CPU).
LATER_FIELDS = {"device": "cpu"}


@dataclass
class Run:
    """One training run of the sweep: where it goes and its options for `compress train`."""

    part: str
    model: str
    method: str  # label in the tables
    density: float  # 1.0 for dense
    seed: int
    options: dict = field(default_factory=dict)

    @property
    def path(self) -> str:
        return f"{self.part}/{self.model}/{self.method}/d{self.density:g}/s{self.seed}"

    @property
    def settings(self) -> str:
        """The run's options as canonical JSON: a recorded row is reused only when these match."""
        return json.dumps(self.options, sort_keys=True, separators=(",", ":"))


def plan_runs(parts: list[str], seeds: int, lenet_epochs: int, lenet_subset: int | None, resnet_epochs: int,
              resnet_subset: int, lenet_densities=LENET_DENSITIES, resnet_densities=RESNET_DENSITIES,
              lottery_target: float = LOTTERY_TARGET,
              lottery_resnet_target: float = LOTTERY_RESNET_TARGET) -> list[Run]:
    """Every run of the chosen parts, seed by seed within a model, so a partial sweep holds whole seeds."""
    runs = []
    lenet_common = {"data": "fashion-mnist", "epochs": lenet_epochs}
    if lenet_subset:
        lenet_common["subset"] = lenet_subset
    resnet_common = {"data": "fashion-mnist", "epochs": resnet_epochs, "subset": resnet_subset,
                     "eval_every": resnet_epochs}
    if "lenet" in parts:
        for model in ("lenet300", "lenet5"):
            for seed in range(seeds):
                runs.append(Run("lenet", model, "dense", 1.0, seed, {**lenet_common, "method": "dense"}))
                for label, options in LENET_METHODS.items():
                    for density in lenet_densities:
                        runs.append(Run("lenet", model, label, density, seed,
                                        {**lenet_common, **options, "density": density}))
    if "lottery" in parts:
        for model in ("lenet300", "lenet5"):
            for seed in range(seeds):
                for label, options in LOTTERY_METHODS.items():
                    runs.append(Run("lottery", model, label, lottery_target, seed,
                                    {**lenet_common, **options, "density": lottery_target}))
        for seed in range(seeds):
            for label, options in LOTTERY_RESNET_METHODS.items():
                runs.append(Run("lottery", "resnet20", label, lottery_resnet_target, seed,
                                {**resnet_common, **options, "density": lottery_resnet_target}))
    if "dynamic" in parts:
        for seed in range(seeds):
            for label, options in DYNAMIC_METHODS.items():
                for density in lenet_densities:
                    runs.append(Run("dynamic", "lenet5", label, density, seed,
                                    {**lenet_common, **options, "density": density}))
        for seed in range(seeds):
            for label, options in DYNAMIC_RESNET_METHODS.items():
                for density in resnet_densities:
                    runs.append(Run("dynamic", "resnet20", label, density, seed,
                                    {**resnet_common, **options, "density": density}))
    if "cops" in parts:
        for seed in range(seeds):
            for pair in COPS_PAIRS:
                for gamma in COPS_GAMMAS:
                    for density in COPS_DENSITIES:
                        runs.append(Run("cops", "lenet5", f"cops-{pair.replace(',', '-')}-g{gamma:g}", density, seed,
                                        {**lenet_common, "method": "cops", "scores": pair, "gamma": gamma,
                                         "density": density}))
            for score in COPS_SINGLE_SCORES:
                for density in COPS_DENSITIES:
                    runs.append(Run("cops", "lenet5", score, density, seed,
                                    {**lenet_common, "method": score, "density": density}))
    if "long" in parts:
        for seed in range(seeds):
            for label, options in LONG_METHODS.items():
                runs.append(Run("long", "lenet5", label, options.get("density", 1.0), seed,
                                {**lenet_common, **options, "epochs": LONG_EPOCHS}))
    if "resnet" in parts:
        for seed in range(seeds):
            runs.append(Run("resnet", "resnet20", "dense", 1.0, seed, {**resnet_common, "method": "dense"}))
            for label, options in RESNET_METHODS.items():
                for interspace in (False, True):
                    for density in resnet_densities:
                        name = f"{label}{'+ip' if interspace else ''}"
                        runs.append(Run("resnet", "resnet20", name, density, seed,
                                        {**resnet_common, **options, "density": density, "interspace": interspace}))
            for label, options in RESNET_SCORE_MODE_METHODS.items():
                for density in resnet_densities:
                    runs.append(Run("resnet", "resnet20", label, density, seed,
                                    {**resnet_common, **options, "density": density, "interspace": False}))
            for label, options in RESNET_IP_ONLY_METHODS.items():
                for density in resnet_densities:
                    runs.append(Run("resnet", "resnet20", f"{label}+ip", density, seed,
                                    {**resnet_common, **options, "density": density, "interspace": True}))
            for label, options in RESNET_IP_BUDGET_METHODS.items():
                for density in resnet_densities:
                    runs.append(Run("resnet", "resnet20", f"{label}+ip-budget", density, seed,
                                    {**resnet_common, **options, "density": density, "interspace": True,
                                     "basis_in_budget": True}))
    return runs


def read_record(path: Path) -> dict[str, dict]:
    """The recorded rows by run path; a missing file is an empty record."""
    if not path.is_file():
        return {}
    rows = {}
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = set(RECORD_FIELDS) - set(LATER_FIELDS) - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path} is not a sweep record (no column {', '.join(sorted(missing))}); "
                             "point --results at another directory or delete the file")
        for row in reader:
            row = {**LATER_FIELDS, **row, "density": float(row["density"]), "seed": int(row["seed"]),
                   "test_acc": float(row["test_acc"]), "seconds": float(row["seconds"]), "threads": int(row["threads"])}
            for name in ("trained_params", "total_params", "artifact_bytes", "dense_fp32_bytes"):
                row[name] = int(row[name])
            rows[record_key(row)] = row
    return rows


def record_key(row: dict) -> str:
    return f"{row['part']}/{row['model']}/{row['method']}/d{row['density']:g}/s{row['seed']}"


def write_record(path: Path, rows: dict[str, dict]) -> None:
    """Rewrite the record atomically (the project's one writer), rows in a stable order."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=RECORD_FIELDS, lineterminator="\n")
    writer.writeheader()
    for key in sorted(rows):
        writer.writerow({name: rows[key][name] for name in RECORD_FIELDS})
    from formats.atomic import write_atomic

    write_atomic(path, buffer.getvalue().encode("utf-8"))


def pending(runs: list[Run], record: dict[str, dict]) -> list[Run]:
    """The runs without a recorded row of the same settings."""
    return [run for run in runs if record.get(run.path, {}).get("settings") != run.settings]


def execute(run: Run, root: Path, threads: int, device: str = "auto") -> dict:
    """Train (resuming an interrupted run), pack and return the record row; the run's log goes to <seed>.log.

    ``device`` is not part of the run's settings: a run is the same experiment on any device."""
    import torch

    import formats
    from compress.packing import pack_run
    from compress.run import CONFIG_FILE, SUMMARY_FILE, resume_run, train_run

    torch.set_num_threads(threads)
    out = root / run.path
    config = run_config(run, device)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{out.name}.log", "a", encoding="utf-8") as log, redirect_stderr(log):
        same = (out / CONFIG_FILE).is_file() and _same_run(out, config)
        finished = (out / SUMMARY_FILE).is_file()
        if same and not finished:
            summary = resume_run(out, progress=False)
        else:  # a finished run of these settings is returned as is; anything else in `out` is replaced
            summary = train_run(config, out, overwrite=not (same and finished), progress=False)
        if run.part == "lottery":
            return [level_row(run, out, summary, level, threads) for level in summary["levels"] if level["level"] > 0]
        artifact = out.with_suffix(".cpk")
        if stale_artifact(artifact, out):
            pack_run(out, artifact, force=True, layout=RECORD_LAYOUT)  # a stale artifact of ours to replace
    totals = formats.read_info(artifact)["totals"]
    return {
        "part": run.part, "model": run.model, "method": run.method, "density": run.density, "seed": run.seed,
        "settings": run.settings, "test_acc": summary["test_acc"], "trained_params": summary["trained_params"],
        "total_params": summary["total_params"], "artifact_bytes": totals["file_bytes"],
        "dense_fp32_bytes": totals["dense_fp32_bytes"],
        "seconds": round(summary["score_seconds"] + summary["train_seconds"], 1),
        "threads": summary.get("threads", threads), "torch": summary["torch"],
        "device": summary.get("device", "cpu"),
    }


def level_row(run: Run, out: Path, summary: dict, level: dict, threads: int) -> dict:
    """The record row of one level of a lottery run: its nominal density ((1 - F)^level, at least the target),
    its accuracy, its packed artifact, and the training seconds of every level up to it (its whole cost)."""
    import formats
    from compress.packing import pack_run

    artifact = out / f"level_{level['level']}.cpk"
    if stale_artifact(artifact, out / f"level_{level['level']}"):
        pack_run(out, artifact, force=True, level=level["level"], layout=RECORD_LAYOUT)
    totals = formats.read_info(artifact)["totals"]
    fraction = run.options["prune_fraction"]
    cost = sum(row["train_seconds"] for row in summary["levels"] if row["level"] <= level["level"])
    return {
        "part": run.part, "model": run.model, "method": run.method, "seed": run.seed, "settings": run.settings,
        "density": max(run.density, (1 - fraction) ** level["level"]), "test_acc": level["test_acc"],
        "trained_params": level["trained_params"], "total_params": summary["total_params"],
        "artifact_bytes": totals["file_bytes"], "dense_fp32_bytes": totals["dense_fp32_bytes"],
        "seconds": round(cost, 1), "threads": summary.get("threads", threads), "torch": summary["torch"],
        "device": summary.get("device", "cpu"),
    }


def run_config(run: Run, device: str):
    """The training config of a run: its options, scoring in RECORDED_SCORE_MODE and training on RECORDED_ENGINE
    unless they say otherwise."""
    from compress.config import build_config

    return build_config(None, {"model": run.model, "seed": run.seed, "score_mode": RECORDED_SCORE_MODE,
                               "engine": RECORDED_ENGINE, **run.options, "device": device})


def _same_run(out: Path, config) -> bool:
    from compress.run import CONFIG_FILE, same_config

    return same_config(json.loads((out / CONFIG_FILE).read_text()), config.resolved())


def stale_artifact(artifact: Path, run_dir: Path) -> bool:
    """Whether the artifact is missing or older than the run's trained weights."""
    return not artifact.is_file() or artifact.stat().st_mtime < (run_dir / "model.safetensors").stat().st_mtime


def estimate_seconds(runs: list[Run], record: dict[str, dict], device: str | None = None) -> tuple[float, int]:
    """Estimated compute seconds of ``runs`` from recorded runs of the same model and epochs (on ``device``, a
    recorded device label, if given), and how many runs had none to go by."""
    by_model: dict[tuple, list[float]] = {}
    for row in record.values():
        if (device is not None and row["device"] != device) or row["part"] == "lottery":
            continue  # a lottery row carries the seconds of all its levels
        options = json.loads(row["settings"])
        by_model.setdefault((row["model"], options.get("epochs"), options.get("subset")), []).append(row["seconds"])
    total, unknown = 0.0, 0
    for run in runs:
        seen = by_model.get((run.model, run.options.get("epochs"), run.options.get("subset")))
        if seen:
            total += statistics.mean(seen) * lottery_levels(run)
        else:
            unknown += 1
    return total, unknown


def lottery_levels(run: Run) -> int:
    """How many trainings a run costs: 1, or for a lottery run level 0 plus every pruning level to its target."""
    if run.part != "lottery":
        return 1
    return 1 + math.ceil(math.log(run.density) / math.log(1 - run.options["prune_fraction"]) - 1e-9)


def sweep(runs: list[Run], root: Path, results: Path, jobs: int = 1, threads: int | None = None,
          device: str = "auto") -> dict[str, dict]:
    """Train and pack every pending run (``jobs`` at a time), recording each as it finishes; returns the record."""
    results.mkdir(parents=True, exist_ok=True)
    record_path = results / "runs.csv"
    record = read_record(record_path)
    todo = pending(runs, record)
    threads = threads or max(1, _cores() // jobs)
    print(f"{len(runs)} runs planned, {len(runs) - len(todo)} recorded in {record_path}, {len(todo)} to run "
          f"({jobs} at a time, {threads} thread(s) each); run logs in {root}", flush=True)
    started = time.perf_counter()
    done_seconds: list[float] = []

    def note(rows: dict | list[dict]) -> None:
        rows = rows if isinstance(rows, list) else [rows]
        record.update(read_record(record_path))  # keep rows another sweep process recorded meanwhile
        for one in rows:
            record[record_key(one)] = one
        write_record(record_path, record)
        row = rows[-1]  # a lottery run's last level: its seconds are the whole run's
        done_seconds.append(row["seconds"])
        finished = len(done_seconds)
        elapsed = time.perf_counter() - started
        left = (len(todo) - finished) * statistics.mean(done_seconds) / jobs / 60
        print(f"[{finished}/{len(todo)}] {record_key(row)}: test acc {row['test_acc']:.2%}, "
              f"{row['artifact_bytes']:,} B, {row['seconds']:.0f} s ({elapsed / 60:.1f} min so far, "
              f"about {left:.0f} min left)", flush=True)

    failures = []

    def failed(run: Run, error: Exception) -> None:
        failures.append(run.path)
        print(f"FAILED {run.path}: {type(error).__name__}: {error} (log: {root / run.path}.log)", flush=True)

    if jobs == 1:
        for run in todo:
            try:
                row = execute(run, root, threads, device)
            except Exception as error:  # one broken run must not stop a sweep of hours; reported below
                failed(run, error)
            else:
                note(row)
    elif todo:
        pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_die_with_parent)
        try:
            futures = {pool.submit(execute, run, root, threads, device): run for run in todo}
            for future in as_completed(futures):
                try:
                    row = future.result()
                except Exception as error:
                    failed(futures[future], error)
                else:
                    note(row)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # on Ctrl-C, start no further run
    if failures:
        raise RuntimeError(f"{len(failures)} run(s) failed and were not recorded: {', '.join(failures)}; "
                           "read their logs, fix the cause and run the sweep again (recorded runs are kept)")
    return record


def _die_with_parent() -> None:
    """Worker initializer: on Linux, have the kernel end this worker when the sweep process dies, so no
    orphan keeps training a run directory that a restarted sweep resumes at the same time."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation of test accuracy over seeds, per model, method and density.

    A group whose rows differ in settings or in the kind of device (cpu, cuda) is refused: its mean would
    mix two experiments. Record such runs in another --results, or retrain them alike."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["part"], row["model"], row["method"], row["density"]), []).append(row)
    for key, members in groups.items():
        kinds = {(m["settings"], str(m["device"]).split(" ")[0]) for m in members}
        if len(kinds) > 1:
            raise SystemExit(f"error: the record's rows of {'/'.join(map(str, key))} differ in settings or device "
                             f"({len(kinds)} kinds: {sorted(d for _, d in kinds)}): the tables never average them; "
                             "record one of them in another --results, or retrain them alike")
    table = []
    for (part, model, method, density), members in groups.items():
        accuracies = [m["test_acc"] for m in members]
        table.append({
            "part": part, "model": model, "method": method, "density": density, "seeds": len(members),
            "acc_mean": statistics.mean(accuracies),
            "acc_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "trained_params": round(statistics.mean(m["trained_params"] for m in members)),
            "artifact_bytes": round(statistics.mean(m["artifact_bytes"] for m in members)),
            "dense_ratio": statistics.mean(m["dense_fp32_bytes"] / m["artifact_bytes"] for m in members),
            "seconds": sum(m["seconds"] for m in members),
        })
    return sorted(table, key=lambda r: (r["part"], r["model"], r["method"], -r["density"]))


def describe_settings(rows: list[dict]) -> str:
    """One line naming the training settings the rows were run with (all of them, if they differ)."""
    seen = []
    for row in rows:
        options = json.loads(row["settings"])
        epochs = options.get("epochs")
        text = (f"{epochs} epoch{'' if epochs == 1 else 's'} on "
                + (f"{options['subset']:,} training images (a subset drawn from each seed)" if options.get("subset")
                   else "all 60,000 training images")
                + (", tested after the last epoch only" if options.get("eval_every", 1) > 1 else ""))
        if text not in seen:
            seen.append(text)
    return "; ".join(seen)


def describe_machines(rows: list[dict]) -> str:
    """Where the rows were trained: each device and torch version with its number of runs."""
    counts = Counter((row["device"], row["torch"]) for row in rows)
    return "; ".join(f"{n} on {device} with torch {version}" for (device, version), n in counts.items())


def run_seconds(rows: list[dict]) -> float:
    """The compute seconds of the runs behind ``rows``: a lottery run's rows carry the cumulative seconds of its
    levels, so its last (largest) one is the whole run's."""
    lottery: dict[tuple, float] = {}
    total = 0.0
    for row in rows:
        if row["part"] == "lottery":
            key = (row["model"], row["method"], row["seed"], row["settings"])
            lottery[key] = max(lottery.get(key, 0.0), row["seconds"])
        else:
            total += row["seconds"]
    return total + sum(lottery.values())


def markdown(table: list[dict], rows: list[dict]) -> str:
    lines = []
    for model in dict.fromkeys(r["model"] for r in table):
        members = [r for r in rows if r["model"] == model]
        seconds = run_seconds(members)
        duration = f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"
        lines += [f"\n### {model}\n",
                  f"{len(members)} run{'' if len(members) == 1 else 's'}: {describe_settings(members)}; seeds "
                  f"{', '.join(str(s) for s in sorted({r['seed'] for r in members}))}; "
                  f"{duration} of training and scoring in all ({describe_machines(members)}).\n",
                  "Artifact bytes are those of the plain layout (fp16 values, format versions 1 to 4); `compress "
                  "pack`'s default compact layout is smaller still (`python examples/benchmarks/"
                  "bench_artifact_size.py`).\n",
                  "| method | density | seeds | test acc (mean ± std) | trained params | artifact bytes | x smaller than "
                  "dense fp32 | training s per run |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in (r for r in table if r["model"] == model):
            lines.append(f"| {r['method']} | {r['density']:.2%} | {r['seeds']} | {100 * r['acc_mean']:.2f} ± "
                         f"{100 * r['acc_std']:.2f} | {r['trained_params']:,} | {r['artifact_bytes']:,} | "
                         f"{r['dense_ratio']:.1f} | {r['seconds'] / r['seeds']:,.0f} |")
    return "\n".join(lines) + "\n"


def plots(table: list[dict], root: Path) -> list[Path]:
    """One PNG per model: accuracy against density and against artifact bytes, one line per method."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("matplotlib is not installed: no plots (pip install -e '.[reproduce]')", file=sys.stderr)
        return []
    written = []
    for model in dict.fromkeys(r["model"] for r in table):
        rows = [r for r in table if r["model"] == model]
        figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for method in dict.fromkeys(r["method"] for r in rows):
            points = sorted((r for r in rows if r["method"] == method), key=lambda r: r["density"])
            if method == "dense":
                for axis in axes:
                    axis.axhline(100 * points[0]["acc_mean"], color="black", linestyle="--", label="dense")
                continue
            accuracy = [100 * p["acc_mean"] for p in points]
            error = [100 * p["acc_std"] for p in points]
            style = {"marker": "o", "capsize": 3, "linestyle": "--" if method.endswith("+ip") else "-"}
            axes[0].errorbar([p["density"] for p in points], accuracy, yerr=error, label=method, **style)
            axes[1].errorbar([p["artifact_bytes"] for p in points], accuracy, yerr=error, label=method, **style)
        axes[0].set(xscale="log", xlabel="density (fraction of weights trained)", ylabel="test accuracy (%)",
                    title=f"{model}: accuracy against density")
        axes[1].set(xscale="log", xlabel="artifact bytes (fp16 values, plain layout)", ylabel="test accuracy (%)",
                    title=f"{model}: accuracy against storage")
        kilobytes = matplotlib.ticker.FuncFormatter(lambda value, _: f"{value / 1000:g} KB")
        axes[1].xaxis.set_major_formatter(kilobytes)
        axes[1].xaxis.set_minor_locator(matplotlib.ticker.LogLocator(subs=(2.0, 5.0)))  # fewer, so no overlap
        axes[1].xaxis.set_minor_formatter(kilobytes)
        for axis in axes:
            axis.grid(True, which="both", alpha=0.3)
            axis.legend(fontsize=8)
        figure.tight_layout()
        path = root / f"{model}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written


def report(record: dict[str, dict], results: Path, command: str) -> str:
    """Write results.md, results.json and the plots from every recorded row; returns the markdown."""
    rows = list(record.values())
    if not rows:
        raise SystemExit(f"the record {results / 'runs.csv'} holds no run yet; run the sweep first")
    table = aggregate(rows)
    text = f"Command: `{command}`\n" + markdown(table, rows)
    (results / "results.md").write_text(text, encoding="utf-8")
    (results / "results.json").write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
    for path in plots(table, results):
        print(f"plot: {path}")
    print(f"tables: {results / 'results.md'}; record: {results / 'runs.csv'}")
    return text


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one seed, two densities, 1 epoch, subsets (< 10 min)")
    parser.add_argument("--out", default=None, help="run directories [runs/reproduce or runs/reproduce-quick]")
    parser.add_argument("--results", default=None,
                        help="record, tables and plots [docs/benchmarks/full or runs/reproduce-quick]")
    parser.add_argument("--part", choices=["lenet", "lottery", "dynamic", "cops", "long", "resnet", "all"],
                        default="all")
    parser.add_argument("--models", default=None,
                        help="comma-separated subset of the part's models, e.g. lenet300 (run the sweep in pieces)")
    parser.add_argument("--methods", default=None,
                        help="comma-separated subset of the methods, as labelled in the tables (e.g. freezenet,snip)")
    parser.add_argument("--densities", default=None,
                        help="comma-separated subset of the densities (e.g. 0.0064; dense is 1)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 per setting [3; 1 with --quick]")
    parser.add_argument("--only-seed", type=int, default=None, help="run only this seed (to split a sweep by seed)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs trained at once, each with cores/jobs threads [1]; 2 is ~1.2x faster on 2 cores")
    parser.add_argument("--device", default="auto",
                        help="where runs train: auto (CUDA if available), cpu or cuda[:N] [auto]; recorded per "
                             "run, not part of its settings")
    parser.add_argument("--dry-run", action="store_true", help="print what is left to run and its estimated time")
    parser.add_argument("--report", action="store_true", help="only redraw the tables and plots from the record")
    args = parser.parse_args(argv)
    for name in ("seeds", "jobs"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be a positive integer, got {value}")
    return args


def _usage_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv=None) -> None:
    args = parse_args(argv)
    settings = QUICK if args.quick else FULL
    root = Path(args.out or ("runs/reproduce-quick" if args.quick else "runs/reproduce"))
    results = Path(args.results or ("runs/reproduce-quick" if args.quick else "docs/benchmarks/full"))
    parts = ["lenet", "lottery", "dynamic", "cops", "long", "resnet"] if args.part == "all" else [args.part]
    runs = plan_runs(parts, args.seeds or settings["seeds"], settings["lenet_epochs"], settings["lenet_subset"],
                     settings["resnet_epochs"], settings["resnet_subset"],
                     lenet_densities=[0.05, 0.0064] if args.quick else LENET_DENSITIES,
                     resnet_densities=[0.05] if args.quick else RESNET_DENSITIES,
                     lottery_target=0.05 if args.quick else LOTTERY_TARGET,
                     lottery_resnet_target=0.05 if args.quick else LOTTERY_RESNET_TARGET)
    if args.models:
        wanted = {name.strip() for name in args.models.split(",")}
        runs = [run for run in runs if run.model in wanted]
        if not runs:
            _usage_error(f"no run of part {args.part!r} uses the models {sorted(wanted)}")
    if args.methods:
        wanted = {name.strip() for name in args.methods.split(",")}
        runs = [run for run in runs if run.method in wanted]
        if not runs:
            _usage_error(f"no planned run uses the methods {sorted(wanted)}; the labels are those of the tables, "
                         "e.g. snip, freezenet, random-freeze, snip+ip")
    if args.densities:
        try:
            wanted = {float(value) for value in args.densities.split(",")}
        except ValueError:
            _usage_error(f"--densities {args.densities!r} is not a comma-separated list of numbers, e.g. 0.0064,0.1")
        runs = [run for run in runs if any(math.isclose(run.density, d) for d in wanted)]
        if not runs:
            _usage_error(f"no planned run has the densities {sorted(wanted)} (dense is 1)")
    if args.only_seed is not None:
        runs = [run for run in runs if run.seed == args.only_seed]
        if not runs:
            _usage_error(f"--only-seed {args.only_seed} is not one of the planned seeds")
    command = "python examples/reproduce/sweep.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.report:
        report(read_record(results / "runs.csv"), results, command.strip())
        return
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", args.device):
        _usage_error(f"--device {args.device!r} is not a device; use auto, cpu or cuda[:N]")
    from compress.run import describe_device, resolve_device

    try:
        device = describe_device(resolve_device(args.device))
    except ValueError as error:
        _usage_error(str(error))
    if args.dry_run:
        record = read_record(results / "runs.csv")
        todo = pending(runs, record)
        seconds, unknown = estimate_seconds(todo, record, device)
        print(f"{len(runs)} runs planned, {len(runs) - len(todo)} recorded, {len(todo)} to run: about "
              f"{seconds / 3600:.1f} h of compute at the speed recorded on {device}"
              + (f", plus {unknown} runs of a model with no recorded run yet" if unknown else ""))
        for run in todo:
            print(f"  {run.path}")
        return
    try:
        record = sweep(runs, root, results, jobs=args.jobs, device=args.device)
    except RuntimeError as error:
        report(read_record(results / "runs.csv"), results, command.strip())
        sys.exit(f"error: {error}")
    text = report(record, results, command.strip())
    print(text)
    if any(math.isnan(row["test_acc"]) for row in record.values()):
        sys.exit("some runs have no accuracy")


if __name__ == "__main__":
    main()
