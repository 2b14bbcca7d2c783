"""The reproduction sweep: its plan, the record that lets it run in parts, and its tables."""
import csv
import importlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "reproduce" / "sweep.py"


@pytest.fixture(scope="module")
def sweep():
    sys.path.insert(0, str(SCRIPT.parent))  # importable by name, also in the worker processes of --jobs
    module = importlib.import_module("sweep")
    assert Path(module.__file__) == SCRIPT
    yield module
    sys.path.remove(str(SCRIPT.parent))
    del sys.modules["sweep"]


def tiny_runs(sweep, seeds=(0,), methods=("dense", "snip")):
    runs = []
    for seed in seeds:
        for method in methods:
            options = {"data": "synthetic", "subset": 256, "epochs": 1, "method": method}
            density = 1.0 if method == "dense" else 0.1
            if method != "dense":
                options["density"] = density
            runs.append(sweep.Run("lenet", "lenet300", method, density, seed, options))
    return runs


def row(sweep, method="snip", density=0.1, seed=0, acc=0.5, settings="{}", seconds=10.0, device="cpu"):
    return {"part": "lenet", "model": "lenet300", "method": method, "density": density, "seed": seed,
            "settings": settings, "test_acc": acc, "trained_params": 100, "total_params": 1000,
            "artifact_bytes": 400, "dense_fp32_bytes": 4000, "seconds": seconds, "threads": 2, "torch": "x",
            "device": device}


def test_the_full_plan_has_every_model_method_density_and_seed(sweep):
    lenet = sweep.plan_runs(["lenet"], 3, 10, None, 10, 5000)
    assert len(lenet) == 2 * 3 * (1 + len(sweep.LENET_METHODS) * len(sweep.LENET_DENSITIES)) == 258
    assert {r.density for r in lenet} == {1.0, *sweep.LENET_DENSITIES}
    assert all("subset" not in r.options and r.options["epochs"] == 10 for r in lenet)
    resnet = sweep.plan_runs(["resnet"], 3, 10, None, 10, 5000)
    # dense, 3 methods standard and +ip at 3 densities, snip/grasp score modes, synflow-composed+ip, 3 +ip-budget
    assert len(resnet) == 3 * (1 + 3 * 2 * 3 + 3 * 3 + 3 + 3 * 3) == 120
    budget = [r for r in resnet if r.method.endswith("+ip-budget")]
    assert len(budget) == 27 and all(r.options["interspace"] and r.options["basis_in_budget"] for r in budget)
    score_modes = {r.method: r.options.get("score_mode") for r in resnet}
    assert score_modes["snip-eval"] == "eval" and score_modes["grasp"] == "train" and score_modes["snip"] is None
    assert {r.method for r in resnet} == {"dense", "snip", "snip+ip", "synflow", "synflow+ip", "freezenet", "freezenet+ip",
                                          "synflow-composed+ip", "snip-eval", "grasp", "grasp-eval", "snip+ip-budget",
                                          "synflow+ip-budget", "freezenet+ip-budget"}
    assert all(r.options["interspace"] == ("+ip" in r.method) for r in resnet if r.method != "dense")
    assert all(r.options["subset"] == 5000 and r.options["eval_every"] == 10 for r in resnet)
    assert len({r.path for r in lenet + resnet}) == len(lenet + resnet)


def test_every_planned_run_is_a_valid_training_config_scoring_as_the_recorded_rows(sweep):
    for run in sweep.plan_runs(["lenet", "lottery", "dynamic", "cops", "long", "resnet"], 1, 10, None, 10, 5000):
        config = sweep.run_config(run, "cpu").resolved()
        assert config.score_mode == ("eval" if run.method.endswith("-eval") else "train"), run.path


def test_the_record_round_trips_and_a_foreign_csv_is_refused(sweep, tmp_path):
    rows = {sweep.record_key(r): r for r in (row(sweep, seed=0), row(sweep, seed=1, acc=0.25))}
    path = tmp_path / "runs.csv"
    sweep.write_record(path, rows)
    assert sweep.read_record(path) == rows
    assert not (tmp_path / "runs.csv.tmp").exists()
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a sweep record"):
        sweep.read_record(path)
    assert sweep.read_record(tmp_path / "missing.csv") == {}


