"""Packing finished runs: exact rebuilds, accuracy kept, plain modules, honest sizes, and the pack/info/eval CLI."""
import json
import shutil

import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file, save_file

import formats
import formats.artifact
import formats.container
from formats.errors import OutputError
from compress.data import load_data
from formats.models import build_model
from compress.packing import pack_run
from compress.training import evaluate
from cli.main import main
from cli_helpers import run_cli

KINDS = ["freeze", "prune", "dense", "bn"]


def read_json(path):
    return json.loads(path.read_text())


def run_model(run_dir) -> torch.nn.Module:
    """The run's own model: the architecture with model.safetensors loaded, in eval mode."""
    summary = read_json(run_dir / "summary.json")
    model = build_model(summary["model"], tuple(summary["input_shape"]), summary["num_classes"])
    model.load_state_dict(load_file(str(run_dir / "model.safetensors")), strict=True)
    return model.eval()


def accuracy_of(model, run_dir) -> float:
    summary, config = read_json(run_dir / "summary.json"), read_json(run_dir / "config.json")
    data = load_data(summary["data"], shape=tuple(summary["input_shape"]), num_classes=summary["num_classes"],
                     seed=config["seed"])
    return evaluate(model, data.test, 256, torch.device("cpu"))["acc"]


# ---------------------------------------------------------------------------------------------------------------
# What comes back out


@pytest.mark.parametrize("kind", KINDS)
def test_fp32_pack_rebuilds_the_run_state_dict_bit_exactly(finished_run, packed, kind):
    expected = load_file(str(finished_run(kind) / "model.safetensors"))
    rebuilt = formats.load_state_dict(packed(kind, "fp32"))
    assert set(rebuilt) == set(expected)
    for name, tensor in expected.items():
        assert rebuilt[name].dtype == tensor.dtype and torch.equal(rebuilt[name], tensor), name
    if kind == "bn":  # buffers are covered: running statistics and the int64 batch counter
        assert any(name.endswith("running_var") for name in expected)
        counters = [name for name in expected if name.endswith("num_batches_tracked")]
        assert counters and all(rebuilt[name].dtype == torch.int64 and int(rebuilt[name]) > 0 for name in counters)


@pytest.mark.parametrize("kind", KINDS)
def test_fp32_loaded_model_computes_exactly_what_the_run_model_computes(finished_run, packed, kind):
    summary = read_json(finished_run(kind) / "summary.json")
    inputs = torch.randn(16, *summary["input_shape"], generator=torch.Generator().manual_seed(3))
    loaded, reference = formats.load(packed(kind, "fp32")), run_model(finished_run(kind))
    with torch.no_grad():
        assert torch.equal(loaded(inputs), reference(inputs))
    assert accuracy_of(loaded, finished_run(kind)) == summary["test_acc"]


@pytest.fixture(scope="module")
def learned_run(tmp_path_factory):
    """``learned_run(method) -> (run directory, fp16 artifact)``: a quick run that learns well above chance (an
    accuracy test on a run at chance could not fail)."""
    cache = {}

    def get(method: str):
        if method not in cache:
            out = tmp_path_factory.mktemp("learned") / method
            assert main(["train", "--model", "lenet300", "--data", "synthetic", "--subset", "1024", "--epochs", "2",
                         "--batch-size", "64", "--quiet", "--method", method, "--density", "0.05",
                         "--out", str(out)]) == 0
            pack_run(out, out.with_suffix(".cpk"))
            cache[method] = out, out.with_suffix(".cpk")
        return cache[method]

    return get


@pytest.mark.parametrize("method", ["freezenet", "snip"])
def test_fp16_pack_keeps_the_test_accuracy_of_a_learned_run_within_a_tenth_of_a_point(learned_run, method):
    run, artifact = learned_run(method)
    summary = read_json(run / "summary.json")
    assert summary["test_acc"] >= 0.18  # chance is 0.1: the run learned (21-35%), so fp16 rounding could show
    accuracy = accuracy_of(formats.load(artifact), run)
    assert abs(accuracy - summary["test_acc"]) <= 0.001


