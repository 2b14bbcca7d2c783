"""Lossy int8 trained values (format version 4, and 5 in the compact layout): per-tensor float32 scales, exact dequantisation, every
malformation of a quantised file, pack --values int8 --eval, and loading and export of the result."""
import json

import pytest
import torch

import formats
from cli_helpers import run_cli
from formats.artifact import dequantize, parse_artifact, quantize, rebuild_state_dict, split_artifact
from formats.errors import FormatError
from test_formats import expect_error, make_tiny


@pytest.fixture(scope="module")
def int8_tiny():
    return {mode: make_tiny(mode, values="int8") for mode in ("freeze", "prune")}


def test_quantize_is_symmetric_int8_with_a_float32_scale_and_dequantises_exactly():
    values = torch.tensor([0.5, -0.25, 1.27, -1.27, 0.0])
    q, scale = quantize(values)
    assert q.dtype == torch.int8 and q.tolist() == [50, -25, 127, -127, 0]
    assert scale == float(torch.tensor(1.27 / 127, dtype=torch.float32))
    assert torch.equal(dequantize(q, {"scale": scale}), q.float() * torch.tensor(scale))
    assert (dequantize(q, {"scale": scale}) - values).abs().max() <= scale / 2 + 1e-7
    zeros, scale = quantize(torch.zeros(3))
    assert scale == 1.0 and not zeros.any()


@pytest.mark.parametrize("mode", ["prune", "freeze"])
def test_an_int8_artifact_rebuilds_the_dequantised_values_and_the_untrained_entries_exactly(int8_tiny, mode):
    state = {}
    make_tiny(mode, values="int8", state_out=state)
    artifact = parse_artifact(int8_tiny[mode])
    assert artifact.schema["version"] == 5 and artifact.schema["quantized"] == "I8" and artifact.schema["values"] == "F16"
    assert parse_artifact(make_tiny(mode, values="int8", compact=False)).schema["version"] == 4  # the plain layout
    rebuilt = rebuild_state_dict(artifact)
    stored_tensors = split_artifact(int8_tiny[mode])[1]
    reference = rebuild_state_dict(parse_artifact(make_tiny(mode, values="fp32")))
    for entry in artifact.schema["tensors"]:
        name = entry["name"]
        if entry["kind"] != "masked":
            continue
        stored = stored_tensors[f"v:{name}"]
        assert stored.dtype == "I8" and len(stored.data) == entry["k"]
        diff = (rebuilt[name] - reference[name]).abs()
        assert float(diff.max()) <= entry["scale"] / 2 + 1e-6, name  # at most half a step off
        untrained = reference[name] == state[name]
        assert torch.equal(rebuilt[name][diff == 0], reference[name][diff == 0])
        assert untrained.any()


def test_a_plain_quantised_file_needs_version_4(resign_schema):
    plain = make_tiny("prune", values="int8", compact=False)
    expect_error(resign_schema(plain, lambda s: s.__setitem__("version", 3)), "quantised values need format version 4")


@pytest.mark.parametrize("change, fragment", [
    (lambda s: s.__setitem__("version", 3), "the schema's version 3 differs from the metadata's 5"),
    (lambda s: s.__setitem__("quantized", "F16"), "unknown quantised values dtype"),
])
def test_a_compact_quantised_file_with_another_version_or_dtype_is_a_format_error(int8_tiny, resign_schema, change,
                                                                                 fragment):
    expect_error(resign_schema(int8_tiny["prune"], change), fragment)


@pytest.mark.parametrize("change, fragment", [
    (lambda s: s.__setitem__("quantized", "I4"), "unknown quantised values dtype"),
    (lambda s: next(e for e in s["tensors"] if e["kind"] == "masked").pop("scale") and None, "must have exactly the fields"),
    (lambda s: next(e for e in s["tensors"] if e["kind"] == "masked").__setitem__("scale", -0.5), "not a positive float32"),
    (lambda s: next(e for e in s["tensors"] if e["kind"] == "masked").__setitem__("scale", 0.1), "not a positive float32"),
    (lambda s: next(e for e in s["tensors"] if e["kind"] == "masked").__setitem__("scale", 1), "not a positive float32"),
    (lambda s: s.pop("quantized") and None, "must have exactly the fields"),  # I8 values where F16 ones are declared
])
def test_every_malformed_quantised_file_is_a_format_error(int8_tiny, resign_schema, change, fragment):
    expect_error(resign_schema(int8_tiny["prune"], change), fragment)


def test_a_changed_scale_is_caught_by_the_rebuilt_tensors_hash(int8_tiny, resign_schema):
    def change(schema):
        entry = next(e for e in schema["tensors"] if e["kind"] == "masked")
        entry["scale"] = float(torch.tensor(entry["scale"] * 2, dtype=torch.float32))

    expect_error(resign_schema(int8_tiny["prune"], change), "hash mismatch")


def test_pack_values_int8_with_eval_records_the_accuracy_cost_and_loads_and_exports(finished_run, tmp_path, capsys):
    run = finished_run("freeze")
    code, out, err = run_cli(["pack", run, "-o", tmp_path / "q.cpk", "--values", "int8", "--eval"], capsys)
    assert code == 0, err
    assert "values I8 (one float32 scale per tensor; dense tensors F16)" in out
    assert "evaluated      : packed" in out and "against the run's own" in out
    info = formats.read_info(tmp_path / "q.cpk")
    result = info["schema"]["manifest"]["eval"]
    summary = json.loads((run / "summary.json").read_text())
    assert result["test_acc_unpacked"] == summary["test_acc"] and 0 <= result["test_acc_packed"] <= 1
    fp16 = formats.read_info(finished_run_packed(run, tmp_path, capsys))["totals"]
    assert info["totals"]["value_raw_bytes"] * 2 == fp16["value_raw_bytes"]  # one byte per trained value, not two
    model = formats.load(tmp_path / "q.cpk")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    code, _, err = run_cli(["export", tmp_path / "q.cpk", "-o", tmp_path / "q.onnx"], capsys)
    assert code == 0, err
    code, out, err = run_cli(["info", tmp_path / "q.cpk"], capsys)
    assert code == 0 and "evaluated" in out and "uniformly random mask" in out


def finished_run_packed(run, tmp_path, capsys):
    code, _, err = run_cli(["pack", run, "-o", tmp_path / "h.cpk"], capsys)
    assert code == 0, err
    return tmp_path / "h.cpk"


def test_a_bad_eval_record_in_the_manifest_is_not_shown(int8_tiny, resign_schema):
    from formats.report import format_info

    data = resign_schema(int8_tiny["prune"], lambda s: s["manifest"].__setitem__("eval", {"test_acc_packed": "x"}))
    artifact = parse_artifact(data)
    from formats.artifact import information_report

    assert "evaluated" not in format_info(information_report(artifact))
    with pytest.raises(FormatError):
        parse_artifact(data[:-3])
