"""The one atomic writer: every file the project writes goes through ``write_atomic``.

A write goes to a temporary file in the target's directory, is flushed and fsynced, renamed over the
target and the directory is fsynced: readers see the old file or the whole new one, never a torn one,
also after a crash or power loss. The temporary is removed on any error; one left by a process that
was killed (``kill -9``) carries that process's id in its name and is removed by the next write to the
same target. New files get the permissions ``open`` gives under the user's umask (0644 under 022).
"""
from __future__ import annotations

import errno
import glob
import os
import secrets
from pathlib import Path
from typing import BinaryIO, Callable

from formats.errors import OutputError

_FIX = {
    errno.ENOSPC: "free some disk space or choose another location",
    errno.EDQUOT: "free some disk space or choose another location",
    errno.EROFS: "the file system is read-only; choose another location",
    errno.EACCES: "you may not write there; choose another location",
    errno.EPERM: "you may not write there; choose another location",
    errno.ENOENT: "check that its directory exists and can hold files, or choose another location",
    errno.ENOTDIR: "a part of the path is not a directory",
    errno.EISDIR: "it is a directory; give a file name",
}


def temporary_name(path: Path) -> Path:
    """A fresh hidden name beside ``path`` that records the writing process: ``.NAME.PID.RANDOM.tmp``."""
    return path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (also one of another user); a temporary it owns must be left alone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove temporaries of ``path`` left by processes that no longer run; returns what was removed."""
    path = Path(path)
    removed = []
    for candidate in glob.glob(os.path.join(glob.escape(str(path.parent)), f".{glob.escape(path.name)}.*.tmp")):
        parts = Path(candidate).name[len(path.name) + 2 : -len(".tmp")].split(".")
        if len(parts) != 2 or not parts[0].isdigit() or int(parts[0]) == os.getpid() or process_alive(int(parts[0])):
            continue
        try:
            os.unlink(candidate)
            removed.append(Path(candidate))
        except OSError:
            pass
    return removed


def fsync_directory(directory: str | os.PathLike) -> None:
    """Make a rename or a new entry in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def check_output_file(path: str | os.PathLike, force: bool, example: str = "model.cpk") -> None:
    """Fail before any work when file ``path`` cannot be written, or exists and ``force`` was not given."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"output {path} is a directory; give a file name such as {path / example}")
    if not path.parent.is_dir():
        raise OutputError(f"cannot write {path}: directory {path.parent} does not exist")
    if os.path.lexists(path) and not force:
        raise OutputError(f"{path} already exists; choose another name, or pass --force to replace it")


def output_error(path: str | os.PathLike, error: OSError) -> OutputError:
    """A user-facing error for an ``OSError`` raised while writing ``path``, naming the fix."""
    reason = error.strerror or str(error)
    fix = _FIX.get(error.errno, "choose another location")
    return OutputError(f"cannot write {path}: {reason}; {fix}")


def write_atomic(path: str | os.PathLike, data: bytes | Callable[[BinaryIO], None], *, overwrite: bool = True) -> None:
    """Write ``data`` (bytes, or a function writing into a binary file) to ``path`` atomically.

    With ``overwrite=False`` an existing ``path`` is never replaced (an ``OutputError`` names it),
    even when another process creates it meanwhile. Every ``OSError`` becomes an ``OutputError``
    that names the path and the fix; no temporary file is left behind.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"cannot write {path}: it is a directory; give a file name")
    if not overwrite and os.path.lexists(path):
        raise OutputError(f"{path} already exists; choose another name or allow replacing it (--force)")
    remove_stale_temporaries(path)
    tmp = temporary_name(path)
    try:
        handle = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        with os.fdopen(handle, "wb") as file:
            if callable(data):
                data(file)
            else:
                file.write(data)
            file.flush()
            os.fsync(file.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if path appeared meanwhile: never clobbers
            except FileExistsError:
                raise OutputError(f"{path} already exists; choose another name or allow replacing it (--force)") from None
            except OSError as error:
                if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                    raise
                if os.path.lexists(path):  # file systems without hard links: check, then rename
                    raise OutputError(f"{path} already exists; choose another name or allow replacing it (--force)") from None
                os.replace(tmp, path)
            else:
                os.unlink(tmp)
        fsync_directory(path.parent)
    except OSError as error:
        _remove_quietly(tmp)
        raise output_error(path, error) from None
    except BaseException:
        _remove_quietly(tmp)
        raise


def _remove_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
