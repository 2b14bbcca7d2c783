"""Strategies: IMP levels (exact counts, nested masks, rewinding, prune/freeze), resume, pack --level, branches,
interspace, option errors, and that oneshot resume never scores again."""
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import compress.run.levels
import compress.run.pipeline
import compress.run.runner
import compress.training
import formats
from cli.main import main
from compress.init import initial_values, initialise
from formats.models import build_model
from compress.strategies import LevelContext
from compress.strategies.imp import ImpOptions, IterativeMagnitudePruning
from formats.errors import UserError
from cli_helpers import kill_9_when, one_line_error, run_cli

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 120
QUICK = ["--model", "lenet300", "--data", "synthetic", "--subset", "256", "--batch-size", "64", "--quiet"]
STEPS_PER_EPOCH = 4  # 256 training samples in batches of 64
LENET300 = {"fc1.weight": 235200, "fc2.weight": 30000, "fc3.weight": 1000}
RESNET20 = ["--model", "resnet20", "--data", "synthetic", "--data-shape", "3x8x8", "--subset", "64", "--batch-size", "32",
            "--score-batch-size", "32", "--quiet"]

RUNS = {
    # the run of the brief: level 0 dense, then 3 levels each pruning half, rewound to the end of epoch 1
    "imp": [*QUICK, "--epochs", "2", "--method", "imp", "--levels", "3", "--prune-fraction", "0.5", "--rewind", "1ep"],
    "rewind 0": [*QUICK, "--epochs", "1", "--method", "imp", "--levels", "1", "--prune-fraction", "0.5", "--rewind", "0"],
    "rewind 3it": [*QUICK, "--epochs", "1", "--method", "imp", "--levels", "1", "--prune-fraction", "0.5",
                   "--rewind", "3it"],
    # per-layer target 0.2 reached at level 3 (the last prune is capped by it); 0.45 makes round() matter
    "layer": [*QUICK, "--epochs", "1", "--method", "imp", "--scope", "layer", "--density", "0.2", "--prune-fraction", "0.45"],
    # 0.5, 0.25, 0.125, 0.0625, then 0.05 exactly; rewinding to after training moves every weight off its init
    "freeze": [*QUICK, "--epochs", "1", "--method", "imp", "--mode", "freeze", "--density", "0.05", "--prune-fraction", "0.5",
               "--rewind", "1ep"],
    "branches": [*QUICK, "--epochs", "1", "--method", "imp", "--levels", "2", "--prune-fraction", "0.5",
                 "--branch", "randomize,reinit"],
    "interspace": [*RESNET20, "--epochs", "1", "--interspace", "--method", "imp", "--levels", "1", "--prune-fraction", "0.5"],
    "snip": [*QUICK, "--epochs", "2", "--method", "snip", "--density", "0.1"],
}


# ---------------------------------------------------------------------------------------------------------------
# helpers


def clone(state):
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def read_json(path: Path):
    return json.loads(path.read_text())


def level_dirs(run: Path) -> list[Path]:
    return sorted((p for p in run.glob("level_*") if p.name[6:].isdigit()), key=lambda p: int(p.name[6:]))


def masks_of(directory: Path):
    path = directory / "masks.safetensors"
    return load_file(str(path)) if path.exists() else None


def counts(masks) -> dict[str, int]:
    return {name: int(mask.sum()) for name, mask in masks.items()}


def file_times(run: Path) -> dict[str, int]:
    """mtime of every file of a run directory but the lock (whose holder writes its pid into it)."""
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in run.rglob("*")
            if p.is_file() and p.name != "compress.lock"}


def assert_same_tensors(a: dict, b: dict, where=""):
    assert sorted(a) == sorted(b), where
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), f"{where} {name}"