@pytest.mark.parametrize("kind", KINDS)
def test_fp16_pack_keeps_the_test_accuracy_within_a_tenth_of_a_point(finished_run, packed, kind):
    summary = read_json(finished_run(kind) / "summary.json")
    accuracy = accuracy_of(formats.load(packed(kind)), finished_run(kind))
    assert abs(accuracy - summary["test_acc"]) <= 0.001


def test_bf16_values_load_close_to_the_trained_weights(finished_run, tmp_path):
    pack_run(finished_run("prune"), tmp_path / "b.cpk", "bf16")
    assert formats.read_info(tmp_path / "b.cpk")["schema"]["values"] == "BF16"
    rebuilt, expected = formats.load_state_dict(tmp_path / "b.cpk"), load_file(str(finished_run("prune") / "model.safetensors"))
    for name, tensor in expected.items():
        torch.testing.assert_close(rebuilt[name], tensor, rtol=2**-8, atol=1e-30)


@pytest.mark.parametrize("kind", ["freeze", "bn"])
def test_load_returns_a_plain_module_in_eval_mode(finished_run, packed, kind):
    model = formats.load(packed(kind))
    assert isinstance(model, torch.nn.Module)
    assert all(not module.training for module in model.modules())
    assert not torch.nn.utils.parametrize.is_parametrized(model)
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, module
        assert not module._backward_hooks and not module._backward_pre_hooks, module
    for name, parameter in model.named_parameters():
        assert "_orig" not in name and "mask" not in name, name
        assert type(parameter) is torch.nn.Parameter and parameter.device.type == "cpu" and not parameter.is_meta
    for name, buffer in model.named_buffers():
        owner = model.get_submodule(name.rpartition(".")[0])
        assert isinstance(owner, torch.nn.modules.batchnorm._BatchNorm), name
        assert not buffer.is_meta
    assert set(model.state_dict()) == set(load_file(str(finished_run(kind) / "model.safetensors")))
    if kind == "bn":
        assert any(True for _ in model.named_buffers())


# ---------------------------------------------------------------------------------------------------------------
# Writing: deterministic and atomic


def test_packing_the_same_run_twice_gives_identical_bytes(finished_run, packed, tmp_path):
    pack_run(finished_run("freeze"), tmp_path / "again.cpk")
    assert (tmp_path / "again.cpk").read_bytes() == packed("freeze").read_bytes()
    with pytest.raises(OutputError, match="already exists.*--force"):
        pack_run(finished_run("freeze"), tmp_path / "again.cpk")  # never replaced unless told to
    pack_run(finished_run("freeze"), tmp_path / "again.cpk", force=True)
    assert (tmp_path / "again.cpk").read_bytes() == packed("freeze").read_bytes()


@pytest.mark.parametrize("failing", ["replace", "link", "fsync"])
def test_a_failed_write_leaves_no_file_and_keeps_an_existing_artifact(finished_run, tmp_path, monkeypatch, failing):
    """A new file is linked into place (never clobbering), a replaced one renamed over: any failure leaves nothing."""
    def fail(*args, **kwargs):
        raise OSError("disk full")

    out = tmp_path / "a.cpk"
    runs = finished_run("prune"), finished_run("freeze")  # trained before the disk "fills"
    monkeypatch.setattr(formats.container.os, failing, fail)
    if failing != "replace":
        with pytest.raises(OutputError, match="disk full"):
            pack_run(finished_run("prune"), out)
        assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    pack_run(finished_run("freeze"), out)
    before = out.read_bytes()
    if failing != "link":
        monkeypatch.setattr(formats.container.os, failing, fail)
        with pytest.raises(OutputError, match="disk full"):
            pack_run(finished_run("prune"), out, force=True)
        assert list(tmp_path.iterdir()) == [out]
        assert out.read_bytes() == before


