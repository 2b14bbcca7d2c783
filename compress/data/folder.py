"""``imagefolder:PATH``: class-per-folder images, decoded lazily, batch by batch, through a torch DataLoader.

Nothing but the file names and labels is held: each batch is decoded (PIL, resized to the input shape) when
it is drawn, in ``workers`` DataLoader processes (``--workers``; 0 decodes in the training process), so
memory does not grow with the folder. The order of the batches and their augmentation come from the
generator the training loop passes, as for the in-memory splits, so a run is the same with any number of
workers. The channels follow the images (1 when every sampled image is grayscale, else 3) unless
``--data-shape`` says; the normalisation is the mean and standard deviation of up to ``STATS_SAMPLES``
training images, drawn with a fixed seed.
"""
from __future__ import annotations

import math
import pathlib
from typing import Iterator

import numpy as np
import torch

from compress.data.registry import DATASETS
from compress.data.split import Data, crop_flip_pad, normalise_batch
from compress.errors import UserError

_CARVE_SEED = 0x5EED  # the fixed 80/20 train/test carve of a folder without train/ and test/: never the run's seed
STATS_SAMPLES = 1000  # images whose statistics normalise the set
SHAPE_SAMPLES = 16  # images whose mode decides grayscale or colour
DEFAULT_SIZE = (32, 32)
GRAYSCALE_MODES = {"1", "L", "LA", "I", "I;16", "F"}


class _Images(torch.utils.data.Dataset):
    """Image ``i`` of ``files`` as a uint8 (C, H, W) tensor, with its index (decoded when asked for)."""

    def __init__(self, files: list[str], shape: tuple[int, int, int]):
        self.files, self.shape = files, shape

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return decode_image(self.files[index], self.shape), index


def decode_image(file: str, shape: tuple[int, int, int]) -> torch.Tensor:
    """One image file as uint8 (C, H, W), converted to grayscale or RGB and resized (bilinear)."""
    from PIL import Image

    c, h, w = shape
    try:
        with Image.open(file) as image:
            image = image.convert("L" if c == 1 else "RGB").resize((w, h), Image.BILINEAR)
            array = np.asarray(image, dtype=np.uint8).reshape(h, w, c)
    except OSError as error:
        raise UserError(f"imagefolder: cannot read image {file}: {error}") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