class Recorder:
    """Records the full state at the entry of every level's training (key: (level, branch)) and the state after
    every optimizer step of level 0."""

    def __init__(self):
        self.starts: dict[tuple, dict] = {}
        self.level0_steps: list[dict] = []
        self._current = None

    def install(self, patch: pytest.MonkeyPatch):
        real_train, real_step = compress.run.levels.train_prepared, compress.training.training_step

        def train_prepared(prepared, *args, **kwargs):
            state = kwargs.get("strategy_state") or {}
            key = (state.get("level"), state.get("branch"))
            self.starts[key] = clone(prepared.model.state_dict())
            self._current = key
            try:
                return real_train(prepared, *args, **kwargs)
            finally:
                self._current = None

        def training_step(model, *args, **kwargs):
            loss = real_step(model, *args, **kwargs)
            if self._current == (0, None):
                self.level0_steps.append(clone(model.state_dict()))
            return loss

        patch.setattr(compress.run.levels, "train_prepared", train_prepared)
        patch.setattr(compress.training, "training_step", training_step)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``trained(kind) -> (run directory, Recorder)``: the finished run RUNS[kind], trained once per module."""
    cache = {}

    def get(kind: str):
        if kind not in cache:
            out = tmp_path_factory.mktemp("strategies") / kind.replace(" ", "-")
            recorder = Recorder()
            with pytest.MonkeyPatch.context() as patch:
                recorder.install(patch)
                code = main(["train", *RUNS[kind], "--out", str(out)])
            assert code == 0, kind
            cache[kind] = (out, recorder)
        return cache[kind]

    return get


def interrupt_after(patch: pytest.MonkeyPatch, directory_name: str, epochs_done: int):
    """Ctrl-C right after the checkpoint (and metrics) of epoch ``epochs_done`` of the level in ``directory_name``."""
    real = compress.run.runner.write_metrics

    def write_metrics(directory, history):
        real(directory, history)
        if Path(directory).name == directory_name and len(history) == epochs_done:
            raise KeyboardInterrupt

    patch.setattr(compress.run.runner, "write_metrics", write_metrics)


def checkpoint_epoch(directory: Path) -> int:
    with safe_open(str(directory / "checkpoint.safetensors"), "pt") as handle:
        return int(handle.metadata()["epoch"])


def assert_same_finished_run(run: Path, reference: Path):
    """Every tensor of every level's model and the final accuracies are those of the reference run."""
    assert [p.name for p in level_dirs(run)] == [p.name for p in level_dirs(reference)]
    for directory in level_dirs(reference):
        assert_same_tensors(load_file(str(run / directory.name / "model.safetensors")),
                            load_file(str(directory / "model.safetensors")), directory.name)
    a, b = read_json(run / "summary.json"), read_json(reference / "summary.json")
    assert a["test_acc"] == b["test_acc"] and a["test_loss"] == b["test_loss"] and a["level"] == b["level"]
    assert [r["test_acc"] for r in a["levels"]] == [r["test_acc"] for r in b["levels"]]


# ---------------------------------------------------------------------------------------------------------------
# the run directory of a run of levels


def test_imp_run_keeps_every_level_in_its_own_directory_and_a_run_summary(trained):
    run, _ = trained("imp")
    assert [p.name for p in level_dirs(run)] == ["level_0", "level_1", "level_2", "level_3"]
    common = {"plan.json", "checkpoint.safetensors", "metrics.jsonl", "model.safetensors", "summary.json"}
    assert {p.name for p in (run / "level_0").iterdir()} == common | {"rewind.safetensors"}  # dense: no masks
    for k in (1, 2, 3):
        assert {p.name for p in (run / f"level_{k}").iterdir()} == common | {"masks.safetensors"}
    summary = read_json(run / "summary.json")
    last = read_json(run / "level_3" / "summary.json")
    assert {k: v for k, v in summary.items() if k not in ("levels", "level", "total_epochs", "total_train_seconds")} \
        == {k: v for k, v in last.items() if k != "level"}
    assert summary["level"] == 3 and [row["level"] for row in summary["levels"]] == [0, 1, 2, 3]
    assert summary["total_epochs"] == 8 and all(row["epochs"] == 2 for row in summary["levels"])
    assert summary["total_train_seconds"] == pytest.approx(sum(r["train_seconds"] for r in summary["levels"]), abs=0.01)
    for row in summary["levels"]:
        level = read_json(run / f"level_{row['level']}" / "summary.json")
        assert row["test_acc"] == level["test_acc"] and row["density"] == level["density"]
        assert row["trained_compressible_params"] == level["trained_compressible_params"]
        assert len((run / f"level_{row['level']}" / "metrics.jsonl").read_text().splitlines()) == 2


