"""Artifact size against general-purpose compressors and the bitmask layout of compressed-tensors.

    python examples/benchmarks/bench_artifact_size.py [--quick]

Trains (briefly, on real Fashion-MNIST) LeNet-5 with FreezeNet at 0.64% and SNIP at 1%, and resnet20 with
SNIP at 1%, packs each with fp16 and with int8 values, and prints: the artifact's bytes against dense
fp32; the bytes of the *bitmask layout* of the same trained weights (per masked tensor the fp16 trained
values, the mask as a packed bitmap and int32 row offsets, dense tensors in fp16, one safetensors file:
the layout of compressed-tensors; frozen weights are not in it, a reader would need this project's
seed for them); gzip -9, xz -9e and zstd -19 (the zstd command, if installed) of both; the same artifact in
the plain layout (format versions 1 to 4, `--layout plain`); the coded trained values against an estimate of
their information content; and the bits per trained weight split into values, mask, dense tensors and header.
Targets (issue 16): no compressor
shrinks an artifact by more than 2%; the artifact is smaller than the best compressor on the bitmask
layout; FreezeNet LeNet-5 at 0.64% at least 175x smaller than dense fp32 with fp16 values, 215x with int8.
"""
from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import lzma
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from compress.config import RunConfig
from compress.packing import pack_run
from compress.run import train_run
from formats.artifact import parse_artifact, rebuild_state_dict, split_artifact

CASES = [("lenet5", "freezenet", 0.0064), ("lenet5", "snip", 0.01), ("resnet20", "snip", 0.01)]


def compressors() -> dict:
    found = {"gzip -9": lambda b: len(gzip.compress(b, 9, mtime=0)),
             "xz -9e": lambda b: len(lzma.compress(b, preset=9 | lzma.PRESET_EXTREME))}
    if shutil.which("zstd"):
        found["zstd -19"] = lambda b: len(subprocess.run(["zstd", "-19", "-q", "-c"], input=b, capture_output=True,
                                                         check=True).stdout)
    return found


def bitmask_layout(artifact_path: Path) -> bytes:
    """The trained weights of an artifact in the bitmask layout (fp16 values, packed bitmap, row offsets)."""
    artifact = parse_artifact(artifact_path.read_bytes())
    state = rebuild_state_dict(artifact)
    masked = {e["name"] for e in artifact.schema["tensors"] if e["kind"] == "masked"}
    tensors = {}
    for name, tensor in state.items():
        if name not in masked:
            tensors[name] = tensor.half() if tensor.is_floating_point() else tensor
            continue
        mask = torch.from_numpy(_mask_of(artifact, name, tensor.shape))
        rows = mask.reshape(tensor.shape[0], -1)
        tensors[f"{name}.values"] = tensor.reshape(-1)[mask.reshape(-1)].half()
        tensors[f"{name}.bitmask"] = torch.from_numpy(np.packbits(rows.numpy(), axis=1))
        tensors[f"{name}.row_offsets"] = torch.cumsum(rows.sum(1), 0).to(torch.int32)
    return safetensors.torch.save(tensors)


def value_information_bytes(data: bytes) -> float:
    """An estimate of the information in an artifact's trained values: per masked tensor, the order-0 entropy of
    its values' most significant byte (fp16/bf16: sign, exponent, top mantissa bits; int8: the whole value) plus 8
    bits for each less significant byte, taken as random. The entropy is measured on the tensor itself, so the
    estimate omits the cost of describing the distribution: a coder can barely go below it."""
    schema, tensors, _ = split_artifact(data)
    total = 0.0
    for entry in schema["tensors"]:
        stored = tensors.get(f"v:{entry['name']}") if entry["kind"] == "masked" else None
        if stored is None or not len(stored.data):
            continue
        size = len(stored.data) // entry["k"]
        high = np.frombuffer(stored.data, np.uint8).reshape(-1, size)[:, size - 1]
        counts = np.bincount(high, minlength=256)
        p = counts[counts > 0] / len(high)
        total += (-(counts[counts > 0] * np.log2(p)).sum() + 8 * (size - 1) * len(high)) / 8
    return total


