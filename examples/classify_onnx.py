"""Classify images with an exported ONNX model using only onnxruntime and numpy (no torch).

    compress export runs/f.cpk -o runs/f.onnx
    python examples/classify_onnx.py runs/f.onnx image1.png image2.png
    python examples/classify_onnx.py runs/f.onnx --idx /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz

The normalisation (mean and std of the training data) is read from the model's metadata, which
`compress export` writes. Prints one line per image: index or file, class (and its name), probability.
"""
from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image


def read_images(paths: list[str], shape: tuple[int, int, int]) -> np.ndarray:
    channels, height, width = shape
    mode = "L" if channels == 1 else "RGB"
    images = []
    for path in paths:
        array = np.asarray(Image.open(path).convert(mode).resize((width, height), Image.BILINEAR), dtype=np.float32)
        images.append(array[None] / 255.0 if channels == 1 else array.transpose(2, 0, 1) / 255.0)
    return np.stack(images)


def read_idx_images(path: str, count: int) -> np.ndarray:
    raw = Path(path).read_bytes()
    data = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    if int.from_bytes(data[:4], "big") != 0x803:
        raise SystemExit(f"{path} is not an IDX image file")
    total, rows, cols = (int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(3))
    count = min(count, total)
    pixels = np.frombuffer(data, dtype=np.uint8, count=count * rows * cols, offset=16)
    return pixels.reshape(count, 1, rows, cols).astype(np.float32) / 255.0


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="an ONNX file written by compress export")
    parser.add_argument("images", nargs="*", help="image files (PNG, JPEG, ...)")
    parser.add_argument("--idx", help="an IDX image file to take images from instead")
    parser.add_argument("--count", type=int, default=5, help="images to take from --idx")
    args = parser.parse_args()

    session = ort.InferenceSession(args.model, providers=["CPUExecutionProvider"])
    metadata = session.get_modelmeta().custom_metadata_map
    shape = tuple(int(d) for d in session.get_inputs()[0].shape[1:])
    channels = shape[0]
    mean = np.array([float(v) for v in metadata.get("compress.mean", ",".join(["0"] * channels)).split(",")],
                    dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.array([float(v) for v in metadata.get("compress.std", ",".join(["1"] * channels)).split(",")],
                   dtype=np.float32).reshape(1, -1, 1, 1)
    if args.idx:
        pixels, names = read_idx_images(args.idx, args.count), None
    elif args.images:
        pixels, names = read_images(args.images, shape), args.images
    else:
        raise SystemExit("give image files or --idx FILE")

    classes = json.loads(metadata.get("compress.class_names", "[]"))
    (logits,) = session.run(None, {session.get_inputs()[0].name: ((pixels - mean) / std).astype(np.float32)})
    for index, row in enumerate(softmax(logits)):
        label = names[index] if names else f"image {index}"
        best = int(row.argmax())
        name = f" ({classes[best]})" if best < len(classes) else ""
        print(f"{label}: class {best}{name} (p = {row.max():.3f})")


if __name__ == "__main__":
    main()
