"""ONNX latency benchmark: onnxruntime against PyTorch eager on the same packed model.

    python examples/benchmarks/bench_onnx.py [--quick]

For lenet5 (1x28x28) and resnet20 (3x32x32), each packed as a FreezeNet artifact at density 1% and
exported with `compress export`, at batch 1 and 64: median latency of `formats.load(artifact)` in
PyTorch eager (no_grad, eval) and of an onnxruntime CPU session, measured interleaved in one run.
Target (issue "ONNX export"): onnxruntime at most 1.0x PyTorch's time.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import formats
from cli.main import main as cli_main
from compress.packing import pack_run


def build_artifact(work: Path, model: str, shape: str) -> Path:
    out = work / model
    args = ["train", "--model", model, "--data", "synthetic", "--data-shape", shape, "--subset", "64",
            "--batch-size", "64", "--method", "freezenet", "--density", "0.01", "--epochs", "1", "--out", str(out),
            "--quiet"]
    if cli_main(args) != 0:
        sys.exit(f"training failed: compress {' '.join(args)}")
    pack_run(out, work / f"{model}.cpk")
    formats.export_onnx(work / f"{model}.cpk", work / f"{model}.onnx")
    return work / f"{model}.cpk"


def timed(function, repeats: int) -> float:
    started = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    rounds = 5 if args.quick else 15
    print(f"# compress ONNX latency benchmark: python {' '.join(sys.argv)}")
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime {ort.__version__}, "
          f"{platform.machine()}")
    print(f"\n{'model':<9} {'batch':>5} {'torch ms':>9} {'ort ms':>8} {'ort/torch':>9}  target <= 1.0")
    checks = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for model_name, shape in (("lenet5", "1x28x28"), ("resnet20", "3x32x32")):
            artifact = build_artifact(work, model_name, shape)
            model = formats.load(artifact)
            options = ort.SessionOptions()
            # onnxruntime's idle threads spin after each run and would steal the CPU from the torch
            # calls interleaved with them; without spinning each side is timed on a quiet machine.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            session = ort.InferenceSession(str(work / f"{model_name}.onnx"), options,
                                           providers=["CPUExecutionProvider"])
            dims = tuple(int(d) for d in shape.split("x"))
            for batch in (1, 64):
                x = torch.randn((batch, *dims), generator=torch.Generator().manual_seed(batch))
                x_np = x.numpy()
                repeats = 50 if batch == 1 else 5

                def run_torch():
                    with torch.no_grad():
                        model(x)

                def run_ort():
                    session.run(None, {"input": x_np})

                run_torch(), run_ort()  # warm-up
                torch_times, ort_times = [], []
                for _ in range(rounds):  # interleaved so machine noise hits both alike
                    torch_times.append(timed(run_torch, repeats))
                    ort_times.append(timed(run_ort, repeats))
                t, o = statistics.median(torch_times), statistics.median(ort_times)
                with torch.no_grad():
                    diff = float(np.abs(session.run(None, {"input": x_np})[0] - model(x).numpy()).max())
                ratio = o / t
                checks.append((f"{model_name} batch {batch}", ratio))
                print(f"{model_name:<9} {batch:>5} {t * 1e3:>9.3f} {o * 1e3:>8.3f} {ratio:>9.2f}  "
                      f"{'PASS' if ratio <= 1.0 else 'FAIL'} (max |diff| {diff:.1e})")
    print("\n## Targets")
    for name, ratio in checks:
        print(f"{'PASS' if ratio <= 1.0 else 'FAIL'}  onnxruntime/torch latency {name} <= 1.0x  ({ratio:.3f})")


if __name__ == "__main__":
    main()