def test_global_imp_prunes_round_f_of_the_trained_weights_per_level_and_nests_the_masks(trained):
    run, _ = trained("imp")
    total = sum(LENET300.values())
    previous, trained_count = None, total
    for k in (1, 2, 3):
        masks = masks_of(run / f"level_{k}")
        assert sorted(masks) == sorted(LENET300) and all(m.dtype == torch.bool for m in masks.values())
        expected = trained_count - round(0.5 * trained_count)
        assert sum(counts(masks).values()) == expected, k
        if previous is not None:
            assert all(not (masks[n] & ~previous[n]).any() for n in masks), f"level {k} not within level {k - 1}"
        assert read_json(run / f"level_{k}" / "summary.json")["trained_compressible_params"] == expected
        previous, trained_count = masks, expected
    assert trained_count == 33275


def test_imp_removes_the_smallest_trained_magnitudes_of_the_previous_level(trained):
    run, _ = trained("imp")
    for k in (1, 2, 3):
        before = load_file(str(run / f"level_{k - 1}" / "model.safetensors"))
        old = masks_of(run / f"level_{k - 1}") or {n: torch.ones_like(before[n], dtype=torch.bool) for n in LENET300}
        new = masks_of(run / f"level_{k}")
        kept = torch.cat([before[n][new[n]].abs() for n in LENET300])
        removed = torch.cat([before[n][old[n] & ~new[n]].abs() for n in LENET300])
        assert kept.min() >= removed.max(), k


def test_layer_scope_prunes_per_layer_and_stops_at_exactly_round_d_per_layer(trained):
    run, _ = trained("layer")
    current = dict(LENET300)
    directories = level_dirs(run)
    assert [p.name for p in directories] == ["level_0", "level_1", "level_2", "level_3"]
    previous = None
    for directory in directories[1:]:
        masks = masks_of(directory)
        expected = {n: max(t - round(0.45 * t), round(0.2 * LENET300[n])) for n, t in current.items()}
        assert counts(masks) == expected, directory.name
        if previous is not None:
            assert all(not (masks[n] & ~previous[n]).any() for n in masks)
        previous, current = masks, expected
    assert current == {n: round(0.2 * size) for n, size in LENET300.items()}
    assert read_json(run / "summary.json")["level"] == 3


def test_global_density_target_runs_levels_until_exactly_round_d_total(trained):
    run, _ = trained("freeze")
    total = sum(LENET300.values())
    target = round(0.05 * total)
    directories = level_dirs(run)
    assert len(directories) == 6  # 0.5, 0.25, 0.125, 0.0625, then the target
    trained_count = total
    for directory in directories[1:]:
        expected = max(trained_count - round(0.5 * trained_count), target)
        assert sum(counts(masks_of(directory)).values()) == expected, directory.name
        trained_count = expected
    assert trained_count == target and read_json(run / "summary.json")["trained_compressible_params"] == target


# ---------------------------------------------------------------------------------------------------------------
# rewinding


@pytest.mark.parametrize("kind, after_steps", [("rewind 0", 0), ("rewind 3it", 3), ("imp", STEPS_PER_EPOCH)])
def test_every_level_after_0_starts_from_the_rewind_point(trained, kind, after_steps):
    run, recorder = trained(kind)
    rewind = load_file(str(run / "level_0" / "rewind.safetensors"))
    if after_steps == 0:  # the init of the run seed
        reference = initialise(build_model("lenet300", (1, 28, 28), 10), 0).state_dict()
    else:  # the weights after that many optimizer steps of level 0
        reference = recorder.level0_steps[after_steps - 1]
    assert_same_tensors(rewind, clone(reference), "rewind point")
    assert_same_tensors(recorder.starts[(0, None)], clone(initialise(build_model("lenet300", (1, 28, 28), 10), 0)
                                                         .state_dict()), "level 0 start")
    levels = sorted(level for level, branch in recorder.starts if branch is None and level > 0)
    assert levels == list(range(1, len(level_dirs(run))))
    for level in levels:
        assert_same_tensors(recorder.starts[(level, None)], rewind, f"start of level {level}")


def test_untrained_entries_are_exactly_zero_after_every_level_in_prune_mode(trained):
    run, _ = trained("imp")
    for directory in level_dirs(run)[1:]:
        state, masks = load_file(str(directory / "model.safetensors")), masks_of(directory)
        for name, mask in masks.items():
            untrained = state[name][~mask]
            assert torch.equal(untrained, torch.zeros_like(untrained)), f"{directory.name} {name}"
            assert (state[name][mask] != 0).any()


