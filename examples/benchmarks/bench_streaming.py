"""Peak memory of training on an image folder as it grows: images are decoded per batch, not held.

    python examples/benchmarks/bench_streaming.py [--quick]

Generates folders of 2,000 and 20,000 random 3x64x64 PNG images (10 classes; --quick: 500 and 5,000), trains
LeNet-300-100 on each for one epoch with `--workers 2 --augment flip-crop` in a fresh process, and prints each
run's peak resident memory (the training process and, separately, its largest DataLoader worker) against what
the images would take held as uint8 tensors. Target (issue 18): the peak of the larger folder at most 1.2x the
smaller one's (flat), where holding the images would add their whole size.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

SIZES = {"full": (2_000, 20_000), "quick": (500, 5_000)}
SHAPE = (3, 64, 64)
CLASSES = 10


def generate(root: Path, count: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(count)
    for i in range(count):
        label = i % CLASSES
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (SHAPE[1], SHAPE[2], SHAPE[0]), dtype=np.uint8)
        pixels[..., 0] = pixels[..., 0] // 4 + 24 * label  # the red channel tells the class
        Image.fromarray(pixels).save(folder / f"{i}.png", compress_level=1)


def measure(folder: Path, out: Path) -> dict:
    """Train in this process (called as ``--measure FOLDER OUT``) and report the peak memory in MiB."""
    from cli.main import main

    code = main(["train", "--model", "lenet300", "--data", f"imagefolder:{folder}", "--data-shape", "3x64x64",
                 "--workers", "2", "--augment", "flip-crop", "--method", "snip", "--density", "0.05", "--epochs", "1",
                 "--quiet", "--out", str(out)])
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"code": code, "process_mib": own, "worker_mib": workers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="folders of 500 and 5,000 images")
    parser.add_argument("--measure", nargs=2, metavar=("FOLDER", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure[0]), Path(args.measure[1]))))
        return
    print(f"# compress streaming-data benchmark: python {' '.join(sys.argv)}\n")
    small, large = SIZES["quick" if args.quick else "full"]
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for count in (small, large):
            folder = Path(scratch) / f"images{count}"
            generate(folder, count)
            run = subprocess.run([sys.executable, __file__, "--measure", str(folder), str(Path(scratch) / f"run{count}")],
                                 capture_output=True, text=True, check=False)
            if run.returncode != 0:
                raise SystemExit(f"training on {count} images failed:\n{run.stderr[-2000:]}")
            results[count] = json.loads(run.stdout.strip().splitlines()[-1])
            held = count * int(np.prod(SHAPE)) / 2**20
            print(f"{count:>7,} images: peak {results[count]['process_mib']:7.1f} MiB (training process), "
                  f"{results[count]['worker_mib']:6.1f} MiB (largest worker); held as uint8 they would take "
                  f"{held:6.1f} MiB")
    ratio = results[large]["process_mib"] / results[small]["process_mib"]
    print("\n## Targets")
    print(f"{'PASS' if ratio <= 1.2 else 'FAIL'}  peak memory with {large:,} images at most 1.2x that with {small:,} "
          f"({ratio:.3f}x)")


if __name__ == "__main__":
    main()
