"""Peak memory of a large model through the whole pipeline: score, select, one training step, pack, load.

    python examples/benchmarks/bench_large_model.py [--quick]

Runs, in a fresh process, torchvision's resnet50 (``tv:resnet50``, 25.6M parameters) on 3x224x224 inputs (an
image folder of ten images, read per batch; --quick: resnet18): SNIP scoring of one batch of 2, selection at 1%,
one training step (batch 2, 8 images: 4 steps),
pack, and load; and prints the peak resident memory above the process's baseline (torch imported, nothing
built) after each stage, as a multiple of the dense model's fp32 bytes. Target (issue 18): at most 3x.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def images(root: Path) -> Path:
    """Ten small images in two classes: the data set costs nothing next to the model (it is read per batch)."""
    import numpy as np
    from PIL import Image

    for i in range(10):
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((32, 32, 3), 25 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def measure(model_name: str, scratch: Path) -> dict:
    """The stages in this process (``--measure MODEL DIR``): the peak after each, in MiB."""
    import torch  # noqa: F401  (the baseline includes torch)

    baseline = peak_mib()
    from cli.main import main

    stages = {}
    run = scratch / "run"
    code = main(["train", "--model", model_name, "--data", f"imagefolder:{images(scratch / 'images')}", "--data-shape",
                 "3x224x224", "--batch-size", "2", "--score-batch-size", "2",
                 "--epochs", "1", "--method", "snip", "--density", "0.01", "--quiet", "--device", "cpu",
                 "--out", str(run)])
    stages["score, select, one step"] = peak_mib()
    code |= main(["pack", str(run), "-o", str(scratch / "model.cpk")])
    stages["pack"] = peak_mib()
    import formats

    model = formats.load(scratch / "model.cpk")
    stages["load"] = peak_mib()
    dense = sum(p.numel() * 4 for p in model.parameters())
    return {"code": code, "baseline_mib": baseline, "stages": stages, "dense_mib": dense / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="resnet18 instead of resnet50")
    parser.add_argument("--measure", nargs=2, metavar=("MODEL", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure[0], Path(args.measure[1]))))
        return
    model_name = "tv:resnet18" if args.quick else "tv:resnet50"
    print(f"# compress large-model memory benchmark: python {' '.join(sys.argv)}\n")
    with tempfile.TemporaryDirectory() as scratch:
        run = subprocess.run([sys.executable, __file__, "--measure", model_name, scratch], capture_output=True,
                             text=True, check=False)
    if run.returncode != 0:
        raise SystemExit(f"the pipeline failed:\n{run.stderr[-3000:]}")
    result = json.loads(run.stdout.strip().splitlines()[-1])
    dense, baseline = result["dense_mib"], result["baseline_mib"]
    print(f"{model_name}: dense fp32 parameters {dense:.1f} MiB; baseline {baseline:.1f} MiB (torch imported)")
    for stage, peak in result["stages"].items():
        print(f"  peak after {stage:<26} {peak:8.1f} MiB: {peak - baseline:8.1f} MiB above the baseline, "
              f"{(peak - baseline) / dense:.2f}x the dense model")
    worst = (max(result["stages"].values()) - baseline) / dense
    print("\n## Targets")
    print(f"{'PASS' if worst <= 3 else 'FAIL'}  peak memory above the baseline at most 3x the dense model ({worst:.2f}x)")


if __name__ == "__main__":
    main()