def test_untrained_entries_are_the_seeded_init_after_every_level_in_freeze_mode(trained):
    run, _ = trained("freeze")
    model = build_model("lenet300", (1, 28, 28), 10)
    init = initial_values(model, 0, list(LENET300))
    rewind = load_file(str(run / "level_0" / "rewind.safetensors"))
    previous = None
    for directory in level_dirs(run)[1:]:
        state, masks = load_file(str(directory / "model.safetensors")), masks_of(directory)
        for name, mask in masks.items():
            assert torch.equal(state[name][~mask], init[name][~mask]), f"{directory.name} {name}"
        if previous is not None:  # weights trained in the previous level and removed now are back at init
            removed = {n: previous[n] & ~masks[n] for n in masks}
            assert all(removed[n].any() for n in masks)
            assert all((rewind[n][removed[n]] != init[n][removed[n]]).any() for n in masks)  # not by the rewind
        previous = masks


# ---------------------------------------------------------------------------------------------------------------
# resume, re-runs, device


def test_an_interruption_during_level_2_resumes_bit_identically(trained, tmp_path, capsys):
    reference, _ = trained("imp")
    run = tmp_path / "run"
    with pytest.MonkeyPatch.context() as patch:
        interrupt_after(patch, "level_2", 1)
        code, _, err = run_cli(["train", *RUNS["imp"], "--out", run], capsys)
    assert code == 130, err
    assert (run / "level_1" / "summary.json").is_file() and checkpoint_epoch(run / "level_2") == 1
    assert not (run / "level_2" / "summary.json").exists() and not (run / "level_3").exists()
    assert not (run / "summary.json").exists()
    code, _, err = run_cli(["train", *RUNS["imp"], "--out", run], capsys)  # the same command does not resume it
    one_line_error(code, err, f"--resume {run}")
    code, _, err = run_cli(["train", "--resume", run, "--device", "cpu", "--quiet"], capsys)
    assert code == 0, err
    assert_same_finished_run(run, reference)
    assert read_json(run / "config.json")["device"] == "auto"


def test_rerunning_a_finished_imp_run_is_a_no_op(trained, capsys, monkeypatch):
    run, _ = trained("imp")
    before = file_times(run)

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(compress.run.levels, "train_prepared", no_training)
    monkeypatch.setattr(compress.run.pipeline, "compute_scores", no_training)
    for args in (["train", *RUNS["imp"], "--out", run],
                 ["train", *RUNS["imp"], "--device", "cpu", "--out", run],  # device is no part of the run's identity
                 ["train", "--resume", run, "--quiet"],
                 ["train", "--resume", run, "--device", "cpu", "--quiet"]):
        code, _, err = run_cli(args, capsys)
        assert code == 0, (args, err)
        assert file_times(run) == before, args


@pytest.mark.slow  # starts a process: .ci/run runs it (pytest -m slow)
def test_a_kill_9_during_level_2_resumes_bit_identically(trained, tmp_path, capsys):
    reference, _ = trained("imp")
    run = tmp_path / "run"
    kill_9_when(["train", *RUNS["imp"], "--out", run], run / "level_2" / "checkpoint.safetensors", tmp_path / "child.log")
    assert not (run / "level_2" / "summary.json").exists() and not (run / "summary.json").exists()
    code, _, err = run_cli(["train", "--resume", run, "--quiet"], capsys)
    assert code == 0, err
    assert_same_finished_run(run, reference)


@pytest.mark.slow  # starts a process: .ci/run runs it (pytest -m slow)
def test_python_m_cli_main_runs_the_cli():
    child = subprocess.run([sys.executable, "-m", "cli.main", "--version"], cwd=ROOT, capture_output=True, text=True,
                           timeout=TIMEOUT)
    assert child.returncode == 0 and "compress" in child.stdout, child.stderr


