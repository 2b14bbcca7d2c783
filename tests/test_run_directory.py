"""The run directory: --overwrite, atomic setup, validated resume, checkpoint as truth, locking, bad targets."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

import compress.run.pipeline
from cli.main import main
from compress.run import CHECKPOINT_FILE, LOCK_FILE

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--model", "lenet300", "--data", "synthetic", "--subset", "256", "--batch-size", "64", "--quiet"]
ARGS = [*QUICK, "--epochs", "1", "--method", "freezenet", "--density", "0.05"]  # = conftest RUN_ARGS["freeze"]
TWO_EPOCHS = [*QUICK, "--epochs", "2", "--method", "snip", "--density", "0.1"]
PLAN = ["--model", "lenet300", "--data", "synthetic", "--subset", "256"]
TIMEOUT = 120


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.err


def one_line_error(code, err, *phrases):
    assert code == 2, err
    last = err.splitlines()[-1]  # progress lines may come first
    assert last.startswith("error: ") and err.endswith(last + "\n") and "Traceback" not in err, err
    for phrase in phrases:
        assert phrase in last, err


def hidden_siblings(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


@pytest.fixture
def unfinished(finished_run, tmp_path):
    """A copy of a finished 1-epoch run as a kill after the last checkpoint leaves it: no model, no summary."""
    run = tmp_path / "run"
    shutil.copytree(finished_run("freeze"), run)
    (run / "summary.json").unlink()
    (run / "model.safetensors").unlink()
    return run


def script(body: str) -> list[str]:
    """A python command running ``body`` in the repository (a child process of the test)."""
    return [sys.executable, "-c", textwrap.dedent(body)]


def run_child(command, **kwargs):
    """Run a child process with a bounded time; subprocess.run kills it if it overruns."""
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT, **kwargs)


KILL_WHEN_WRITING = """
    import os, signal, sys
    import compress.run.{module} as module
    real = module.{function}

    def kill_on(*args, **kwargs):
        if {condition}:
            os.kill(os.getpid(), signal.SIGKILL)  # kill -9: no cleanup of any kind
        return real(*args, **kwargs)

    module.{function} = kill_on
    from cli.main import main
    sys.exit(main(sys.argv[1:]))
