"""Classify images with a packed artifact in PyTorch: one call to ``formats.load``, a plain module.

    python examples/classify_torch.py runs/f.cpk image1.png image2.png
    python examples/classify_torch.py runs/f.cpk --idx /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz --count 5

Images are resized to the model's input shape, scaled to [0, 1] and normalised with the mean and std
of the training data recorded in the artifact. Prints one line per image: index or file, class (and its name), probability.
"""
from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import formats


def read_images(paths: list[str], shape: tuple[int, int, int]) -> np.ndarray:
    """Image files -> float32 (N, C, H, W) in [0, 1]."""
    channels, height, width = shape
    mode = "L" if channels == 1 else "RGB"
    images = []
    for path in paths:
        image = Image.open(path).convert(mode).resize((width, height), Image.BILINEAR)
        array = np.asarray(image, dtype=np.float32) / 255.0
        images.append(array[None] if channels == 1 else array.transpose(2, 0, 1))
    return np.stack(images)


def read_idx_images(path: str, count: int) -> np.ndarray:
    """The first ``count`` images of an IDX image file (gzipped or not) -> float32 (N, 1, H, W) in [0, 1]."""
    raw = Path(path).read_bytes()
    data = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    if int.from_bytes(data[:4], "big") != 0x803:
        raise SystemExit(f"{path} is not an IDX image file")
    total, rows, cols = (int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(3))
    count = min(count, total)
    pixels = np.frombuffer(data, dtype=np.uint8, count=count * rows * cols, offset=16)
    return pixels.reshape(count, 1, rows, cols).astype(np.float32) / 255.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact")
    parser.add_argument("images", nargs="*", help="image files (PNG, JPEG, ...)")
    parser.add_argument("--idx", help="an IDX image file to take images from instead")
    parser.add_argument("--count", type=int, default=5, help="images to take from --idx")
    args = parser.parse_args()

    info = formats.read_info(args.artifact)
    shape = tuple(info["schema"]["architecture"]["input_shape"])
    normalization = info["schema"]["manifest"].get("normalization") or {}
    mean = np.array(normalization.get("mean", [0.0] * shape[0]), dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.array(normalization.get("std", [1.0] * shape[0]), dtype=np.float32).reshape(1, -1, 1, 1)
    if args.idx:
        pixels, names = read_idx_images(args.idx, args.count), None
    elif args.images:
        pixels, names = read_images(args.images, shape), args.images
    else:
        raise SystemExit("give image files or --idx FILE")

    classes = info["schema"]["manifest"].get("class_names") or []  # recorded by compress train since 2026-12
    model = formats.load(args.artifact)
    with torch.no_grad():
        probabilities = torch.softmax(model(torch.from_numpy((pixels - mean) / std)), dim=1).numpy()
    for index, row in enumerate(probabilities):
        label = names[index] if names else f"image {index}"
        best = int(row.argmax())
        name = f" ({classes[best]})" if best < len(classes) else ""
        print(f"{label}: class {best}{name} (p = {row.max():.3f})")


if __name__ == "__main__":
    main()