# ---------------------------------------------------------------------------------------------------------------
# Sizes: the report adds up and frozen weights cost nothing


@pytest.mark.parametrize("kind", KINDS)
def test_read_info_does_not_rebuild_weights_and_its_totals_add_up(finished_run, packed, monkeypatch, kind):
    path = packed(kind)

    def forbidden(*args, **kwargs):
        raise AssertionError("read_info must not rebuild, decode or regenerate weights")

    for target, name in [(formats.artifact, "rebuild_masked"), (formats.artifact, "rebuild_state_dict"),
                         (formats, "rebuild_state_dict"), (formats.artifact, "decode_mask"),
                         (formats.artifact, "build_architecture"), (formats, "build_architecture")]:
        monkeypatch.setattr(target, name, forbidden)
    info = formats.read_info(path)
    totals, rows = info["totals"], info["tensors"]
    assert totals["file_bytes"] == path.stat().st_size
    assert totals["file_bytes"] == (totals["header_bytes"] + totals["value_bytes"] + totals["mask_bytes"]
                                    + totals["dense_bytes"])
    assert totals["ratio_to_dense_fp32"] == totals["dense_fp32_bytes"] / totals["file_bytes"]
    run_dir = finished_run(kind)
    assert totals["dense_fp32_bytes"] == len(safetensors.torch.save(load_file(str(run_dir / "model.safetensors"))))
    summary = read_json(run_dir / "summary.json")
    assert [r["name"] for r in rows] == list(run_model(run_dir).state_dict())
    if kind == "dense":
        assert totals["masked_total"] == 0 and totals["mask_bytes"] == 0 and totals["density"] == 1.0
    else:
        assert totals["masked_total"] == summary["compressible_params"]
        assert totals["masked_trained"] == summary["trained_compressible_params"]
        assert totals["density"] == pytest.approx(summary["density"])
    assert info["schema"]["manifest"]["test_acc"] == summary["test_acc"]
    assert "tensors" not in info["schema"]


def test_frozen_weights_are_not_stored(finished_run, packed):
    summary = read_json(finished_run("freeze") / "summary.json")
    totals = formats.read_info(packed("freeze"))["totals"]
    trained = summary["trained_compressible_params"]
    dense = summary["total_params"] - summary["compressible_params"]  # biases, stored as fp16
    assert totals["value_raw_bytes"] == 2 * trained and totals["dense_raw_bytes"] == 2 * dense
    assert totals["value_bytes"] < 2 * trained and totals["dense_bytes"] <= 2 * dense + 64  # entropy-coded
    assert totals["mask_bytes"] <= 1.05 * totals["mask_limit_bytes"] + 16 * 3  # near log2 C(n, k) per mask
    assert totals["file_bytes"] < 2 * trained + 2 * dense + totals["mask_bytes"] + 4096
    assert totals["file_bytes"] * 15 < totals["dense_fp32_bytes"]
    # frozen costs no more than pruned at the same density: the seed replaces ~250,000 stored values
    assert abs(totals["file_bytes"] - formats.read_info(packed("prune"))["totals"]["file_bytes"]) < 2048


def test_a_freeze_artifact_with_another_seed_fails_to_load(packed, resign_schema, tmp_path):
    data = packed("freeze").read_bytes()
    changed = tmp_path / "other-seed.cpk"
    changed.write_bytes(resign_schema(data, lambda schema: schema.__setitem__("seed", schema["seed"] + 1)))
    formats.read_info(changed)  # structurally valid: only the regenerated weights tell
    with pytest.raises(formats.FormatError, match="hash mismatch"):
        formats.load_state_dict(changed)
    with pytest.raises(formats.FormatError, match="hash mismatch"):
        formats.load(changed)