class FolderSplit:
    """One split of an image folder: file names and labels; batches decoded on demand (``Split``'s interface)."""

    def __init__(self, files: list[str], y: torch.Tensor, shape: tuple[int, int, int], mean, std,
                 augment: bool = False, workers: int = 0):
        self.files, self.y, self._shape = list(files), y.long(), tuple(shape)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.augment, self.workers = augment, workers

    def __len__(self) -> int:
        return len(self.files)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self._shape

    def select(self, index: torch.Tensor, augment: bool | None = None) -> "FolderSplit":
        """The samples at ``index``, same normalisation (and augmentation, unless ``augment`` says)."""
        chosen = index.tolist()
        return FolderSplit([self.files[i] for i in chosen], self.y[index], self._shape, self.mean, self.std,
                           self.augment if augment is None else augment, self.workers)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return normalise_batch(x, self.mean, self.std)

    def images(self) -> torch.Tensor:
        """Every image of the split decoded at once, uint8 (N, C, H, W): for small folders and checks."""
        return torch.stack([decode_image(f, self._shape) for f in self.files]) if self.files else torch.zeros(
            (0, *self._shape), dtype=torch.uint8)

    def batches(self, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None,
                train: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(x, y)`` batches as ``Split.batches`` gives them, each decoded when it is drawn."""
        augment = bool(train and self.augment)
        if generator is None and (shuffle or augment):
            generator = torch.Generator().manual_seed(0)
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        plan = [order[start : start + batch_size].tolist() for start in range(0, len(self), batch_size)]
        loader = torch.utils.data.DataLoader(_Images(self.files, self._shape), batch_sampler=plan,
                                             num_workers=self.workers, persistent_workers=False)
        for images, index in loader:
            if augment:
                images = crop_flip_pad(images, generator)
            yield self.normalise(images), self.y[index]


def _scan_folder(path: pathlib.Path):
    """(samples [(file, class index)], class names) via torchvision's ImageFolder scan (no image decoding)."""
    import torchvision.datasets as tvd

    try:
        ds = tvd.ImageFolder(str(path), loader=lambda p: p)
    except FileNotFoundError as e:
        raise UserError(f"imagefolder: no images under {path} ({str(e).splitlines()[0]})") from None
    return ds.samples, ds.classes


def _channels(files: list[str]) -> int:
    """1 when every one of the first SHAPE_SAMPLES images is grayscale, else 3."""
    from PIL import Image

    for file in files[:SHAPE_SAMPLES]:
        try:
            with Image.open(file) as image:
                if image.mode not in GRAYSCALE_MODES:
                    return 3
        except OSError as error:
            raise UserError(f"imagefolder: cannot read image {file}: {error}") from None
    return 1


def _channel_stats(files: list[str], shape: tuple[int, int, int]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (of values scaled to [0, 1]) of up to STATS_SAMPLES images, drawn with a fixed seed."""
    generator = torch.Generator().manual_seed(_CARVE_SEED)
    chosen = torch.randperm(len(files), generator=generator)[:STATS_SAMPLES].tolist()
    c = shape[0]
    total = torch.zeros(c, dtype=torch.float64)
    squares = torch.zeros(c, dtype=torch.float64)
    for i in chosen:
        x = decode_image(files[i], shape).to(torch.float64) / 255.0
        total += x.sum(dim=(1, 2))
        squares += (x * x).sum(dim=(1, 2))
    n = len(chosen) * shape[1] * shape[2]
    mean = total / n
    std = (squares / n - mean * mean).clamp_min(0).sqrt()
    std = torch.where(std > 1e-6, std, torch.ones_like(std))  # constant images: do not divide by ~0
    return tuple(mean.tolist()), tuple(std.tolist())


@DATASETS.register("imagefolder")
def _imagefolder(root: pathlib.Path, *, arg: str | None = None, shape: tuple[int, int, int] | None = None,
                 num_classes: int | None = None, workers: int = 0, **_) -> Data:
    if not arg:
        raise UserError("imagefolder needs a path: use 'imagefolder:PATH'")
    path = pathlib.Path(arg).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"imagefolder: directory {path} does not exist")
    if shape is not None and shape[0] not in (1, 3):
        raise UserError(f"imagefolder: shape needs 1 (grayscale) or 3 (RGB) channels, got {shape}")
    test_dir = next((path / d for d in ("test", "val") if (path / d).is_dir()), None)
    if (path / "train").is_dir() and test_dir is not None:
        train_samples, classes = _scan_folder(path / "train")
        test_samples, test_classes = _scan_folder(test_dir)
        unknown = sorted(set(test_classes) - set(classes))
        if unknown:
            raise UserError(f"imagefolder: classes {unknown} in {test_dir} are not in {path / 'train'}")
        remap = [classes.index(cl) for cl in test_classes]
        test_samples = [(f, remap[t]) for f, t in test_samples]
    else:
        samples, classes = _scan_folder(path)
        labels = torch.tensor([t for _, t in samples])
        g = torch.Generator().manual_seed(_CARVE_SEED)
        test_mask = torch.zeros(len(samples), dtype=torch.bool)
        for k in range(len(classes)):  # stratified: about 20% of every class
            members = torch.nonzero(labels == k).flatten()
            n_test = int(math.floor(0.2 * len(members) + 0.5))
            test_mask[members[torch.randperm(len(members), generator=g)[:n_test]]] = True
        if not test_mask.any() or test_mask.all():
            raise UserError(f"imagefolder: {len(samples)} images under {path} are too few to carve a 20% test split")
        train_samples = [s for s, t in zip(samples, test_mask.tolist()) if not t]
        test_samples = [s for s, t in zip(samples, test_mask.tolist()) if t]
    if num_classes is not None and num_classes != len(classes):
        raise UserError(f"imagefolder: num_classes={num_classes} but {path} has {len(classes)} class folders")
    train_files = [f for f, _ in train_samples]
    shape = tuple(shape) if shape is not None else (_channels(train_files), *DEFAULT_SIZE)
    mean, std = _channel_stats(train_files, shape)
    train = FolderSplit(train_files, torch.tensor([t for _, t in train_samples]), shape, mean, std, workers=workers)
    test = FolderSplit([f for f, _ in test_samples], torch.tensor([t for _, t in test_samples]), shape, mean, std,
                       workers=workers)
    return Data(f"imagefolder:{path}", train, None, test, shape, len(classes), list(classes))
