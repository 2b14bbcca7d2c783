"""Progress off a terminal: log lines at a steady interval (step, rate, ETA) from training and SynFlow's rounds."""
import re

import pytest

from cli_helpers import one_line_error, run_cli
from compress.errors import UserError
from compress.progress import INTERVAL_VARIABLE, log_interval, track

QUICK = ["train", "--model", "lenet300", "--data", "synthetic", "--subset", "256", "--epochs", "1", "--batch-size", "64"]


def test_off_a_terminal_track_logs_step_rate_and_eta_every_interval(capsys, monkeypatch):
    monkeypatch.setenv(INTERVAL_VARIABLE, "0")
    with track([[0] * 8] * 4, 4, "epoch 1/2", count=len) as items:
        assert len(list(items)) == 4
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3  # after every step but the last (the epoch's own line follows it)
    for step, line in enumerate(lines, 1):
        assert re.fullmatch(rf"epoch 1/2: step {step}/4 \(\d+%\), [\d,]+ samples/s, ETA \d+:\d\d:\d\d", line), line


def test_no_line_before_the_interval_and_none_when_disabled(capsys, monkeypatch):
    monkeypatch.setenv(INTERVAL_VARIABLE, "3600")
    with track(range(5), 5, "epoch") as items:
        list(items)
    monkeypatch.setenv(INTERVAL_VARIABLE, "0")
    with track(range(5), 5, "epoch", enabled=False) as items:
        assert list(items) == [0, 1, 2, 3, 4]
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("value", ["abc", "-1", "nan"])
def test_a_bad_interval_is_a_user_error(monkeypatch, value):
    monkeypatch.setenv(INTERVAL_VARIABLE, value)
    with pytest.raises(UserError, match=f"{INTERVAL_VARIABLE}='{value}' must be a number of seconds >= 0"):
        log_interval()


def test_training_and_synflow_scoring_log_progress_lines_off_a_terminal(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(INTERVAL_VARIABLE, "0")
    code, _, err = run_cli([*QUICK, "--method", "synflow", "--density", "0.1", "--out", tmp_path / "r"], capsys)
    assert code == 0, err
    assert re.search(r"scoring with synflow: step 1/100 \(1%\), [\d,.]+ rounds/s, ETA", err), err
    assert re.search(r"epoch 1/1: step 1/4 \(25%\), [\d,]+ samples/s, ETA \d+:\d\d:\d\d", err), err


def test_a_bad_interval_stops_compress_train_before_anything_is_written(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(INTERVAL_VARIABLE, "soon")
    code, _, err = run_cli([*QUICK, "--method", "snip", "--density", "0.1", "--out", tmp_path / "r"], capsys)
    one_line_error(code, err, INTERVAL_VARIABLE)
    assert not (tmp_path / "r").exists()
