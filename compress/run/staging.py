"""Atomic setup of a run directory: it is built in a hidden staging directory beside it and renamed.

A kill or a full disk during setup leaves no half-made run directory, only a staging directory
``.DIR.PID.RANDOM.setup`` that the next run into DIR removes once that process is gone. Replacing a
run directory (``--overwrite``) renames the old one to ``.DIR.PID.RANDOM.old`` first and removes it
after the new one is in place; only directories holding nothing but the project's files are replaced.
"""
from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
from pathlib import Path

from compress.run.lock import RunLock
from compress.run.rundir import foreign_entries, is_project_file
from formats.atomic import fsync_directory, output_error, process_alive
from formats.errors import OutputError, UserError

_KINDS = ("setup", "old")


def resolve_target(out: str | Path) -> Path:
    """The absolute directory a run is written to (a symlink to a directory is followed)."""
    target = Path(os.path.abspath(out))
    if target.is_symlink():
        target = Path(os.path.realpath(target))
    if not target.name:
        raise UserError(f"--out {out} cannot be a run directory; give a new directory name such as runs/a")
    return target


def check_writable(out: str | Path, target: Path | None = None) -> None:
    """Fail early, before any data is loaded, when run directory ``out`` cannot be created or written."""
    target = resolve_target(out) if target is None else target
    if target.exists() and not target.is_dir():
        raise OutputError(f"output {out} exists and is not a directory; choose another --out")
    ancestor = target.parent
    while not os.path.lexists(ancestor):
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"output directory {out} is not writable ({ancestor} is not a directory); "
                          "choose another --out")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"output directory {out} is not writable ({ancestor} does not allow writing); "
                          "choose another --out")


def sibling(target: Path, kind: str) -> Path:
    """A hidden name beside ``target`` owned by this process: ``.NAME.PID.RANDOM.KIND``."""
    return target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.{kind}"


def remove_stale_siblings(target: Path) -> list[Path]:
    """Remove staging and replaced directories beside ``target`` left by processes that no longer run."""
    removed = []
    if not target.parent.is_dir():
        return removed
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(\d+)\.[0-9a-f]+\.({'|'.join(_KINDS)})$")
    for candidate in target.parent.iterdir():
        match = pattern.match(candidate.name)
        if not match or int(match[1]) == os.getpid() or process_alive(int(match[1])):
            continue
        if candidate.is_symlink() or not candidate.is_dir():
            continue
        if any(not is_project_file(entry) for entry in candidate.iterdir()):
            continue  # only ever delete what the project wrote
        shutil.rmtree(candidate, ignore_errors=True)
        removed.append(candidate)
    return removed


class Setup:
    """Builds run directory ``target`` in a staging directory and holds its lock until ``close``.

    ``replace=True`` replaces an existing run directory at ``publish`` (its lock is taken at once).
    Use as a context manager around setup and training: the staging directory is removed if the
    setup does not finish, and the lock is held until the end.
    """

    def __init__(self, out: str | Path, target: Path, *, replace: bool = False):
        self.out, self.target, self.replace = out, target, replace
        self.staging: Path | None = None
        self.published = False
        self._locks: list[RunLock] = []
        self._made_parents: list[Path] = []

    def __enter__(self) -> "Setup":
        try:
            self._open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _open(self) -> None:
        parent = self.target.parent
        missing = []
        while not os.path.lexists(parent):
            missing.append(parent)
            parent = parent.parent
        try:
            for directory in reversed(missing):
                directory.mkdir()
                self._made_parents.append(directory)
            remove_stale_siblings(self.target)
            staging = sibling(self.target, "setup")
            staging.mkdir()
            self.staging = staging
        except OSError as error:
            raise output_error(self.out, error) from None
        self._locks.append(RunLock(self.staging, self.out).acquire())
        if self.replace:
            self._locks.append(RunLock(self.target, self.out).acquire())

    def publish(self) -> None:
        """Rename the finished staging directory to the run directory (replacing the old one if asked)."""
        old = None
        try:
            if self.replace and self.target.exists():
                foreign = foreign_entries(self.target)
                if foreign:
                    raise UserError(f"{self.out} now holds files compress did not write ({', '.join(foreign)}); "
                                    "nothing was replaced: move them away or choose another --out")
                old = sibling(self.target, "old")
                os.rename(self.target, old)
            try:
                os.rename(self.staging, self.target)
            except OSError:
                if old is not None:
                    os.rename(old, self.target)
                raise
            fsync_directory(self.target.parent)
        except FileExistsError:
            raise OutputError(f"{self.out} was created by someone else during the setup; choose another --out") from None
        except OSError as error:
            if error.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise OutputError(f"{self.out} was filled by someone else during the setup; "
                                  "choose another --out") from None
            raise output_error(self.out, error) from None
        self.published = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def close(self) -> None:
        if not self.published and self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None
            for directory in reversed(self._made_parents):
                try:
                    directory.rmdir()
                except OSError:
                    break
        for lock in self._locks:
            lock.release()
        self._locks = []