def _mask_of(artifact, name: str, shape) -> np.ndarray:
    from formats.artifact import decode_stored_mask

    entry = next(e for e in artifact.schema["tensors"] if e["name"] == name)
    return decode_stored_mask(artifact.tensors[f"m:{name}"].data, entry["n"], entry["k"], name).reshape(shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer training samples")
    args = parser.parse_args()
    print(f"# compress artifact-size benchmark: python {' '.join(sys.argv)}\n")
    tools = compressors()
    checks = []
    with tempfile.TemporaryDirectory() as scratch:
        for model, method, density in CASES:
            subset = (2000 if args.quick else 10_000) if model == "lenet5" else (500 if args.quick else 2000)
            run = Path(scratch) / f"{model}-{method}"
            config = RunConfig(model=model, data="fashion-mnist", method=method, density=density, epochs=1,
                               subset=subset, device="cpu")
            with contextlib.redirect_stderr(io.StringIO()):
                train_run(config, run, progress=False)
            print(f"## {model}, {method} at {density:.2%} (1 epoch on {subset:,} Fashion-MNIST images)\n")
            print(f"{'file':<22} {'bytes':>9} {'x dense fp32':>13} " + " ".join(f"{t:>10}" for t in tools)
                  + "   best compressor's saving")
            for values in ("fp16", "int8"):
                path = Path(scratch) / f"{model}-{method}-{values}.cpk"
                with contextlib.redirect_stderr(io.StringIO()):
                    info = pack_run(run, path, values, evaluate=values == "int8")
                data = path.read_bytes()
                totals = info["totals"]
                sizes = {name: measure(data) for name, measure in tools.items()}
                best = min(sizes.values())
                print(f"{'artifact ' + values:<22} {len(data):>9,} {totals['ratio_to_dense_fp32']:>13.1f} "
                      + " ".join(f"{v:>10,}" for v in sizes.values()) + f"   {1 - best / len(data):.2%}")
                estimate = value_information_bytes(data)
                print(f"{'  coded values':<22} {totals['value_bytes']:,} B from {totals['value_raw_bytes']:,} B raw; "
                      f"information estimate {estimate:,.0f} B (coded / estimate {totals['value_bytes'] / estimate:.3f})")
                if values == "fp16":
                    plain = Path(scratch) / f"{model}-{method}-plain.cpk"
                    with contextlib.redirect_stderr(io.StringIO()):
                        plain_totals = pack_run(run, plain, values, layout="plain")["totals"]
                    print(f"{'plain layout (v1-4)':<22} {plain_totals['file_bytes']:>9,} "
                          f"{plain_totals['ratio_to_dense_fp32']:>13.1f}   (header {plain_totals['header_bytes']:,} B; "
                          f"compact saves {1 - len(data) / plain_totals['file_bytes']:.1%})")
                    layout = bitmask_layout(path)
                    layout_sizes = {name: measure(layout) for name, measure in tools.items()}
                    print(f"{'bitmask layout':<22} {len(layout):>9,} {totals['dense_fp32_bytes'] / len(layout):>13.1f} "
                          + " ".join(f"{v:>10,}" for v in layout_sizes.values()))
                    checks.append((f"{model} {method}: no compressor shrinks the fp16 artifact by more than 2%",
                                   1 - best / len(data) <= 0.02, f"{1 - best / len(data):.2%}"))
                    checks.append((f"{model} {method}: fp16 artifact smaller than the best compressor on the bitmask "
                                   "layout", len(data) < min(layout_sizes.values()),
                                   f"{len(data):,} vs {min(layout_sizes.values()):,} B"))
                trained = totals["masked_trained"]
                split = {part: 8 * totals[key] / trained for part, key in
                         (("values", "value_bytes"), ("mask", "mask_bytes"), ("dense", "dense_bytes"),
                          ("header", "header_bytes"))}
                print(f"{'  bits per trained':<22} " + ", ".join(f"{k} {v:.2f}" for k, v in split.items())
                      + f" (total {8 * len(data) / trained:.2f}; header {totals['header_bytes']:,} B)")
                result = info["schema"]["manifest"].get("eval")
                if result:
                    print(f"{'  int8 accuracy':<22} packed {result['test_acc_packed']:.2%} against "
                          f"{result['test_acc_unpacked']:.2%} unpacked")
                if values == "fp16" and model == "lenet5":
                    checks.append((f"lenet5 {method}: header and manifest at most 1 KB", totals["header_bytes"] <= 1024,
                                   f"{totals['header_bytes']:,} B"))
                if (model, method) == ("lenet5", "freezenet"):
                    target = 175 if values == "fp16" else 215
                    checks.append((f"lenet5 freezenet 0.64% {values}: >= {target}x smaller than dense fp32",
                                   totals["ratio_to_dense_fp32"] >= target, f"{totals['ratio_to_dense_fp32']:.1f}x"))
                    if result:
                        cost = 100 * (result["test_acc_unpacked"] - result["test_acc_packed"])
                        checks.append(("lenet5 freezenet 0.64% int8: accuracy cost <= 0.3 points", cost <= 0.3,
                                       f"{cost:+.2f} points"))
            print()
    print("## Targets")
    for label, passed, measured in checks:
        print(f"{'PASS' if passed else 'FAIL'}  {label}  ({measured})")


if __name__ == "__main__":
    main()
