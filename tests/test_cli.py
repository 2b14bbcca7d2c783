"""The command line: end-to-end runs, the run directory, resume, config files and every bad input."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import interrupted_run, run_cli

QUICK = ["--model", "lenet300", "--data", "synthetic", "--subset", "256", "--epochs", "1", "--batch-size", "64",
         "--quiet"]


def test_train_writes_a_complete_run_directory(tmp_path, capsys):
    out = tmp_path / "a"
    code, _, err = run_cli(["train", *QUICK, "--method", "freezenet", "--density", "0.05", "--out", str(out)], capsys)
    assert code == 0, err
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "masks.safetensors", "model.safetensors", "metrics.jsonl", "summary.json"} <= names
    summary = json.loads((out / "summary.json").read_text())
    for key in ("test_acc", "density", "trained_params", "total_params", "method", "mode", "seed"):
        assert key in summary
    assert summary["method"] == "freezenet" and summary["mode"] == "freeze"
    assert summary["density"] == pytest.approx(0.05, abs=1e-5)
    assert summary["total_params"] == 266_610
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1] and {"train_loss", "test_acc"} <= set(metrics[0])
    state = load_file(str(out / "model.safetensors"))
    masks = load_file(str(out / "masks.safetensors"))
    assert set(state) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "fc3.weight", "fc3.bias"}
    assert int(sum(m.sum() for m in masks.values())) == summary["trained_compressible_params"]
    assert json.loads((out / "config.json").read_text())["density"] == 0.05


def test_prune_run_stores_zeros_where_masked(tmp_path, capsys):
    out = tmp_path / "p"
    code, _, err = run_cli(["train", *QUICK, "--method", "snip", "--sparsity", "0.9", "--out", str(out)], capsys)
    assert code == 0, err
    state, masks = load_file(str(out / "model.safetensors")), load_file(str(out / "masks.safetensors"))
    for name, mask in masks.items():
        assert bool((state[name][~mask.bool()] == 0).all())


def test_rerunning_a_finished_run_skips_it_and_a_different_config_is_refused(tmp_path, capsys):
    out = tmp_path / "r"
    args = ["train", *QUICK, "--density", "0.1", "--out", str(out)]
    assert run_cli(args, capsys)[0] == 0
    code, _, err = run_cli(args, capsys)
    assert code == 0 and "nothing to do" in err
    code, _, err = run_cli(["train", *QUICK, "--density", "0.2", "--out", str(out)], capsys)
    assert code == 2 and "different config" in err
    assert run_cli(["train", *QUICK, "--density", "0.2", "--out", str(out), "--overwrite"], capsys)[0] == 0


def test_a_finished_run_written_before_a_config_key_existed_is_still_recognised(tmp_path, capsys):
    out = tmp_path / "old"
    args = ["train", *QUICK, "--density", "0.1", "--out", str(out)]
    assert run_cli(args, capsys)[0] == 0
    stored = json.loads((out / "config.json").read_text())
    del stored["eval_every"]  # as written by a version without --eval-every
    (out / "config.json").write_text(json.dumps(stored))
    code, _, err = run_cli(args, capsys)
    assert code == 0 and "nothing to do" in err
    code, _, err = run_cli([*args, "--eval-every", "2"], capsys)
    assert code == 2 and "different config" in err


def test_a_run_written_before_score_mode_existed_is_recognised_as_scored_in_train_mode(tmp_path, capsys):
    out = tmp_path / "old"
    args = ["train", *QUICK, "--density", "0.1", "--out", str(out)]
    assert run_cli([*args, "--score-mode", "train"], capsys)[0] == 0
    stored = json.loads((out / "config.json").read_text())
    assert stored["score_mode"] == "train"
    del stored["score_mode"]  # as written by a version without --score-mode, which scored in train mode
    (out / "config.json").write_text(json.dumps(stored))
    code, _, err = run_cli([*args, "--score-mode", "train"], capsys)
    assert code == 0 and "nothing to do" in err
    code, _, err = run_cli(args, capsys)  # the default is now eval mode: another experiment
    assert code == 2 and "different config" in err
    code, _, err = run_cli([*args, "--score-mode", "test"], capsys)
    assert code == 2 and "'test' is not one of 'eval', 'train'" in err


def test_resume_after_interruption_ends_with_the_uninterrupted_weights(tmp_path, capsys, monkeypatch):
    args = ["--model", "lenet300", "--data", "synthetic", "--subset", "256", "--epochs", "3", "--batch-size", "64",
            "--quiet", "--method", "freezenet", "--density", "0.1"]
    assert run_cli(["train", *args, "--out", str(tmp_path / "full")], capsys)[0] == 0

    code, err = interrupted_run(["train", *args, "--out", str(tmp_path / "cut")], capsys, monkeypatch)
    assert code == 130 and "--resume" in err
    assert not (tmp_path / "cut" / "summary.json").exists()

    code, _, err = run_cli(["train", "--resume", str(tmp_path / "cut"), "--quiet"], capsys)
    assert code == 0, err
    full = load_file(str(tmp_path / "full" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


def test_plan_prints_the_per_layer_table(capsys):
    code, out, err = run_cli(["plan", "--model", "lenet5", "--data", "synthetic", "--method", "snip",
                              "--sparsity", "0.99"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["parameter", "shape", "weights", "trained", "density", "mode"]
    assert [line.split()[0] for line in lines[1:5]] == ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"]
    assert "430,500" in lines[5] and "4,305" in lines[5]
    assert "sparsity 99.0000%" in out


def test_config_files_in_yaml_and_toml_with_command_line_overrides(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("model: lenet300\ndata: synthetic\nmethod: magnitude\nsparsity: 0.5\n")
    (tmp_path / "c.toml").write_text('model = "lenet300"\ndata = "synthetic"\nmethod = "magnitude"\ndensity = 0.5\n')
    for name in ("c.yaml", "c.toml"):
        code, out, err = run_cli(["plan", "--config", str(tmp_path / name), "--density", "0.25"], capsys)
        assert code == 0, err
        assert "density 25.0000%" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--density", "0"], "density must be in (0, 1]"),
        (["--density", "1.5"], "density must be in (0, 1]"),
        (["--sparsity", "1.0"], "sparsity must be in [0, 1)"),
        (["--density", "0.1", "--sparsity", "0.9"], "not both"),
        ([], "--density D or --sparsity S"),
        (["--density", "0.1", "--model", "lenet6"], "unknown model 'lenet6'; known: lenet300, lenet5"),
        (["--density", "0.1", "--method", "snap"], "unknown method 'snap'; known: cops, dense, freezenet"),
        (["--density", "0.1", "--data", "imagenet"], "unknown data set"),
        (["--density", "0.1", "--data-root", "/nonexistent/data"], "data root /nonexistent/data does not exist"),
        (["--density", "abc"], "'abc' is not a valid float"),
        (["--density", "0.1", "--seed", "-3"], "seed must be in [0, 2**32)"),
        (["--density", "0.1", "--epochs", "0"], "epochs must be a positive integer"),
        (["--density", "0.1", "--data-shape", "3x32"], "CxHxW"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    base = ["train", "--model", "lenet300", "--data", "synthetic", "--quiet", "--out", str(out)]
    if "--model" in args:
        base = [a for a in base if a not in ("--model", "lenet300")]
    code, stdout, err = run_cli([*base, *args], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert "Traceback" not in err and not out.exists()


def test_non_writable_output_is_rejected(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_cli(["train", *QUICK, "--density", "0.1", "--out", str(blocker / "run")], capsys)
    assert code == 2 and "not writable" in err
    code, _, err = run_cli(["train", *QUICK, "--density", "0.1", "--out", str(blocker)], capsys)
    assert code == 2 and "not a directory" in err


def test_unfinished_run_directory_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code, _, err = run_cli(["train", *QUICK, "--density", "0.1", "--out", str(out)], capsys)
    assert code == 2 and "--resume" in err and (out / "notes.txt").read_text() == "keep me"


def test_resume_rejects_other_options_and_non_run_directories(tmp_path, capsys):
    code, _, err = run_cli(["train", "--resume", str(tmp_path), "--quiet"], capsys)
    assert code == 2 and "not a run directory" in err
    code, _, err = run_cli(["train", "--resume", str(tmp_path), "--epochs", "3"], capsys)
    assert code == 2 and "--epochs" in err


def test_help_explains_density_sparsity_and_modes():
    result = subprocess.run([sys.executable, "-m", "cli.main", "train", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for phrase in ("sparsity S = 1 - D", "prune", "freeze", "--resume", "freezenet"):
        assert phrase in result.stdout


def test_console_script_exit_code_is_2_on_bad_input():
    result = subprocess.run([sys.executable, "-m", "cli.main", "plan", "--model", "nope", "--density", "0.1"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("error: unknown model 'nope'")
    assert "Traceback" not in result.stderr
