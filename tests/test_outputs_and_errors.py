"""Outputs are never lost or half-written, and errors say whose they are (issue 12: items 3, 8, 9, 11, 13)."""
import errno
import json
import os
import stat
import subprocess
import sys

import pytest
import torch

import compress.data
import compress.packing
import formats
from cli.main import main
from formats.atomic import remove_stale_temporaries, write_atomic
from formats.errors import OutputError, UserError
from cli_helpers import run_cli


# ---------------------------------------------------------------------------------------------------------------
# Exit codes: a user's mistake is one line and exit 2; a bug is exit 1 and asks for a report


def test_a_user_error_is_one_line_and_exit_2(tmp_path, capsys):
    code, _, err = run_cli(["pack", tmp_path / "no-such-run", "-o", tmp_path / "a.cpk"], capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_an_internal_bug_is_exit_1_with_a_request_to_report_it_not_a_user_error(packed, tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise ValueError("an internal invariant failed")  # a plain ValueError is a bug, not a user mistake

    monkeypatch.setattr("formats.report.format_info", broken)
    code, _, err = run_cli(["info", packed("prune")], capsys)
    assert code == 1 and "ValueError: an internal invariant failed" in err and "bug" in err and "report" in err
    assert "Traceback" not in err


def test_compress_debug_shows_the_traceback_of_a_bug(packed, monkeypatch):
    monkeypatch.setattr("formats.report.format_info", lambda *a, **k: 1 / 0)
    monkeypatch.setenv("COMPRESS_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        main(["info", str(packed("prune"))])


def test_every_user_error_type_is_a_value_error_for_python_callers():
    assert issubclass(UserError, ValueError) and issubclass(formats.FormatError, UserError)
    assert issubclass(OutputError, UserError)


# ---------------------------------------------------------------------------------------------------------------
# Files written: umask permissions, never replaced without --force, nothing left behind


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_packed_and_exported_files_take_their_permissions_from_the_umask(finished_run, tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        compress.packing.pack_run(finished_run("prune"), tmp_path / "a.cpk")
        formats.export_onnx(tmp_path / "a.cpk", tmp_path / "a.onnx")
    finally:
        os.umask(previous)
    for name in ("a.cpk", "a.onnx"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode


@pytest.mark.parametrize("command", ["pack", "export"])
def test_pack_and_export_never_replace_an_existing_file_unless_forced(finished_run, packed, tmp_path, capsys, command):
    target = tmp_path / "existing"
    target.write_bytes(b"the user's own file")
    source = finished_run("prune") if command == "pack" else packed("prune")
    code, _, err = run_cli([command, source, "-o", target], capsys)
    assert code == 2 and "already exists" in err and "--force" in err
    assert target.read_bytes() == b"the user's own file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]
    code, _, _ = run_cli([command, source, "-o", target, "--force"], capsys)
    assert code == 0 and target.read_bytes() != b"the user's own file"


def test_help_of_pack_and_export_states_the_replace_policy(capsys):
    for command in ("pack", "export"):
        assert main([command, "--help"]) == 0
        assert "--force" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["pack", "export"])
def test_a_full_disk_is_one_line_exit_2_and_leaves_nothing(finished_run, packed, tmp_path, monkeypatch, capsys, command):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    source = finished_run("prune") if command == "pack" else packed("prune")
    code, _, err = run_cli([command, source, "-o", tmp_path / "out"], capsys)
    assert code == 2 and "No space left on device" in err and "free some disk space" in err
    assert list(tmp_path.iterdir()) == []


def test_a_temporary_left_by_a_killed_writer_is_removed_by_the_next_write(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".a.cpk.{int(dead.stdout)}.0123abcd.tmp"
    stale.write_bytes(b"half an artifact")
    mine = tmp_path / f".a.cpk.{os.getpid()}.0123abcd.tmp"  # a live writer's temporary is left alone
    mine.write_bytes(b"in progress")
    write_atomic(tmp_path / "a.cpk", b"whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["a.cpk", mine.name])
    assert remove_stale_temporaries(tmp_path / "a.cpk") == []


def test_a_killed_pack_leaves_no_temporary_behind_after_the_next_pack(finished_run, tmp_path):
    script = ("import os, signal, formats.atomic as a\n"
              "def stop(file): file.write(b'partial'); file.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
              f"a.write_atomic({str(tmp_path / 'a.cpk')!r}, stop)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=os.getcwd(), timeout=60)
    assert done.returncode == -9 and len(list(tmp_path.glob(".a.cpk.*.tmp"))) == 1
    compress.packing.pack_run(finished_run("prune"), tmp_path / "a.cpk")
    assert [p.name for p in tmp_path.iterdir()] == ["a.cpk"]
    formats.read_info(tmp_path / "a.cpk")


# ---------------------------------------------------------------------------------------------------------------
# compress eval: the model is checked first, and a path named in an artifact is never opened


def _with_manifest_data(packed_path, resign_schema, target, value):
    def mutate(schema):
        schema["manifest"]["config"]["data"] = value

    target.write_bytes(resign_schema(packed_path.read_bytes(), mutate))
    return target


def test_eval_never_opens_a_path_named_by_the_artifact(packed, resign_schema, tmp_path, monkeypatch, capsys):
    artifact = _with_manifest_data(packed("prune"), resign_schema, tmp_path / "a.cpk", "imagefolder:/etc")
    opened = []
    monkeypatch.setattr(compress.data, "load_data", lambda *a, **k: opened.append(a))
    code, _, err = run_cli(["eval", artifact], capsys)
    assert code == 2 and "never opened" in err and "--data" in err and opened == []


def test_eval_checks_the_artifact_before_loading_any_data(packed, tmp_path, monkeypatch, capsys):
    damaged = bytearray(packed("prune").read_bytes())
    damaged[-1] ^= 1
    (tmp_path / "d.cpk").write_bytes(bytes(damaged))
    opened = []
    monkeypatch.setattr(compress.data, "load_data", lambda *a, **k: opened.append(a))
    code, _, err = run_cli(["eval", tmp_path / "d.cpk", "--data", "synthetic"], capsys)
    assert code == 2 and "checksum" in err and opened == []


def test_synthetic_data_stays_bounded_for_any_input_shape():
    assert compress.data.synthetic_sizes((1, 28, 28), 10) == (4096, 1024)  # the usual sets are unchanged
    assert compress.data.synthetic_sizes((3, 64, 64), 10) == (4096, 1024)
    for shape in [(3, 128, 128), (3, 224, 224), (1, 500, 500)]:
        train, test = compress.data.synthetic_sizes(shape, 10)
        assert (train + test) * shape[0] * shape[1] * shape[2] <= compress.data.MAX_SYNTHETIC_ELEMENTS
    with pytest.raises(UserError, match="too large"):
        compress.data.synthetic_sizes((1, 2000, 2000), 10)


# ---------------------------------------------------------------------------------------------------------------
# ONNX export in fp16 of a trained BatchNorm network


def _trained_batchnorm_artifact(path):
    """A resnet20 whose BatchNorm layers carry statistics like a trained network's (the exporter folds them)."""
    import safetensors.torch

    from compress.init import initialise
    from formats.models import build_model
    from formats.rng import GENERATOR_NAME, GENERATOR_VERSION
    from formats.artifact import write_artifact

    model = initialise(build_model("resnet20", (3, 8, 8), 10), 0)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=generator))
                module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=generator))
                module.running_mean.copy_(0.5 * torch.randn(module.running_mean.shape, generator=generator))
                module.running_var.copy_(0.3 + torch.rand(module.running_var.shape, generator=generator))
    state = model.state_dict()
    write_atomic(path, write_artifact(
        state, {}, mode="dense", seed=0, architecture={"model": "resnet20", "input_shape": [3, 8, 8], "num_classes": 10},
        init_rules={}, manifest={"method": "dense"}, values="fp32", dense_fp32_bytes=len(safetensors.torch.save(state)),
        generator={"name": GENERATOR_NAME, "version": GENERATOR_VERSION}))
    return path


def test_fp16_export_of_a_trained_batchnorm_network_is_verified_and_close_to_the_model(tmp_path):
    import onnxruntime as ort

    artifact = _trained_batchnorm_artifact(tmp_path / "bn.cpk")
    report = formats.export_onnx(artifact, tmp_path / "bn16.onnx", fp16=True)
    assert report.fp16 and report.max_abs_diff is not None
    model = formats.load(artifact)
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    session = ort.InferenceSession(str(tmp_path / "bn16.onnx"), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    with torch.no_grad():
        expected = model(x)
    scale = max(1.0, float(expected.abs().max()))
    assert float((got - expected).abs().max()) <= 1e-2 * scale  # the documented fp16 tolerance
    assert float((got - expected).abs().max()) > 1e-4  # fp16 really is coarser than the fp32 check's 1e-4
    assert (got.argmax(1) == expected.argmax(1)).float().mean() >= 0.9
    assert report.onnx_bytes < 0.6 * formats.export_onnx(artifact, tmp_path / "bn32.onnx").onnx_bytes