def test_pack_refuses_a_run_whose_untrained_entries_were_changed(finished_run, tmp_path, capsys):
    for kind, fragment in [("prune", "are not zero"), ("freeze", "seeded initial value")]:
        run_dir = tmp_path / kind
        shutil.copytree(finished_run(kind), run_dir)
        state = load_file(str(run_dir / "model.safetensors"))
        mask = load_file(str(run_dir / "masks.safetensors"))["fc2.weight"].bool()
        untrained = (~mask).reshape(-1).nonzero()[0, 0]
        state["fc2.weight"].view(-1)[untrained] += 0.5
        save_file(state, str(run_dir / "model.safetensors"))
        code, _, err = run_cli(["pack", run_dir, "-o", tmp_path / f"{kind}.cpk"], capsys)
        assert code == 2 and "inconsistent" in err and fragment in err, err
        assert not (tmp_path / f"{kind}.cpk").exists()


# ---------------------------------------------------------------------------------------------------------------
# CLI


def test_cli_pack_writes_the_artifact_and_prints_the_report(finished_run, tmp_path, capsys):
    out = tmp_path / "f.cpk"
    code, stdout, err = run_cli(["pack", finished_run("freeze"), "-o", out], capsys)
    assert code == 0, err
    assert out.is_file() and stdout.startswith(f"wrote {out}")
    assert "smaller" in stdout and "fc1.weight" in stdout and "information limit" in stdout
    formats.load_state_dict(out)


def test_cli_info_prints_the_table_and_the_json_report(packed, capsys):
    path = packed("freeze")
    code, stdout, err = run_cli(["info", path], capsys)
    assert code == 0, err
    assert stdout.splitlines()[0].split()[:3] == ["tensor", "kind", "trained"]
    assert "mode freeze" in stdout and "method freezenet" in stdout and "smaller" in stdout
    code, stdout, err = run_cli(["info", path, "--json"], capsys)
    assert code == 0, err
    info = json.loads(stdout)
    assert set(info) == {"schema", "tensors", "totals"}
    assert {"file_bytes", "header_bytes", "value_bytes", "mask_bytes", "dense_bytes", "mask_limit_bytes",
            "dense_fp32_bytes", "ratio_to_dense_fp32", "density", "bits_per_trained"} <= set(info["totals"])
    assert info["totals"] == formats.read_info(path)["totals"]
    assert info["schema"]["mode"] == "freeze" and info["schema"]["architecture"]["model"] == "lenet300"


def test_cli_eval_prints_the_accuracy_of_the_run(finished_run, packed, capsys):
    summary = read_json(finished_run("prune") / "summary.json")
    code, stdout, err = run_cli(["eval", packed("prune", "fp32")], capsys)
    assert code == 0, err
    assert f"test accuracy {summary['test_acc']:.2%}" in stdout and "synthetic" in stdout


def test_cli_eval_uses_the_test_split_of_a_run_with_a_nonzero_seed(tmp_path, capsys):
    args = ["--model", "lenet300", "--data", "synthetic", "--subset", "256", "--epochs", "1", "--batch-size", "64",
            "--quiet", "--method", "snip", "--density", "0.05", "--seed", "7"]
    assert run_cli(["train", *args, "--out", tmp_path / "run"], capsys)[0] == 0
    assert run_cli(["pack", tmp_path / "run", "-o", tmp_path / "a.cpk", "--values", "fp32"], capsys)[0] == 0
    code, stdout, err = run_cli(["eval", tmp_path / "a.cpk"], capsys)
    assert code == 0, err
    summary = read_json(tmp_path / "run" / "summary.json")
    assert f"test accuracy {summary['test_acc']:.2%}" in stdout, (stdout, summary["test_acc"])


def _unfinished_copy(tmp_path, finished_run):
    shutil.copytree(finished_run("prune"), tmp_path / "run")
    (tmp_path / "run" / "summary.json").unlink()
    return tmp_path / "run"


def _file_with(tmp_path, data: bytes):
    (tmp_path / "x.cpk").write_bytes(data)
    return tmp_path / "x.cpk"


RANDOM_BYTES = bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).tolist())