def test_a_record_written_before_the_device_column_reads_as_cpu_runs(sweep, tmp_path):
    rows = {sweep.record_key(r): r for r in (row(sweep, seed=0), row(sweep, seed=1))}
    path = tmp_path / "runs.csv"
    sweep.write_record(path, rows)
    lines = path.read_text().splitlines()
    assert lines[0].endswith(",device") and all(line.endswith(",cpu") for line in lines[1:])
    path.write_text("\n".join(line.rsplit(",", 1)[0] for line in lines) + "\n")
    assert sweep.read_record(path) == rows


def test_a_recorded_run_is_pending_again_only_when_its_settings_change(sweep):
    run = tiny_runs(sweep, methods=("snip",))[0]
    record = {run.path: row(sweep, settings=run.settings)}
    assert sweep.pending([run], record) == []
    record[run.path]["settings"] = run.settings.replace('"epochs":1', '"epochs":2')
    assert sweep.pending([run], record) == [run]


def test_sweep_records_each_run_and_skips_recorded_runs_when_run_again(sweep, tmp_path, monkeypatch):
    runs = tiny_runs(sweep)
    record = sweep.sweep(runs, tmp_path / "out", tmp_path, jobs=1)
    assert sorted(record) == sorted(r.path for r in runs)
    stored = list(csv.DictReader(open(tmp_path / "runs.csv")))
    assert [r["method"] for r in stored] == ["dense", "snip"]
    assert all(0 <= float(r["test_acc"]) <= 1 and int(r["artifact_bytes"]) > 0 for r in stored)
    assert all(r["device"] == "cpu" for r in stored)  # auto resolves to the CPU on a machine without CUDA
    assert (tmp_path / "out" / runs[1].path).with_suffix(".cpk").is_file()

    def must_not_train(*args):
        raise AssertionError("a recorded run was trained again")

    monkeypatch.setattr(sweep, "execute", must_not_train)
    assert sweep.sweep(runs, tmp_path / "out", tmp_path, jobs=1) == record


