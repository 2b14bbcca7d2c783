"""torchvision downloads into a temporary folder, moved into place only on success; its printing swallowed."""
from __future__ import annotations

import contextlib
import io
import pathlib
import shutil
import tempfile
import warnings


@contextlib.contextmanager
def _quiet():
    """Silence torchvision's prints, progress bars and warnings."""
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _download_torchvision(cls_name: str, root: pathlib.Path) -> bool:
    """Download torchvision's ``cls_name`` (train and test) into ``root``; True on success.

    Works in a temporary folder inside ``root`` whose content is moved into ``root`` only when both splits
    downloaded; the temporary folder (archives included) and a ``root`` this call created are removed
    whatever happens. Every failure (network errors come in many types) returns False.
    """
    created = []
    p = root
    while not p.exists():
        created.append(p)
        p = p.parent
    tmp = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=".download-", dir=root))
        import torchvision.datasets as tvd

        cls = getattr(tvd, cls_name)
        with _quiet():
            cls(str(tmp), train=True, download=True)
            cls(str(tmp), train=False, download=True)
        for item in tmp.iterdir():
            if item.suffix in (".gz", ".tgz", ".zip") or item.name.endswith(".tar.gz"):
                continue  # the archive; its extracted content is what is kept
            _merge_move(item, root / item.name)
        return True
    except Exception:  # noqa: BLE001 - offline: URLError, socket errors, RuntimeError, ...
        return False
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for d in created:  # innermost first; only if still empty (nothing was moved in)
            try:
                d.rmdir()
            except OSError:
                break


def _merge_move(src: pathlib.Path, dst: pathlib.Path) -> None:
    if src.is_dir() and dst.is_dir():
        for child in src.iterdir():
            _merge_move(child, dst / child.name)
    else:
        if dst.exists():
            if dst.is_dir():
                shutil.rmtree(dst)
            else:
                dst.unlink()
        shutil.move(str(src), str(dst))