def test_oneshot_resume_never_scores_again_and_ends_bit_identically(trained, tmp_path, capsys, monkeypatch):
    reference, _ = trained("snip")
    run = tmp_path / "run"
    with pytest.MonkeyPatch.context() as patch:
        interrupt_after(patch, "run", 1)
        code, _, err = run_cli(["train", *RUNS["snip"], "--out", run], capsys)
    assert code == 130, err
    assert checkpoint_epoch(run) == 1 and not (run / "summary.json").exists()

    def no_scoring(*args, **kwargs):
        raise AssertionError("resume scored again")

    monkeypatch.setattr(compress.run.pipeline, "compute_scores", no_scoring)
    code, _, err = run_cli(["train", "--resume", run, "--quiet"], capsys)
    assert code == 0, err
    assert_same_tensors(load_file(str(run / "masks.safetensors")), load_file(str(reference / "masks.safetensors")))
    assert_same_tensors(load_file(str(run / "model.safetensors")), load_file(str(reference / "model.safetensors")))
    assert read_json(run / "summary.json")["test_acc"] == read_json(reference / "summary.json")["test_acc"]


# ---------------------------------------------------------------------------------------------------------------
# pack --level


def test_pack_packs_the_last_level_or_the_level_asked_for(trained, tmp_path, capsys):
    run, _ = trained("imp")
    code, out, err = run_cli(["pack", run, "-o", tmp_path / "a.cpk"], capsys)
    assert code == 0, err
    info = formats.read_info(tmp_path / "a.cpk")
    assert info["schema"]["manifest"]["level"] == 3
    assert info["totals"]["masked_trained"] == sum(counts(masks_of(run / "level_3")).values()) == 33275
    code, out, err = run_cli(["pack", run, "-o", tmp_path / "b.cpk", "--level", "1"], capsys)
    assert code == 0, err
    info = formats.read_info(tmp_path / "b.cpk")
    assert info["schema"]["manifest"]["level"] == 1
    assert info["totals"]["masked_trained"] == sum(counts(masks_of(run / "level_1")).values()) == 133100


def test_pack_of_a_level_the_run_does_not_have_names_its_levels(trained, tmp_path, capsys):
    run, _ = trained("imp")
    code, _, err = run_cli(["pack", run, "-o", tmp_path / "a.cpk", "--level", "9"], capsys)
    one_line_error(code, err, "no level 9", "0, 1, 2, 3")
    assert not (tmp_path / "a.cpk").exists()


def test_pack_level_on_a_oneshot_run_is_refused(trained, tmp_path, capsys):
    run, _ = trained("snip")
    code, _, err = run_cli(["pack", run, "-o", tmp_path / "a.cpk", "--level", "0"], capsys)
    one_line_error(code, err, "--level", "drop --level")
    assert not (tmp_path / "a.cpk").exists()


def test_a_freeze_imp_run_packs_and_loads_to_the_runs_own_outputs(trained, tmp_path, capsys):
    run, _ = trained("freeze")
    last = level_dirs(run)[-1]
    code, _, err = run_cli(["pack", run, "-o", tmp_path / "a.cpk"], capsys)  # checks untrained = seeded init
    assert code == 0, err
    code, _, err = run_cli(["pack", run, "-o", tmp_path / "exact.cpk", "--values", "fp32"], capsys)
    assert code == 0, err
    info = formats.read_info(tmp_path / "exact.cpk")
    assert info["schema"]["manifest"]["level"] == 5 and info["schema"]["mode"] == "freeze"
    assert info["totals"]["masked_trained"] == round(0.05 * sum(LENET300.values()))
    model = build_model("lenet300", (1, 28, 28), 10)
    model.load_state_dict(load_file(str(last / "model.safetensors")))
    model.eval()
    inputs = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(formats.load(tmp_path / "exact.cpk")(inputs), model(inputs))
        assert torch.allclose(formats.load(tmp_path / "a.cpk")(inputs), model(inputs), atol=1e-2)


# ---------------------------------------------------------------------------------------------------------------
# branches, interspace


