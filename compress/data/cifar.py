"""CIFAR-10 and CIFAR-100 through torchvision's readers (``download=False`` first, then a download)."""
from __future__ import annotations

import pathlib

import numpy as np
import torch

from compress.data import download, registry
from compress.data.registry import DATASETS, _NORM
from compress.data.split import Data, Split


def _cifar(name: str, cls_name: str, root: pathlib.Path) -> Data:
    import torchvision.datasets as tvd

    cls = getattr(tvd, cls_name)
    folder = cls.base_folder
    candidates = [root, root / name] + [pathlib.Path(d) / name for d in registry.SYSTEM_DATA_DIRS]

    def attempt(r: pathlib.Path):
        if not (r / folder).is_dir():
            return None
        try:
            with download._quiet():
                return cls(str(r), train=True, download=False), cls(str(r), train=False, download=False)
        except RuntimeError:  # "not found or corrupted"
            return None

    sets = None
    for r in candidates:
        sets = attempt(r)
        if sets is not None:
            break
    if sets is None and download._download_torchvision(cls_name, root):
        sets = attempt(root)
    if sets is None:
        dirs = ", ".join(str(r / folder) for r in candidates)
        raise FileNotFoundError(
            f"{name}: need torchvision's {folder}/ (python pickle batches) in one of: {dirs}; "
            f"the download into {root} failed (offline?); run once online or copy the folder there"
        )
    mean, std = _NORM[name]
    splits = []
    for ds, aug in zip(sets, (True, False)):
        x = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        y = torch.as_tensor(ds.targets, dtype=torch.int64)
        splits.append(Split(x, y, mean, std, augment=aug))
    n_classes = 10 if name == "cifar10" else 100
    return Data(name, splits[0], None, splits[1], (3, 32, 32), n_classes, list(sets[0].classes))


@DATASETS.register("cifar10")
def _cifar10(root: pathlib.Path, **_) -> Data:
    return _cifar("cifar10", "CIFAR10", root)


@DATASETS.register("cifar100")
def _cifar100(root: pathlib.Path, **_) -> Data:
    return _cifar("cifar100", "CIFAR100", root)
