"""A generated, learnable classification task: no files, no download."""
from __future__ import annotations

import pathlib

import torch
import torch.nn.functional as F

from compress.data.registry import DATASETS
from compress.data.split import Data, Split
from compress.errors import UserError


def make_synthetic(
    shape: tuple[int, int, int] = (1, 28, 28),
    num_classes: int = 10,
    n_train: int = 4096,
    n_test: int = 1024,
    seed: int = 0,
) -> tuple[Split, Split]:
    """A learnable, not trivial, classification task generated from ``seed`` (local generator only).

    Every class has two smooth prototypes ("modes"): Gaussian noise on a coarse grid (about 1/6 of the
    image side) upsampled bicubically to a canvas a little larger than the image, scaled to unit std. A
    sample of class ``k`` is a randomly placed crop (shift up to ~1/10 of the side) of one of class ``k``'s
    prototypes times a random contrast in [0.6, 1.4], plus a crop of a prototype of another random class
    weighted by U(0, 0.7), plus smooth noise (a fresh low-frequency field, std 0.7) and white pixel noise
    (std 0.7). The set is then standardised (train mean and std), stored as float32 with normalisation
    constants 0/1. The distractor and noises overlap the classes and two modes per class make a linear
    model fall short: on the default 28x28 / 10-class set LeNet-300-100 reaches about 80-85% test accuracy
    after one epoch, 85-90% after two and plateaus near 91% (training accuracy goes to ~100%), while
    logistic regression plateaus near 77-80%.
    """
    c, h, w = shape
    g = torch.Generator().manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    shift = max(1, round(0.1 * min(h, w)))
    ch, cw = h + 2 * shift, w + 2 * shift

    def smooth(n: int, cells: int) -> torch.Tensor:
        gh, gw = max(2, round(h / cells)), max(2, round(w / cells))
        coarse = torch.randn(n, c, gh, gw, generator=g)
        field = F.interpolate(coarse, size=(ch, cw), mode="bicubic", align_corners=False)
        return field / field.flatten(1).std(dim=1).clamp_min(1e-6).view(n, 1, 1, 1)

    modes = 2
    protos = smooth(num_classes * modes, 6)  # (K * modes, C, ch, cw), unit std each; row k * modes + j

    def crops(fields: torch.Tensor) -> torch.Tensor:
        n = fields.shape[0]
        oy = torch.randint(0, 2 * shift + 1, (n,), generator=g)
        ox = torch.randint(0, 2 * shift + 1, (n,), generator=g)
        rows = (oy[:, None] + torch.arange(h))[:, None, :, None]
        cols = (ox[:, None] + torch.arange(w))[:, None, None, :]
        return fields[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, num_classes, (n,), generator=g)
        other = (y + torch.randint(1, num_classes, (n,), generator=g)) % num_classes if num_classes > 1 else y
        contrast = 0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=g)
        mix = torch.rand(n, 1, 1, 1, generator=g)
        mode = torch.randint(0, modes, (n,), generator=g)
        omode = torch.randint(0, modes, (n,), generator=g)
        x = contrast * crops(protos[y * modes + mode]) + 0.7 * mix * crops(protos[other * modes + omode])
        x = x + 0.7 * smooth(n, 4)[:, :, shift : shift + h, shift : shift + w]
        x = x + 0.7 * torch.randn(n, c, h, w, generator=g)
        return x, y

    x_train, y_train = sample(n_train)
    x_test, y_test = sample(n_test)
    mu, sd = x_train.mean(), x_train.std().clamp_min(1e-6)
    zeros, ones = (0.0,) * c, (1.0,) * c
    return (
        Split(((x_train - mu) / sd).float(), y_train, zeros, ones),
        Split(((x_test - mu) / sd).float(), y_test, zeros, ones),
    )


MAX_SYNTHETIC_ELEMENTS = 2**26  # bound on samples x C x H x W (256 MiB of float32), so any shape stays affordable


def synthetic_sizes(shape: tuple[int, int, int], num_classes: int) -> tuple[int, int]:
    """(train, test) sample counts of the synthetic set: 4096 and 1024, fewer for large inputs.

    The counts shrink in proportion above ``MAX_SYNTHETIC_ELEMENTS`` pixel values in all (inputs larger
    than 3x64x64), so that a large shape, maybe read from an untrusted artifact, cannot exhaust memory;
    a shape whose class prototypes alone exceed the bound is refused.
    """
    c, h, w = shape
    shift = max(1, round(0.1 * min(h, w)))
    if 2 * num_classes * c * (h + 2 * shift) * (w + 2 * shift) > MAX_SYNTHETIC_ELEMENTS:
        raise UserError(f"synthetic data of shape {c}x{h}x{w} with {num_classes} classes is too large to generate "
                        f"(more than {MAX_SYNTHETIC_ELEMENTS:,} values); use a smaller --data-shape or fewer classes")
    n_train, n_test = 4096, 1024
    scale = min(1.0, MAX_SYNTHETIC_ELEMENTS / ((n_train + n_test) * c * h * w))
    return max(2, int(n_train * scale)), max(1, int(n_test * scale))


@DATASETS.register("synthetic")
def _synthetic(
    root: pathlib.Path, *, shape: tuple[int, int, int] | None = None, num_classes: int | None = None,
    seed: int = 0, **_,
) -> Data:
    shape = shape or (1, 28, 28)
    num_classes = 10 if num_classes is None else num_classes
    if num_classes < 2:
        raise UserError(f"synthetic: num_classes must be >= 2, got {num_classes}")
    n_train, n_test = synthetic_sizes(shape, num_classes)
    train, test = make_synthetic(shape, num_classes, n_train, n_test, seed=seed)
    return Data("synthetic", train, None, test, tuple(shape), num_classes)


# ------------------------------------------------------------------------------------------- entry
