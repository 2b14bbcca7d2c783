"""The registry of data sets, their fixed shapes and normalisation, and where they are looked for."""
from __future__ import annotations

import os
import pathlib
from typing import Callable

from compress.data.split import Data
from formats.registry import Registry

# Searched after ``root`` for the IDX and CIFAR sets (``<dir>/<name>/``); a list so tests can monkeypatch it.
SYSTEM_DATA_DIRS: list[pathlib.Path] = [pathlib.Path("/usr/share/datasets")]


def default_data_root() -> pathlib.Path:
    """Per-user data cache: ``$COMPRESS_DATA``, else ``$XDG_CACHE_HOME/compress/data``, else ``~/.cache/compress/data``."""
    env = os.environ.get("COMPRESS_DATA")
    if env:
        return pathlib.Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = pathlib.Path(xdg).expanduser() if xdg else pathlib.Path.home() / ".cache"
    return base / "compress" / "data"


DATASETS: Registry[Callable[..., Data]] = Registry("data set")

_NORM = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
_FIXED = {
    "mnist": ((1, 28, 28), 10),
    "fashion-mnist": ((1, 28, 28), 10),
    "cifar10": ((3, 32, 32), 10),
    "cifar100": ((3, 32, 32), 100),
}