def test_branches_train_randomized_and_reinitialized_controls_beside_every_level(trained):
    run, recorder = trained("branches")
    rewind = load_file(str(run / "level_0" / "rewind.safetensors"))
    assert not any((run / "level_0").glob("branch_*"))
    for k in (1, 2):
        level = run / f"level_{k}"
        masks = masks_of(level)
        assert {p.name for p in level.glob("branch_*")} == {"branch_randomize", "branch_reinit"}
        for branch in ("randomize", "reinit"):
            assert (level / f"branch_{branch}" / "model.safetensors").is_file()
            summary = read_json(level / f"branch_{branch}" / "summary.json")
            assert summary["level"] == k and summary["branch"] == branch
        randomized = masks_of(level / "branch_randomize")
        assert counts(randomized) == counts(masks)
        assert all(not torch.equal(randomized[n], masks[n]) for n in masks)
        assert_same_tensors(recorder.starts[(k, "randomize")], rewind, f"randomize {k} start")
        assert_same_tensors(masks_of(level / "branch_reinit"), masks)
        start = recorder.starts[(k, "reinit")]
        assert all(not torch.equal(start[n][masks[n]], rewind[n][masks[n]]) for n in masks)
    summary = read_json(run / "summary.json")
    assert [sorted(row.get("branches", {})) for row in summary["levels"]] == [[], ["randomize", "reinit"],
                                                                            ["randomize", "reinit"]]
    assert summary["total_epochs"] == 3 + 4


def test_interspace_imp_prunes_the_coefficients(trained, tmp_path, capsys):
    run, _ = trained("interspace")
    masks = masks_of(run / "level_1")
    coefficients = [n for n in masks if n.endswith(".coefficients")]
    assert coefficients and "conv1.coefficients" in coefficients
    assert all(n.endswith(".coefficients") or n == "fc.weight" or ".shortcut." in n for n in masks)  # 1x1 stay weights
    total = sum(m.numel() for m in masks.values())
    assert sum(counts(masks).values()) == total - round(0.5 * total)
    assert any(not masks[n].all() for n in coefficients)
    state = load_file(str(run / "level_1" / "model.safetensors"))
    assert all(torch.equal(state[n][~masks[n]], torch.zeros_like(state[n][~masks[n]])) for n in masks)
    code, _, err = run_cli(["pack", run, "-o", tmp_path / "a.cpk", "--values", "fp32"], capsys)
    assert code == 0, err
    assert_same_tensors(formats.load_state_dict(tmp_path / "a.cpk", factored=True), state)


# ---------------------------------------------------------------------------------------------------------------
# option errors, plan, help


OPTION_ERRORS = {
    "option of another strategy": (["--method", "snip", "--density", "0.1", "--levels", "3"], ["--levels (imp)"]),
    "neither levels nor density": (["--method", "imp"], ["--levels", "--density"]),
    "both levels and density": (["--method", "imp", "--levels", "2", "--density", "0.1"], ["not both"]),
    "bad rewind": (["--method", "imp", "--levels", "2", "--rewind", "5x"], ["--rewind", "'5x'"]),
    "rewind after the epochs": (["--method", "imp", "--levels", "2", "--rewind", "99ep"], ["--rewind 99ep"]),
    "prune fraction above 1": (["--method", "imp", "--levels", "2", "--prune-fraction", "1.5"], ["--prune-fraction", "1.5"]),
    "unknown branch": (["--method", "imp", "--levels", "2", "--branch", "foo"], ["foo", "randomize, reinit"]),
    "start density without score": (["--method", "imp", "--levels", "2", "--start-density", "0.5"],
                                    ["--start-density", "--score"]),
}


@pytest.mark.parametrize("case", list(OPTION_ERRORS))
def test_a_bad_strategy_option_is_a_one_line_error_before_anything_is_written(tmp_path, capsys, case):
    args, phrases = OPTION_ERRORS[case]
    code, _, err = run_cli(["train", *QUICK, "--epochs", "1", *args, "--out", tmp_path / "run"], capsys)
    one_line_error(code, err, *phrases)
    assert list(tmp_path.iterdir()) == []