ERROR_CASES = {
    "pack-missing-run": (lambda t, r, p: ["pack", t / "nope", "-o", t / "a.cpk"], "does not exist"),
    "pack-unfinished-run": (lambda t, r, p: ["pack", _unfinished_copy(t, r), "-o", t / "a.cpk"], "not a finished run"),
    "pack-output-is-a-directory": (lambda t, r, p: ["pack", r("prune"), "-o", t], "is a directory"),
    "pack-output-directory-missing": (lambda t, r, p: ["pack", r("prune"), "-o", t / "no" / "a.cpk"], "does not exist"),
    "pack-values-fp8": (lambda t, r, p: ["pack", r("prune"), "-o", t / "a.cpk", "--values", "fp8"], "'fp8'"),
    "pack-no-output": (lambda t, r, p: ["pack", r("prune")], "Missing option"),
    "info-missing-file": (lambda t, r, p: ["info", t / "missing.cpk"], "does not exist"),
    "info-random-bytes": (lambda t, r, p: ["info", _file_with(t, RANDOM_BYTES)], "not a compress artifact"),
    "info-empty-file": (lambda t, r, p: ["info", _file_with(t, b"")], "truncated file"),
    "info-truncated-header": (lambda t, r, p: ["info", _file_with(t, p("prune").read_bytes()[:200])], "truncated file"),
    "info-truncated-data": (lambda t, r, p: ["info", _file_with(t, p("prune").read_bytes()[:-10])], "truncated file?"),
    "info-a-safetensors-file": (lambda t, r, p: ["info", r("prune") / "model.safetensors"], "not a compress artifact"),
    "eval-missing-file": (lambda t, r, p: ["eval", t / "missing.cpk"], "does not exist"),
    "eval-truncated": (lambda t, r, p: ["eval", _file_with(t, p("prune").read_bytes()[:-1])], "truncated file?"),
    "eval-bad-batch-size": (lambda t, r, p: ["eval", p("prune"), "--batch-size", "0"], "batch-size"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_input_exits_2_with_one_error_line(finished_run, packed, tmp_path, capsys, case):
    make_args, fragment = ERROR_CASES[case]
    args = make_args(tmp_path, finished_run, packed)
    capsys.readouterr()  # what the fixtures printed while making a run for this case alone
    before = sorted(p.name for p in tmp_path.iterdir())
    code, stdout, err = run_cli(args, capsys)
    assert code == 2, (stdout, err)
    assert err.startswith("error: ") and err.count("\n") == 1 and fragment in err, err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no temporary file left


def test_info_of_an_artifact_with_zero_dense_bytes_is_a_one_line_error(packed, resign_schema, tmp_path, capsys):
    data = resign_schema(packed("prune").read_bytes(), lambda schema: schema.__setitem__("dense_fp32_bytes", 0))
    code, _, err = run_cli(["info", _file_with(tmp_path, data)], capsys)
    assert code == 2 and err.startswith("error: ") and "dense_fp32_bytes" in err


@pytest.mark.parametrize("model_name, shape", [("lenet300", (1, 28, 28)), ("resnet20", (3, 32, 32)),
                                                ("tv:resnet18", (3, 32, 32))])
def test_dense_fp32_bytes_is_the_size_of_the_safetensors_file_without_writing_it(model_name, shape):
    from formats.artifact import SAFETENSORS_DTYPE_NAMES, dense_fp32_bytes

    state = dict(build_model(model_name, shape, 10).state_dict())  # int64 BatchNorm counters in the resnets
    state.update({f"extra.{name}": torch.ones(2, 3, dtype=dtype) for dtype, name in SAFETENSORS_DTYPE_NAMES.items()})
    state.update(scalar=torch.tensor(1.0), empty=torch.zeros(0, 2))
    written = safetensors.torch.save({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    assert dense_fp32_bytes(state) == len(written)
    assert dense_fp32_bytes({}) == len(safetensors.torch.save({}))
