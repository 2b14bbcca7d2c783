"""A split held in memory as tensors, with a vectorised, seeded batch iterator, and the loaded data set."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

from compress.errors import UserError, UserTypeError


@dataclass
class Split:
    """One split held as tensors.

    ``x`` is uint8 ``(N, C, H, W)`` (scaled by 1/255 in :meth:`batches`) or floating point (used as is);
    ``y`` is int64 ``(N,)``. ``mean``/``std`` are per-channel constants applied after scaling.
    ``augment`` turns on CIFAR-style augmentation (zero-pad 4, random crop, random horizontal flip) for
    ``batches(..., train=True)``. ``workers`` > 0 gathers the batches' samples in that many DataLoader processes
    (``--workers``), which share the tensors with this one; the batches are the same as with 0 (the order,
    augmentation and normalisation stay in this process).
    """

    x: torch.Tensor
    y: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool = False
    workers: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.x, torch.Tensor) or not isinstance(self.y, torch.Tensor):
            raise UserTypeError(f"Split x and y must be tensors, got {type(self.x).__name__} and {type(self.y).__name__}")
        if self.x.dim() != 4:
            raise UserError(f"Split x must be (N, C, H, W), got shape {tuple(self.x.shape)}")
        if self.y.dim() != 1 or self.y.shape[0] != self.x.shape[0]:
            raise UserError(f"Split y must be ({self.x.shape[0]},), got shape {tuple(self.y.shape)}")
        if self.x.dtype != torch.uint8 and not self.x.is_floating_point():
            raise UserTypeError(f"Split x must be uint8 or floating point, got {self.x.dtype}")
        if self.y.dtype != torch.int64:
            self.y = self.y.long()
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)
        c = self.x.shape[1]
        if len(self.mean) != c or len(self.std) != c:
            raise UserError(f"Split mean/std need {c} channel values, got {len(self.mean)} and {len(self.std)}")
        if any(not s > 0 for s in self.std):
            raise UserError(f"Split std values must be positive, got {self.std}")

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.x.shape[1:])  # type: ignore[return-value]

    def select(self, index: torch.Tensor, augment: bool | None = None) -> "Split":
        """The samples at ``index`` (a 1-D index tensor), same normalisation (and augmentation, unless ``augment``
        says)."""
        return Split(self.x[index], self.y[index], self.mean, self.std, self.augment if augment is None else augment,
                     self.workers)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Raw batch (uint8 or float) -> float32 normalised batch."""
        return normalise_batch(x, self.mean, self.std)

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        train: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(x, y)``: float32 normalised ``(B, C, H, W)`` and int64 ``(B,)``; the last batch may be short.

        Shuffling and augmentation draw only from ``generator``. Without one, a fresh generator seeded 0 is
        used, so the order is the same every call: pass one generator that lives across epochs to get a new
        order each epoch. Augmentation happens only when ``train`` is true and the split has ``augment``.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int):
            raise UserTypeError(f"batch_size must be an int, got {type(batch_size).__name__}")
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise UserTypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        augment = bool(train and self.augment)
        if generator is None and (shuffle or augment):
            generator = torch.Generator().manual_seed(0)
        return self._iter_batches(batch_size, shuffle, generator, augment)  # arguments checked eagerly

    def _iter_batches(
        self, batch_size: int, shuffle: bool, generator: torch.Generator | None, augment: bool
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else None
        if self.workers:
            everything = order if order is not None else torch.arange(n)
            plan = [everything[start : start + batch_size] for start in range(0, n, batch_size)]
            raw = iter(torch.utils.data.DataLoader(_Rows(self.x, self.y), batch_sampler=plan, num_workers=self.workers,
                                                   collate_fn=_as_batch, persistent_workers=False))
        else:
            raw = ((self.x[start : start + batch_size], self.y[start : start + batch_size]) if order is None else
                   (self.x[order[start : start + batch_size]], self.y[order[start : start + batch_size]])
                   for start in range(0, n, batch_size))
        for xb, yb in raw:
            if augment:
                xb = crop_flip_pad(xb, generator)  # type: ignore[arg-type]
            yield self.normalise(xb), yb


class _Rows(torch.utils.data.Dataset):
    """The samples of a split's tensors, fetched a batch at a time (``__getitems__``) in a DataLoader worker."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __getitems__(self, index: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        chosen = torch.as_tensor(index, dtype=torch.int64)
        return self.x[chosen], self.y[chosen]


def _as_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The DataLoader's collate function: a batch is already formed by ``_Rows.__getitems__``."""
    return batch


def normalise_batch(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Raw batch (uint8, scaled by 1/255, or float) -> float32, minus ``mean`` over ``std`` per channel."""
    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.to(torch.float32)
    c = x.shape[1]
    return (x - torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1)) / torch.tensor(std, dtype=torch.float32).view(
        1, c, 1, 1)


def crop_flip_pad(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``--augment flip-crop``: a random crop of the image padded by an eighth of its height (4 pixels at 32, as
    for CIFAR), and a horizontal flip of half the batch."""
    return _crop_flip(x, pad=max(1, round(x.shape[2] / 8)), generator=generator)


def _crop_flip(x: torch.Tensor, *, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad by ``pad``, crop back to (H, W) at a random offset per sample and flip half horizontally.

    One gather for the whole batch (no per-sample loop); works on the raw (uint8) values so the padding is
    black, as with torchvision's RandomCrop before Normalize.
    """
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    rows = oy[:, None] + torch.arange(h)[None, :]  # (B, H)
    cols = ox[:, None] + torch.arange(w)[None, :]  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    bi = torch.arange(b)[:, None, None, None]
    ci = torch.arange(c)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


@dataclass
class Data:
    """A loaded data set: train, optional validation (from ``val_split``) and test splits."""

    name: str
    train: Split
    val: Split | None
    test: Split
    input_shape: tuple[int, int, int]
    num_classes: int
    classes: list[str] | None = None  # the class names, in label order (None: the labels' numbers)

    def class_names(self) -> list[str]:
        return list(self.classes) if self.classes else [str(i) for i in range(self.num_classes)]
