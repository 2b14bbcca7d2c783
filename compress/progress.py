"""Progress of long loops (training epochs, scoring rounds): a bar on a terminal, a log line at a steady interval
elsewhere (CI, nohup, a scheduler's log), where a bar would print nothing until the loop ends.

The interval is ``LOG_SECONDS`` (30 s), or the environment variable ``COMPRESS_PROGRESS_SECONDS``.
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import click

from compress.errors import UserError

LOG_SECONDS = 30.0
INTERVAL_VARIABLE = "COMPRESS_PROGRESS_SECONDS"


def log_interval() -> float:
    """Seconds between two progress lines when stderr is not a terminal."""
    text = os.environ.get(INTERVAL_VARIABLE)
    if text is None:
        return LOG_SECONDS
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also NaN
        raise UserError(f"{INTERVAL_VARIABLE}={text!r} must be a number of seconds >= 0 (or unset for "
                        f"{LOG_SECONDS:g})")
    return value


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@contextmanager
def track(iterable: Iterable, length: int, label: str, *, enabled: bool = True, count: Callable | None = None,
          unit: str = "samples") -> Iterator[Iterable]:
    """``iterable`` with progress on stderr: a click bar on a terminal; otherwise, every ``log_interval()``
    seconds, a line ``label: step i/n (p%), r unit/s, ETA h:mm:ss`` (``count(item)`` gives an item's
    ``unit``s, e.g. a batch's samples; without it, steps/s). Nothing when not ``enabled``."""
    if not enabled:
        yield iterable
    elif sys.stderr.isatty():
        with click.progressbar(iterable, length=length, label=label, file=sys.stderr, show_eta=True) as bar:
            yield bar
    else:
        yield _logged(iterable, length, label, count, unit, log_interval())


def _logged(iterable, length: int, label: str, count, unit: str, interval: float):
    started = last = time.perf_counter()
    done = amount = 0
    for item in iterable:
        yield item
        done += 1
        amount += count(item) if count is not None else 1
        now = time.perf_counter()
        if now - last >= interval and done < length:
            last = now
            rate = amount / max(now - started, 1e-9)
            eta = (now - started) / done * (length - done)
            print(f"{label}: step {done}/{length} ({done / length:.0%}), {rate:,.0f} "
                  f"{unit if count is not None else 'steps'}/s, ETA {_clock(eta)}", file=sys.stderr, flush=True)
