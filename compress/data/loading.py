"""``load_data``: a data set by name, with a seeded training subset and validation split."""
from __future__ import annotations

import dataclasses
import math
import os
import pathlib

import numpy as np
import torch

from compress.data.registry import DATASETS, _FIXED, default_data_root
from compress.data.split import Data, Split
from compress.errors import UserError, UserTypeError


AUGMENTS = ("none", "flip-crop")


def _check_int(name: str, value, *, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise UserTypeError(f"{name} must be an int, got {type(value).__name__}")


def _check_shape(shape) -> tuple[int, int, int] | None:
    if shape is None:
        return None
    if not isinstance(shape, (tuple, list)) or len(shape) != 3:
        raise UserTypeError(f"shape must be a (C, H, W) tuple, got {shape!r}")
    for s in shape:
        _check_int("shape entries", s)
    shape = tuple(int(s) for s in shape)
    if min(shape) < 1:
        raise UserError(f"shape must have positive entries, got {shape}")
    return shape  # type: ignore[return-value]


def _resolve(name: str) -> tuple[str, str | None]:
    if not isinstance(name, str):
        raise UserTypeError(f"data set name must be a str, got {type(name).__name__}")
    key, sep, arg = name.partition(":")
    key = key.strip().lower().replace("_", "-")
    if key == "fashionmnist":
        key = "fashion-mnist"
    if key not in DATASETS:
        known = ", ".join("imagefolder:PATH" if n == "imagefolder" else n for n in DATASETS.names())
        raise UserError(f"unknown data set {name!r}; known: {known}")
    if sep and key != "imagefolder":
        raise UserError(f"data set {key!r} takes no ':' argument, got {name!r}")
    return key, (arg if sep else None)


def load_data(
    name: str,
    root: str | os.PathLike | None = None,
    *,
    subset: int | None = None,
    val_split: float = 0.0,
    shape: tuple[int, int, int] | None = None,
    num_classes: int | None = None,
    seed: int = 0,
    augment: str | None = None,
    workers: int = 0,
) -> Data:
    """Load a data set by name (``DATASETS.names()`` or ``imagefolder:PATH``).

    ``root`` defaults to :func:`default_data_root`. ``shape``/``num_classes`` configure ``synthetic`` and
    ``imagefolder`` (and must agree with fixed data sets). ``subset=N`` keeps the first N training samples
    after a shuffle seeded by ``seed``; ``val_split=f`` then holds out ``round(f * n)`` of them as ``val``.
    The test split is never touched. ``augment`` (``AUGMENTS``) augments the training batches: ``flip-crop``
    or ``none`` (default: the set's own, flip-crop for CIFAR); ``workers`` are the DataLoader processes that
    decode an image folder's batches, or gather an in-memory set's (0: in this process; the batches are the same).
    """
    if augment is not None and augment not in AUGMENTS:
        raise UserError(f"unknown augmentation {augment!r}; known: {', '.join(AUGMENTS)}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise UserError(f"workers must be a non-negative integer, got {workers!r}")
    key, arg = _resolve(name)
    shape = _check_shape(shape)
    _check_int("num_classes", num_classes)
    _check_int("subset", subset)
    _check_int("seed", seed, allow_none=False)
    if isinstance(val_split, bool) or not isinstance(val_split, (int, float)):
        raise UserTypeError(f"val_split must be a float, got {type(val_split).__name__}")
    if not 0.0 <= val_split < 1.0:
        raise UserError(f"val_split must be in [0, 1), got {val_split}")
    if num_classes is not None and num_classes < 1:
        raise UserError(f"num_classes must be >= 1, got {num_classes}")
    if key in _FIXED:
        fixed_shape, fixed_classes = _FIXED[key]
        if shape is not None and shape != fixed_shape:
            raise UserError(f"{key} has fixed shape {fixed_shape}; got shape={shape}")
        if num_classes is not None and num_classes != fixed_classes:
            raise UserError(f"{key} has {fixed_classes} classes; got num_classes={num_classes}")
    root_path = pathlib.Path(root).expanduser() if root is not None else default_data_root()

    data = DATASETS.get(key)(root_path, arg=arg, shape=shape, num_classes=num_classes, seed=int(seed),
                             workers=workers)

    if workers and isinstance(data.train, Split):  # in-memory sets: the workers gather the batches' samples
        data = dataclasses.replace(data, train=dataclasses.replace(data.train, workers=workers),
                                   test=dataclasses.replace(data.test, workers=workers))
    g = torch.Generator().manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    train = data.train if augment is None else data.train.select(torch.arange(len(data.train)),
                                                                 augment=augment == "flip-crop")
    if subset is not None:
        if not 1 <= subset <= len(train):
            raise UserError(f"subset must be in 1..{len(train)} for {data.name}, got {subset}")
        train = train.select(torch.randperm(len(train), generator=g)[: int(subset)])
    val = None
    if val_split > 0:
        n = len(train)
        n_val = int(math.floor(val_split * n + 0.5))
        if n_val < 1 or n_val >= n:
            raise UserError(f"val_split={val_split} of {n} training samples leaves an empty train or val split")
        perm = torch.randperm(n, generator=g)
        val = train.select(perm[:n_val], augment=False)
        train = train.select(perm[n_val:])
    return Data(data.name, train, val, data.test, data.input_shape, data.num_classes, data.classes)
