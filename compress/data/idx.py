"""Fashion-MNIST and MNIST from raw IDX files (gzipped or not), read by a small parser."""
from __future__ import annotations

import gzip
import math
import os
import pathlib

import numpy as np
import torch

from compress.data import download, registry
from compress.data.registry import DATASETS, _NORM
from compress.data.split import Data, Split
from compress.errors import UserError


_IDX_TYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (gzipped or not, told apart by content) into a native-endian numpy array.

    Raises ValueError naming the file when the gzip stream, the magic number or the size is wrong.
    """
    path = pathlib.Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, gzip.BadGzipFile) as e:  # truncated or corrupt stream
            raise UserError(f"{path}: not a readable gzip file ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES or not 1 <= raw[3] <= 4:
        raise UserError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'none'})")
    dtype, ndim = _IDX_TYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    need = header + math.prod(dims) * dtype.itemsize
    if len(raw) != need:
        what = "truncated" if len(raw) < need else "too long"
        raise UserError(f"{path}: {what} IDX file: shape {dims} needs {need} bytes, file has {len(raw)}")
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)  # writable, native byte order


CLASS_NAMES = {"fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                                 "Bag", "Ankle boot"],
               "mnist": [str(digit) for digit in range(10)]}
_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_TORCHVISION_CLASS = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}


def _idx_search_dirs(name: str, root: pathlib.Path) -> list[pathlib.Path]:
    dirs = [root, root / name, root / _TORCHVISION_CLASS[name] / "raw"]
    dirs += [pathlib.Path(d) / name for d in registry.SYSTEM_DATA_DIRS]
    return dirs


def _find_in(d: pathlib.Path) -> dict[str, pathlib.Path] | None:
    found = {}
    for key, base in _IDX_FILES.items():
        for cand in (d / base, d / (base + ".gz")):
            if cand.is_file():
                found[key] = cand
                break
        else:
            return None
    return found


def find_idx_files(name: str, root: str | os.PathLike) -> dict[str, pathlib.Path] | None:
    """The four IDX files of ``name`` from the first directory holding all of them, or None."""
    for d in _idx_search_dirs(name, pathlib.Path(root)):
        found = _find_in(d)
        if found is not None:
            return found
    return None


def _split_from_idx(images: pathlib.Path, labels: pathlib.Path, mean, std) -> Split:
    x, y = read_idx(images), read_idx(labels)
    if x.ndim != 3 or x.dtype != np.uint8:
        raise UserError(f"{images}: expected uint8 images of shape (N, H, W), got {x.dtype} {x.shape}")
    if y.ndim != 1 or y.dtype != np.uint8:
        raise UserError(f"{labels}: expected uint8 labels of shape (N,), got {y.dtype} {y.shape}")
    if x.shape[0] != y.shape[0]:
        raise UserError(f"{labels}: {y.shape[0]} labels for {x.shape[0]} images in {images.name}")
    return Split(torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y).long(), mean, std)


def _load_idx_set(name: str, root: pathlib.Path) -> Data:
    files = find_idx_files(name, root)
    if files is None and download._download_torchvision(_TORCHVISION_CLASS[name], root):
        files = find_idx_files(name, root)
    if files is None:
        needed = ", ".join(f"{b}[.gz]" for b in _IDX_FILES.values())
        dirs = ", ".join(str(d) for d in _idx_search_dirs(name, root))
        hint = (
            "install them with `apt-get install dataset-fashion-mnist` (Debian) or run once online to download them"
            if name == "fashion-mnist"
            else "run once online to download them, or copy the files into one of these directories"
        )
        raise FileNotFoundError(
            f"{name}: need {needed} in one of: {dirs}; the download into {root} failed (offline?); {hint}"
        )
    mean, std = _NORM[name]
    train = _split_from_idx(files["train_images"], files["train_labels"], mean, std)
    test = _split_from_idx(files["test_images"], files["test_labels"], mean, std)
    if train.shape != test.shape:
        raise UserError(f"{name}: train images are {train.shape} but test images {test.shape}")
    return Data(name, train, None, test, train.shape, 10, CLASS_NAMES[name])


@DATASETS.register("fashion-mnist")
def _fashion_mnist(root: pathlib.Path, **_) -> Data:
    return _load_idx_set("fashion-mnist", root)


@DATASETS.register("mnist")
def _mnist(root: pathlib.Path, **_) -> Data:
    return _load_idx_set("mnist", root)
