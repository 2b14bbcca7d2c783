"""One process per run directory: an exclusive ``flock`` on ``DIR/compress.lock`` for a whole train/resume.

The lock file holds the owner's pid, for the message of a refused second process. It is the one
file of a run directory not written through ``write_atomic``: a rename would give it a new inode and
break the lock, and its content is only informational. The kernel drops the lock when the owner dies.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

from compress.run.rundir import LOCK_FILE
from formats.atomic import output_error
from formats.errors import UserError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locking
    fcntl = None


class RunLock:
    """The exclusive lock of the run directory ``directory`` (``shown`` names it in messages)."""

    def __init__(self, directory: Path, shown: str | Path):
        self.path = Path(directory) / LOCK_FILE
        self.shown = shown
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        if fcntl is None:
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        except OSError as error:
            raise output_error(self.path, error) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            owner = _read_pid(fd)
            os.close(fd)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UserError(f"{self.shown} is in use by another compress process (pid {owner or 'unknown'}); "
                                "wait for it to finish") from None
            raise output_error(self.path, error) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # the pid is only for messages; the lock holds without it
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return text if text.isdigit() else ""