def test_a_rewind_step_after_level_0_is_refused_before_the_run_directory_is_made(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(["train", *QUICK, "--epochs", "1", "--method", "imp", "--levels", "1", "--rewind", "99it",
                            "--out", out], capsys)
    one_line_error(code, err, "--rewind 99it", "4 steps")
    assert list(tmp_path.iterdir()) == []


def test_plan_json_lists_every_layer_with_round_d_trained_per_layer(capsys):
    code, out, err = run_cli(["plan", "--model", "lenet300", "--data", "synthetic", "--subset", "256", "--method",
                              "synflow", "--scope", "layer", "--density", "0.01", "--json"], capsys)
    assert code == 0, err
    rows = json.loads(out)
    assert [row["layer"] for row in rows] == list(LENET300)
    for row in rows:
        assert set(row) == {"layer", "shape", "total", "trained", "density", "mode", "kind"}
        assert row["total"] == LENET300[row["layer"]] and row["trained"] == round(0.01 * row["total"])
        assert row["density"] == row["trained"] / row["total"] and row["mode"] == "prune" and row["kind"] == "weights"


def test_train_help_documents_the_imp_options(capsys):
    code, out, _ = run_cli(["train", "--help"], capsys)
    assert code == 0
    blocks, current = {}, None
    for line in out.splitlines():
        stripped = line.strip()
        if line.startswith("  -") and stripped.startswith("--"):
            current = stripped.split()[0].rstrip(",")
            blocks[current] = stripped
        elif current is not None and line.startswith("      ") and stripped:
            blocks[current] += " " + stripped
        else:
            current = None
    for option in ("--levels", "--prune-fraction", "--rewind", "--branch", "--start-density"):
        assert option in blocks, option
        assert "--method imp" in " ".join(blocks[option].split()), blocks[option]


# ---------------------------------------------------------------------------------------------------------------
# the strategy's level arithmetic, without training


def levels_of(shapes: dict, scope: str, density=None, levels=None, fraction=0.2, max_levels=200):
    """Run IMP's next_level on random "trained" weights until it stops; the masks of every level after 0."""
    config = SimpleNamespace(scope=scope, density=density, mode="prune", seed=0)
    context = LevelContext(config, ImpOptions(levels=levels, prune_fraction=fraction), list(shapes), shapes, {}, None)
    strategy, generator = IterativeMagnitudePruning(), torch.Generator().manual_seed(0)
    plan, level, result = None, 0, []
    while len(result) < max_levels:
        weights = {n: torch.randn(shape, generator=generator) for n, shape in shapes.items()}
        following = strategy.next_level(context, level, weights, plan, {})
        if following is None:
            break
        plan, level = following.plan, level + 1
        result.append({n: m.clone() for n, m in plan.masks.items()})
    return result


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_next_level_keeps_trained_minus_round_f_trained_and_nests(scope):
    shapes = {"a.weight": (37, 11), "b.weight": (5, 3, 3, 3), "c.weight": (10, 7)}
    result = levels_of(shapes, scope, levels=6, fraction=0.3)
    assert len(result) == 6
    current = {n: torch.ones(s, dtype=torch.bool) for n, s in shapes.items()}
    for masks in result:
        if scope == "global":
            t = sum(int(m.sum()) for m in current.values())
            assert sum(counts(masks).values()) == t - round(0.3 * t)
        else:
            assert counts(masks) == {n: int(m.sum()) - round(0.3 * int(m.sum())) for n, m in current.items()}
        assert all(not (masks[n] & ~current[n]).any() for n in masks)
        current = masks


@pytest.mark.parametrize("scope, shapes", [("layer", {"a.weight": (64, 10), "b.weight": (100, 100)}),
                                           ("global", {"a.weight": (10,)})])
def test_a_density_target_is_reached_exactly_even_when_round_f_trained_is_0(scope, shapes):
    density = 0.001 if scope == "layer" else 0.1
    result = levels_of(shapes, scope, density=density, fraction=0.2)
    last = counts(result[-1])
    if scope == "layer":
        assert last == {n: round(density * torch.Size(s).numel()) for n, s in shapes.items()}
    else:
        assert sum(last.values()) == round(density * sum(torch.Size(s).numel() for s in shapes.values()))


def test_levels_n_that_would_prune_nothing_at_some_level_is_refused_before_the_run():
    """--levels N with F x trained rounding to 0 at a level is a UserError naming the fix, checked up front."""
    config = SimpleNamespace(scope="global", density=None, mode="prune", seed=0, epochs=1)
    strategy = IterativeMagnitudePruning()
    with pytest.raises(UserError, match="removes no weight at level 7.*--prune-fraction"):
        strategy.check_model(config, ImpOptions(levels=8, prune_fraction=0.2), {"a.weight": 10}, 4)
    strategy.check_model(config, ImpOptions(levels=6, prune_fraction=0.2), {"a.weight": 10}, 4)
    assert len(levels_of({"a.weight": (10,)}, "global", levels=6, fraction=0.2)) == 6
