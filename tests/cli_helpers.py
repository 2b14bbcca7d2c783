"""Helpers of the tests that drive the CLI: run it in-process, check a one-line user error, kill -9 it mid-run."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from cli.main import main

ROOT = Path(__file__).resolve().parents[1]


def run_cli(args, capsys):
    """``compress ARGS`` in this process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(code, err, *phrases):
    """Exit code 2 and one ``error: ...`` line last on stderr (progress lines may come first), no traceback,
    naming every phrase."""
    assert code == 2, err
    last = err.splitlines()[-1]
    assert last.startswith("error: ") and err.endswith(last + "\n") and "Traceback" not in err, err
    for phrase in phrases:
        assert phrase in last, err


def kill_9_when(args, appears: Path, log: Path, timeout: float = 120) -> None:
    """Start ``python -m cli.main ARGS`` and SIGKILL it as soon as ``appears`` exists; the process never outlives
    this call (its output goes to ``log``)."""
    with log.open("w") as output:
        child = subprocess.Popen([sys.executable, "-m", "cli.main", *map(str, args)], cwd=ROOT, stdout=output,
                                 stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while not appears.exists():
                assert child.poll() is None, log.read_text()
                assert time.monotonic() < deadline, f"{appears} never appeared"
                time.sleep(0.005)
            os.kill(child.pid, signal.SIGKILL)
            assert child.wait(timeout=30) == -signal.SIGKILL
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(timeout=30)


def interrupted_run(args, capsys, monkeypatch) -> tuple[int, str]:
    """``compress ARGS`` stopped by Ctrl-C (KeyboardInterrupt) at the second epoch's test evaluation, after the
    first epoch's checkpoint: (exit code, stderr)."""
    import compress.training

    real_evaluate, calls = compress.training.evaluate, []

    def interrupt_in_second_epoch(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_evaluate(*a, **k)

    monkeypatch.setattr(compress.training, "evaluate", interrupt_in_second_epoch)
    try:
        code, _, err = run_cli(args, capsys)
    finally:
        monkeypatch.setattr(compress.training, "evaluate", real_evaluate)
    return code, err