"""


# 5. --overwrite


def test_overwrite_never_deletes_a_folder_that_is_not_a_run_directory(tmp_path, capsys):
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "thesis.txt").write_text("four years of work")
    code, err = run_cli(["train", *ARGS, "--out", out, "--overwrite"], capsys)
    one_line_error(code, err, "not one", "thesis.txt", "nothing was deleted")
    assert (out / "thesis.txt").read_text() == "four years of work"
    assert sorted(p.name for p in out.iterdir()) == ["thesis.txt"] and hidden_siblings(tmp_path) == []


def test_overwrite_refuses_a_run_directory_holding_a_users_file(finished_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished_run("freeze"), out)
    (out / "notes.txt").write_text("keep me")
    before = sorted(p.name for p in out.iterdir())
    code, err = run_cli(["train", *ARGS, "--out", out, "--overwrite"], capsys)
    one_line_error(code, err, "notes.txt", "nothing was deleted")
    assert sorted(p.name for p in out.iterdir()) == before and (out / "notes.txt").read_text() == "keep me"
    (out / "notes.txt").unlink()
    code, err = run_cli(["train", *ARGS, "--density", "0.1", "--out", out, "--overwrite"], capsys)
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["density"] == 0.1 and hidden_siblings(tmp_path) == []


# 6. atomic setup, validated resume


@pytest.mark.slow  # starts processes: .ci/run runs it (pytest -m slow)
def test_a_kill_during_setup_leaves_no_run_directory_and_a_new_run_works(tmp_path, capsys):
    out = tmp_path / "run"
    child = run_child([*script(KILL_WHEN_WRITING.format(module="rundir", function="write_atomic",
                                                        condition="str(args[0]).endswith('plan.json')")),
                       "train", *ARGS, "--out", str(out)])
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert not out.exists()
    stale = hidden_siblings(tmp_path)
    assert len(stale) == 1 and stale[0].startswith(".run.") and stale[0].endswith(".setup")
    code, err = run_cli(["train", "--resume", out, "--quiet"], capsys)
    one_line_error(code, err, "not a run directory", f"--out {out}")
    code, err = run_cli(["train", *ARGS, "--out", out], capsys)
    assert code == 0, err
    assert hidden_siblings(tmp_path) == []  # the dead process's staging directory is gone
    assert json.loads((out / "summary.json").read_text())["test_acc"] is not None


def test_a_run_directory_from_an_unfinished_setup_of_an_older_version_gets_a_clear_error(unfinished, capsys):
    for name in ("masks.safetensors", "plan.json", "checkpoint.safetensors", "metrics.jsonl"):
        (unfinished / name).unlink()
    code, err = run_cli(["train", "--resume", unfinished, "--quiet"], capsys)
    one_line_error(code, err, "masks.safetensors is missing", "--overwrite")
    code, err = run_cli(["train", *ARGS, "--out", unfinished, "--overwrite"], capsys)
    assert code == 0, err


def _resave(path: Path, drop=(), metadata=None):
    with safe_open(str(path), "pt") as handle:
        meta = dict(handle.metadata())
        tensors = {k: handle.get_tensor(k) for k in handle.keys() if k not in drop}
    meta.update(metadata or {})
    meta = {k: v for k, v in meta.items() if v is not None}
    path.write_bytes(save(tensors, metadata=meta))


def _truncate(path: Path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "truncated checkpoint": (lambda run: _truncate(run / CHECKPOINT_FILE), ["checkpoint.safetensors is truncated or corrupted",
                                                                            "delete it to restart the run from epoch 0"]),
    "empty checkpoint": (lambda run: (run / CHECKPOINT_FILE).write_bytes(b""), ["truncated or corrupted"]),
    "missing model key": (lambda run: _resave(run / CHECKPOINT_FILE, drop={"model/fc2.weight"}), ["model/fc2.weight"]),
    "missing model key, no key list": (lambda run: _resave(run / CHECKPOINT_FILE, drop={"model/fc2.weight"},
                                                           metadata={"keys": None}), ["lacks the model tensor(s) fc2.weight"]),
    "missing optimizer key": (lambda run: _resave(run / CHECKPOINT_FILE, drop={"optimizer/fc1.weight/momentum_buffer"}),
                              ["optimizer/fc1.weight/momentum_buffer"]),
    "epoch -5": (lambda run: _resave(run / CHECKPOINT_FILE, metadata={"epoch": "-5"}), ["has epoch '-5'"]),
    "epoch 1.5": (lambda run: _resave(run / CHECKPOINT_FILE, metadata={"epoch": "1.5"}), ["has epoch '1.5'"]),
    "epoch past the end": (lambda run: _resave(run / CHECKPOINT_FILE, metadata={"epoch": "7"}), ["has epoch '7'"]),
    "no epoch": (lambda run: _resave(run / CHECKPOINT_FILE, metadata={"epoch": None}), ["no epoch number"]),
    "damaged history": (lambda run: _resave(run / CHECKPOINT_FILE, metadata={"metrics": "[{"}), ["metrics history"]),
    "config.json a list": (lambda run: (run / "config.json").write_text("[1, 2]"), ["config.json holds a JSON list"]),
    "config.json not JSON": (lambda run: (run / "config.json").write_text("{"), ["config.json is not valid JSON"]),
    "config.json invalid": (lambda run: (run / "config.json").write_text('{"density": 7}'),
                            ["config.json does not hold a valid run config", "density must be in (0, 1]"]),
    "truncated masks": (lambda run: _truncate(run / "masks.safetensors"), ["masks.safetensors is truncated"]),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_resume_of_a_damaged_run_directory_is_a_clear_error(unfinished, capsys, damage):
    change, phrases = DAMAGE[damage]
    change(unfinished)
    code, err = run_cli(["train", "--resume", unfinished, "--quiet"], capsys)
    one_line_error(code, err, *phrases)
    assert not (unfinished / "summary.json").exists()


def test_deleting_a_damaged_checkpoint_restarts_the_run_from_epoch_0(finished_run, unfinished, capsys):
    _truncate(unfinished / CHECKPOINT_FILE)
    code, err = run_cli(["train", "--resume", unfinished, "--quiet"], capsys)
    assert code == 2
    (unfinished / CHECKPOINT_FILE).unlink()
    code, err = run_cli(["train", "--resume", unfinished, "--quiet"], capsys)
    assert code == 0, err
    full = load_file(str(finished_run("freeze") / "model.safetensors"))
    again = load_file(str(unfinished / "model.safetensors"))
    assert all(torch.equal(full[k], again[k]) for k in full)


# 7. the checkpoint is the truth


def test_a_lost_metrics_line_is_recovered_from_the_checkpoint(finished_run, unfinished, capsys):
    (unfinished / "metrics.jsonl").write_text("")  # killed between the checkpoint and the metrics write
    code, err = run_cli(["train", "--resume", unfinished, "--quiet"], capsys)
    assert code == 0, err
    original = finished_run("freeze")
    assert (unfinished / "metrics.jsonl").read_text() == (original / "metrics.jsonl").read_text()
    summary = json.loads((unfinished / "summary.json").read_text())
    assert summary["test_acc"] is not None
    assert summary["test_acc"] == json.loads((original / "summary.json").read_text())["test_acc"]


@pytest.mark.slow  # starts processes: .ci/run runs it (pytest -m slow)
def test_a_kill_after_the_last_checkpoint_loses_nothing(tmp_path, capsys):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert run_cli(["train", *TWO_EPOCHS, "--out", full], capsys)[0] == 0
    child = run_child([*script(KILL_WHEN_WRITING.format(module="runner", function="write_metrics",
                                                        condition="len(args[1]) == 2")),
                       "train", *TWO_EPOCHS, "--out", str(cut)])
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert not (cut / "summary.json").exists() and len((cut / "metrics.jsonl").read_text().splitlines()) == 1
    code, err = run_cli(["train", "--resume", cut, "--quiet"], capsys)
    assert code == 0, err
    assert [json.loads(line)["epoch"] for line in (cut / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert json.loads((cut / "summary.json").read_text())["test_acc"] == \
        json.loads((full / "summary.json").read_text())["test_acc"]
    a, b = load_file(str(full / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# 8. disk full, read-only


def _enospc(*args):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_during_setup_leaves_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(os, "fsync", _enospc)
    out = tmp_path / "run"
    code, err = run_cli(["train", *ARGS, "--out", out], capsys)
    one_line_error(code, err, "No space left on device", "free some disk space", str(out))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
def test_a_full_disk_while_checkpointing_is_a_clear_error_and_the_run_resumes(tmp_path, capsys, monkeypatch):
    real_fsync = os.fsync

    def full_for_checkpoints(fd):
        if CHECKPOINT_FILE in os.readlink(f"/proc/self/fd/{fd}"):
            _enospc()
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_for_checkpoints)
    out = tmp_path / "run"
    code, err = run_cli(["train", *ARGS, "--out", out], capsys)
    one_line_error(code, err, "No space left on device", f"--resume {out}")
    assert sorted(p.name for p in out.iterdir()) == sorted(["config.json", "masks.safetensors", "plan.json",
                                                            "metrics.jsonl", LOCK_FILE])
    monkeypatch.setattr(os, "fsync", real_fsync)
    code, err = run_cli(["train", "--resume", out, "--quiet"], capsys)
    assert code == 0, err


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores permissions")
def test_a_read_only_target_is_refused_before_anything_is_done(tmp_path, capsys):
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        code, err = run_cli(["train", *ARGS, "--out", locked / "run"], capsys)
        one_line_error(code, err, "not writable")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


# 10. one process per run directory


@pytest.mark.slow  # starts processes: .ci/run runs it (pytest -m slow)
def test_a_second_process_on_a_run_directory_is_refused(unfinished, capsys):
    holder = subprocess.Popen(
        script(f"""
            import fcntl, os, sys, time
            fd = os.open({str(unfinished / LOCK_FILE)!r}, os.O_RDWR | os.O_CREAT)
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.ftruncate(fd, 0); os.write(fd, str(os.getpid()).encode())
            print("locked", flush=True)
            time.sleep({TIMEOUT})
        """),
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, err = run_cli(["train", "--resume", unfinished, "--quiet"], capsys)
        one_line_error(code, err, f"is in use by another compress process (pid {holder.pid})", "wait for it")
        code, err = run_cli(["train", *ARGS, "--out", unfinished, "--overwrite"], capsys)
        one_line_error(code, err, f"pid {holder.pid}")
        assert hidden_siblings(unfinished.parent) == []  # the refused run's staging directory is gone
        assert not (unfinished / "summary.json").exists() and (unfinished / CHECKPOINT_FILE).is_file()
    finally:
        holder.kill()
        holder.wait(timeout=30)
        holder.stdout.close()
    code, err = run_cli(["train", "--resume", unfinished, "--quiet"], capsys)  # the lock died with its holder
    assert code == 0, err


# 12b. unusable --out found before any work


@pytest.fixture
def no_work(monkeypatch):
    calls = []
    monkeypatch.setattr(compress.run.pipeline, "load_run_data", lambda *a, **k: calls.append("data"))
    monkeypatch.setattr(compress.run.pipeline, "compute_scores", lambda *a, **k: calls.append("score"))
    return calls


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc")
def test_out_in_proc_is_refused_before_loading_data_or_scoring(no_work, capsys):
    code, err = run_cli(["train", *ARGS, "--out", "/proc/x"], capsys)
    one_line_error(code, err, "/proc/x", "choose another location")
    assert no_work == []


def test_a_read_only_file_system_is_refused_before_loading_data_or_scoring(no_work, tmp_path, capsys, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(os, "mkdir", read_only)
    code, err = run_cli(["train", *ARGS, "--out", tmp_path / "run"], capsys)
    one_line_error(code, err, str(tmp_path / "run"), "file system is read-only")
    assert no_work == [] and list(tmp_path.iterdir()) == []


def test_out_under_a_regular_file_is_refused_before_loading_data_or_scoring(no_work, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, err = run_cli(["train", *ARGS, "--out", tmp_path / "file" / "run"], capsys)
    one_line_error(code, err, "not writable", "is not a directory")
    assert no_work == [] and sorted(p.name for p in tmp_path.iterdir()) == ["file"]


# 12c. a plan that trains nothing


def test_a_density_that_trains_no_weight_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_cli(["train", *QUICK, "--epochs", "1", "--method", "snip", "--density", "1e-9", "--out", out],
                        capsys)
    one_line_error(code, err, "trains no weight at all", "266,200", "--density 3.76e-06")  # 1 / 266,200
    assert list(tmp_path.iterdir()) == []
    code, err = run_cli(["plan", *PLAN, "--method", "snip", "--density", "3.76e-06"], capsys)
    assert code == 0, err  # the suggested density trains one weight
    code, err = run_cli(["plan", *PLAN, "--method", "snip", "--density", "1e-6", "--scope", "layer"], capsys)
    one_line_error(code, err, "trains no weight at all", "--density 4.25e-06")  # 1 / 235,200 (fc1)


def test_a_collapsed_layer_under_on_collapse_error_stays_an_error(tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_cli(["train", *QUICK, "--epochs", "1", "--method", "snip", "--density", "3.76e-06",
                         "--on-collapse", "error", "--out", out], capsys)
    one_line_error(code, err, "layer collapse")
    assert list(tmp_path.iterdir()) == []


def test_run_files_are_safetensors_streamed_tensor_by_tensor_and_read_back_exactly(tmp_path):
    from compress.run.rundir import write_tensors
    from formats.artifact import SAFETENSORS_DTYPE_NAMES

    tensors = {f"t.{name}": (torch.arange(6) % 3).to(dtype).reshape(2, 3)
               for dtype, name in SAFETENSORS_DTYPE_NAMES.items()}
    tensors.update({"scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4), "non-ascii é": torch.ones(1),
                    "transposed": torch.arange(12.0).reshape(3, 4).t()})
    path = tmp_path / "x.safetensors"
    write_tensors(path, tensors, {"format": "test"})
    contiguous = {name: value.contiguous() for name, value in tensors.items()}
    assert path.read_bytes() == save(contiguous, metadata={"format": "test"})  # the same bytes
    back = load_file(str(path))
    assert sorted(back) == sorted(tensors)
    for name, value in tensors.items():
        assert back[name].dtype == value.dtype and torch.equal(back[name], value), name
    with safe_open(str(path), "pt") as file:
        assert file.metadata() == {"format": "test"}
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]  # no temporary left