def test_parallel_jobs_record_the_same_runs_as_one_at_a_time(sweep, tmp_path):
    runs = tiny_runs(sweep, seeds=(0, 1), methods=("snip",))
    serial = sweep.sweep(runs, tmp_path / "one", tmp_path / "one", jobs=1)
    parallel = sweep.sweep(runs, tmp_path / "two", tmp_path / "two", jobs=2)
    assert sorted(parallel) == sorted(serial)
    assert all(parallel[key]["threads"] == max(1, sweep._cores() // 2) for key in parallel)
    for key in serial:
        assert parallel[key]["trained_params"] == serial[key]["trained_params"]
        assert abs(parallel[key]["test_acc"] - serial[key]["test_acc"]) < 0.1  # thread counts change float sums


def test_a_failing_run_is_reported_and_the_others_are_still_recorded(sweep, tmp_path):
    good, broken = tiny_runs(sweep, methods=("dense", "snip"))
    broken.options["score"] = "no-such-score"
    with pytest.raises(RuntimeError, match=r"1 run\(s\) failed and were not recorded: lenet/lenet300/snip/d0.1/s0"):
        sweep.sweep([broken, good], tmp_path / "out", tmp_path, jobs=1)
    assert list(sweep.read_record(tmp_path / "runs.csv")) == [good.path]


def test_a_record_lost_with_its_runs_kept_is_rebuilt_without_training(sweep, tmp_path):
    runs = tiny_runs(sweep, methods=("snip",))
    first = sweep.sweep(runs, tmp_path / "out", tmp_path / "a", jobs=1)
    mtime = (tmp_path / "out" / runs[0].path / "model.safetensors").stat().st_mtime
    again = sweep.sweep(runs, tmp_path / "out", tmp_path / "b", jobs=1)
    assert (tmp_path / "out" / runs[0].path / "model.safetensors").stat().st_mtime == mtime
    assert again[runs[0].path]["test_acc"] == first[runs[0].path]["test_acc"]


def test_aggregate_gives_mean_and_sample_std_over_seeds(sweep):
    table = sweep.aggregate([row(sweep, seed=0, acc=0.5, seconds=3), row(sweep, seed=1, acc=0.7, seconds=4)])
    (entry,) = table
    assert entry["seeds"] == 2 and entry["acc_mean"] == pytest.approx(0.6)
    assert entry["acc_std"] == pytest.approx(0.1414213, rel=1e-5)
    assert entry["dense_ratio"] == 10.0 and entry["seconds"] == 7


def test_report_writes_tables_with_settings_and_time(sweep, tmp_path):
    settings = json.dumps({"epochs": 10, "subset": 5000, "eval_every": 10})
    record = {sweep.record_key(r): r for r in (row(sweep, seed=0, settings=settings, seconds=1200),
                                                row(sweep, seed=1, settings=settings, seconds=1200),
                                                row(sweep, "freezenet", seed=0, settings=settings, seconds=1200,
                                                    device="cuda (NVIDIA H200)"))}
    text = sweep.report(record, tmp_path, "python examples/reproduce/sweep.py")
    assert "10 epochs on 5,000 training images (a subset drawn from each seed), tested after the last epoch only" in text
    assert "seeds 0, 1; 1.0 h of training and scoring in all (2 on cpu with torch x; 1 on cuda (NVIDIA H200) " \
           "with torch x)" in text
    assert "| snip | 10.00% | 2 | 50.00 ± 0.00 | 100 | 400 | 10.0 |" in text
    assert "| freezenet | 10.00% | 1 | 50.00 ± 0.00 | 100 | 400 | 10.0 |" in text
    assert [r["seeds"] for r in json.loads((tmp_path / "results.json").read_text())] == [1, 2]
    short = json.dumps({"epochs": 1})
    text = sweep.report({"x": row(sweep, settings=short, seconds=90)}, tmp_path, "x")
    assert "1 run: 1 epoch on all 60,000 training images; seeds 0; 1.5 min of training" in text
    with pytest.raises(SystemExit, match="holds no run yet"):
        sweep.report({}, tmp_path, "x")


def test_estimate_uses_recorded_times_of_the_same_model_and_settings(sweep):
    runs = tiny_runs(sweep, seeds=(0, 1))
    record = {"x": row(sweep, settings=runs[0].settings, seconds=30.0)}
    seconds, unknown = sweep.estimate_seconds(runs, record)
    assert (seconds, unknown) == (120.0, 0)
    other = sweep.Run("lenet", "lenet5", "dense", 1.0, 0, {"epochs": 1})
    assert sweep.estimate_seconds([other], record) == (0.0, 1)
    assert sweep.estimate_seconds(runs, record, "cpu") == (120.0, 0)
    assert sweep.estimate_seconds(runs, record, "cuda (NVIDIA H200)") == (0.0, 4)  # other devices' times differ


def test_dry_run_lists_what_is_left_and_bad_arguments_are_refused(sweep, tmp_path, capsys):
    sweep.main(["--dry-run", "--part", "resnet", "--only-seed", "2", "--results", str(tmp_path)])
    out = capsys.readouterr().out
    assert "40 runs planned, 0 recorded, 40 to run" in out and "resnet/resnet20/snip+ip/d0.02/s2" in out
    sweep.main(["--dry-run", "--part", "resnet", "--methods", "snip+ip,dense", "--densities", "0.02,1",
                "--results", str(tmp_path)])
    listed = [line.strip() for line in capsys.readouterr().out.splitlines()[1:]]
    assert sorted(listed) == sorted(f"resnet/resnet20/{m}/d{d}/s{s}" for m, d in (("dense", 1), ("snip+ip", 0.02))
                                    for s in range(3))
    for arguments, message in ((["--models", "lenet5"], "uses the models"),
                               (["--only-seed", "7"], "not one of the planned seeds"),
                               (["--device", "tpu"], "is not a device; use auto, cpu or cuda"),
                               (["--methods", "snap"], "no planned run uses the methods ['snap']"),
                               (["--densities", "0.1,x"], "not a comma-separated list of numbers"),
                               (["--densities", "0.5"], "no planned run has the densities [0.5]")):
        with pytest.raises(SystemExit) as stop:
            sweep.main(["--dry-run", "--part", "resnet", "--results", str(tmp_path), *arguments])
        assert stop.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sweep.main(["--jobs", "0", "--results", str(tmp_path)])
    assert "--jobs must be a positive integer" in capsys.readouterr().err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's parent-death signal is Linux-only")
def test_workers_end_when_the_sweep_process_is_killed(tmp_path):
    pid_file = tmp_path / "worker.pid"
    program = f"""
import multiprocessing, os, signal, sys, time
from concurrent.futures import ProcessPoolExecutor
sys.path.insert(0, {str(SCRIPT.parent)!r})
import sweep

def work(path):
    open(path, "w").write(str(os.getpid()))
    time.sleep(60)

if __name__ == "__main__":
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=sweep._die_with_parent)
    pool.submit(work, {str(pid_file)!r})
    while not os.path.exists({str(pid_file)!r}):
        time.sleep(0.05)
    time.sleep(0.2)
    os.kill(os.getpid(), signal.SIGKILL)
"""
    script = tmp_path / "killed_sweep.py"  # a file: spawn re-imports the main module in the worker
    script.write_text(program)
    subprocess.run([sys.executable, str(script)], timeout=60)
    worker = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while Path(f"/proc/{worker}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{worker}").exists() or "Z" in Path(f"/proc/{worker}/stat").read_text().split()[2]


def test_the_lottery_part_plans_one_imp_run_per_model_mode_and_seed_down_to_the_target(sweep):
    from compress.config import build_config

    runs = sweep.plan_runs(["lottery"], 3, 10, None, 10, 5000)
    assert len(runs) == 2 * 3 * len(sweep.LOTTERY_METHODS) + 3 * len(sweep.LOTTERY_RESNET_METHODS) == 18
    for run in runs:
        config = build_config(None, {"model": run.model, "seed": run.seed, **run.options}).resolved()
        target = sweep.LOTTERY_RESNET_TARGET if run.model == "resnet20" else sweep.LOTTERY_TARGET
        assert config.strategy == "imp" and config.density == target and config.epochs == 10
        assert run.path.endswith(f"/d{target:g}/s{run.seed}")  # the key of its last level's row
    lenets = [r for r in runs if r.model != "resnet20"]
    assert {build_config(None, r.options).resolved().mode for r in lenets} == {"prune", "freeze"}
    resnets = [build_config(None, r.options).resolved() for r in runs if r.model == "resnet20"]
    assert sorted(c.interspace for c in resnets) == [False] * 3 + [True] * 3  # IP-IMP against IMP
    assert {c.subset for c in resnets} == {5000}  # the resnet part's settings


def test_the_cops_and_long_parts_plan_the_settings_the_fidelity_audit_asks_for(sweep):
    from compress.config import build_config

    cops = sweep.plan_runs(["cops"], 3, 10, None, 10, 5000)
    assert len(cops) == 3 * (2 * 4 * 2 + 3 * 2) == 66 and {r.model for r in cops} == {"lenet5"}
    configs = [build_config(None, {"model": r.model, **r.options}).resolved() for r in cops]
    combined = [c for c in configs if c.method == "cops"]
    assert {(tuple(c.scores), c.gamma, c.density) for c in combined} == {
        (tuple(pair.split(",")), gamma, density) for pair in sweep.COPS_PAIRS for gamma in sweep.COPS_GAMMAS
        for density in sweep.COPS_DENSITIES}
    singles = {(c.method, c.density, r.seed) for c, r in zip(configs, cops) if c.method != "cops"}  # COPS' scores
    assert singles == {(score, density, seed) for score in ("snip", "grasp", "synflow")
                       for density in sweep.COPS_DENSITIES for seed in range(3)}
    long = sweep.plan_runs(["long"], 3, 10, None, 10, 5000)
    assert len(long) == 9 and {build_config(None, r.options).resolved().epochs for r in long} == {60}
    assert {r.method for r in long} == {"dense", "freezenet", "snip"}
    assert len({r.path for r in cops + long}) == len(cops + long)


def test_aggregate_refuses_to_average_rows_of_different_settings_or_devices(sweep):
    same = [row(sweep, seed=0), row(sweep, seed=1)]
    assert sweep.aggregate(same)[0]["seeds"] == 2
    with pytest.raises(SystemExit, match="differ in settings or device"):
        sweep.aggregate([row(sweep, seed=0), row(sweep, seed=1, device="cuda (NVIDIA H100)")])
    with pytest.raises(SystemExit, match="differ in settings or device"):
        sweep.aggregate([row(sweep, seed=0), row(sweep, seed=1, settings='{"epochs":2}')])


def test_the_dynamic_part_plans_rigl_and_set_in_both_modes_with_erk_and_ip_rigl_against_rigl(sweep):
    from compress.config import build_config

    runs = sweep.plan_runs(["dynamic"], 3, 10, None, 10, 5000)
    lenets = [r for r in runs if r.model == "lenet5"]
    resnets = [r for r in runs if r.model == "resnet20"]
    assert len(lenets) == 3 * len(sweep.DYNAMIC_METHODS) * len(sweep.LENET_DENSITIES) == 105
    assert len(resnets) == 3 * len(sweep.DYNAMIC_RESNET_METHODS) * len(sweep.RESNET_DENSITIES) == 27
    configs = [build_config(None, {"model": r.model, "seed": r.seed, **r.options}).resolved() for r in runs]
    assert {(c.strategy, c.mode) for c in configs[:len(lenets)]} == {("rigl", "prune"), ("rigl", "freeze"),
                                                                    ("set", "prune"), ("set", "freeze"),
                                                                    ("oneshot", "freeze")}  # the random-ERK control
    assert {c.scope for c in configs} == {"erk"} and {c.epochs for c in configs} == {10}
    assert sorted(c.interspace for c in configs[len(lenets):]) == [False] * 18 + [True] * 9
    assert {c.subset for c in configs[len(lenets):]} == {5000}


def test_the_dry_run_estimates_a_lottery_run_as_one_training_per_level(sweep):
    run = sweep.Run("lottery", "lenet5", "imp", 0.001, 0, {"prune_fraction": 0.5})
    assert sweep.lottery_levels(run) == 11  # level 0, then 0.5 ... 0.5**9 = 0.00195, then 0.001
    assert sweep.lottery_levels(sweep.Run("lottery", "resnet20", "imp", 0.25, 0, {"prune_fraction": 0.5})) == 3
    assert sweep.lottery_levels(sweep.Run("lenet", "lenet5", "snip", 0.01, 0)) == 1


def test_a_lottery_run_records_a_row_per_level_with_its_cumulative_training_cost(sweep, tmp_path):
    run = sweep.Run("lottery", "lenet300", "imp", 0.3, 0, {"data": "synthetic", "subset": 256, "epochs": 1,
                                                         "method": "imp", "prune_fraction": 0.5, "density": 0.3})
    import torch

    threads = torch.get_num_threads()
    try:
        rows = sweep.execute(run, tmp_path, threads=1, device="cpu")
    finally:
        torch.set_num_threads(threads)  # execute sets the process's threads; later tests compare bit for bit
    summary = json.loads((tmp_path / run.path / "summary.json").read_text())
    assert [r["density"] for r in rows] == [0.5, 0.3]  # nominal 0.5^level, the last clamped to the target
    assert sweep.record_key(rows[-1]) == run.path  # so the record knows the run is done
    levels = summary["levels"]
    assert rows[0]["seconds"] == round(levels[0]["train_seconds"] + levels[1]["train_seconds"], 1)
    assert rows[-1]["seconds"] == round(sum(level["train_seconds"] for level in levels), 1)
    assert [r["test_acc"] for r in rows] == [level["test_acc"] for level in levels[1:]]
    assert all(r["artifact_bytes"] < r["dense_fp32_bytes"] for r in rows)
    # the run's compute is counted once, not once per level
    assert sweep.run_seconds(rows) == rows[-1]["seconds"]
