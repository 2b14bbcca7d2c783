"""--precision bf16|fp16: autocast forward and backward, float32 weights, masks and frozen values exact, and the
fp16 loss scale carried across a resume (run on the CPU here; the GPU check script runs it on CUDA)."""
import json

import pytest
import torch
from safetensors.torch import load_file

import compress
from cli_helpers import interrupted_run, run_cli
from compress.config import build_config
from compress.errors import UserError
from formats.models import build_model

ARGS = ["--model", "lenet300", "--data", "synthetic", "--subset", "256", "--batch-size", "64", "--quiet",
        "--density", "0.1"]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("method, mode", [("snip", "prune"), ("freezenet", "freeze")])
def test_mixed_precision_keeps_float32_weights_and_the_untrained_entries_exact(tmp_path, capsys, precision, method,
                                                                              mode):
    out = tmp_path / "run"
    code, _, err = run_cli(["train", *ARGS, "--epochs", "2", "--method", method, "--precision", precision,
                            "--out", out], capsys)
    assert code == 0, err
    weights, masks = load_file(out / "model.safetensors"), load_file(out / "masks.safetensors")
    initial = compress.initialise(build_model("lenet300", (1, 28, 28), 10), 0).state_dict()
    assert all(w.dtype == torch.float32 for w in weights.values())
    for name, mask in masks.items():
        untrained = weights[name][~mask.bool()]
        expected = initial[name][~mask.bool()] if mode == "freeze" else torch.zeros_like(untrained)
        assert torch.equal(untrained, expected), name
        assert not torch.equal(weights[name][mask.bool()], initial[name][mask.bool()])  # the trained ones moved
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(m["train_loss"])) for m in metrics)
    assert ("loss_scale" in metrics[-1]) == (precision == "fp16")
    assert json.loads((out / "config.json").read_text())["precision"] == precision


def test_bf16_trains_close_to_fp32(tmp_path, capsys):
    losses = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        assert run_cli(["train", *ARGS, "--epochs", "2", "--method", "snip", "--precision", precision, "--out", out],
                       capsys)[0] == 0
        losses[precision] = [json.loads(line)["train_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses["bf16"] != losses["fp32"]  # autocast did act
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.02)  # bf16 keeps 8 bits of mantissa


def test_an_fp16_run_resumed_after_an_interruption_carries_its_loss_scale_and_ends_bit_exact(tmp_path, capsys,
                                                                                            monkeypatch):
    args = ["train", *ARGS, "--epochs", "3", "--method", "freezenet", "--precision", "fp16"]
    assert run_cli([*args, "--out", tmp_path / "full"], capsys)[0] == 0
    assert interrupted_run([*args, "--out", tmp_path / "cut"], capsys, monkeypatch)[0] == 130
    code, _, err = run_cli(["train", "--resume", tmp_path / "cut", "--quiet"], capsys)
    assert code == 0, err
    full, resumed = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    scales = [[json.loads(line)["loss_scale"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("full", "cut")]
    assert scales[0] == scales[1]
    assert [s["_growth_tracker"] for s in scales[0]] == [4, 8, 12]  # 4 steps an epoch: restored, not restarted


def test_an_unknown_precision_is_a_user_error():
    config = build_config(None, {"model": "lenet300", "data": "synthetic", "method": "snip", "density": 0.1,
                                 "precision": "fp8"})
    with pytest.raises(UserError, match="unknown precision 'fp8'; known: fp32, bf16, fp16"):
        config.resolved()
