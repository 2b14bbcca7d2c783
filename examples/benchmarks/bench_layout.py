"""Memory-layout benchmark: `train()` time of conv nets with channels_last (the CPU default) against NCHW.

    python examples/benchmarks/bench_layout.py [--quick]

`compress.training.train` runs conv nets on the CPU in channels_last layout, which oneDNN runs faster;
this times one epoch of `train()` on synthetic 1x28x28 data (batch 128, random masks at 5%,
freeze mode) with that layout and with the layout change switched off, interleaved in one run, for
LeNet-5-Caffe, resnet20 and resnet20 with interspace pruning. Targets: channels_last faster than NCHW for
the standard conv nets (ratio <= 1.0), and no slower than 1.05x for interspace pruning, whose conv weights
are computed anew every step (on this machine it is level with NCHW, within noise).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import compress.training as training
from compress.data import load_data
from compress.init import initial_values, initialise
from formats.interspace import to_interspace
from formats.models import build_model
from compress.scores import score
from compress.selection import select

def epoch_seconds(model_name: str, interspace: bool, data, channels_last: bool) -> float:
    model = build_model(model_name, (1, 28, 28), 10)
    if interspace:
        to_interspace(model, "dct")
    initialise(model, 0)
    plan = select(score(model, "random", [], seed=0), 0.05, mode="freeze")
    constraint = training.MaskConstraint(model, plan, initial_values(model, 0, list(plan.masks)))
    started = time.perf_counter()
    training.train(model, data, training.TrainSettings(epochs=1, batch_size=128), constraint, seed=0,
                   device=torch.device("cpu"), progress=False, channels_last=channels_last)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer samples and rounds")
    args = parser.parse_args()
    print(f"# compress layout benchmark: python {' '.join(sys.argv)}")
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads)\n")
    samples, rounds = (512, 2) if args.quick else (3840, 3)
    data = load_data("synthetic", subset=samples, seed=0, shape=(1, 28, 28))
    print(f"one epoch of {samples} samples (test pass included), median of {rounds} interleaved rounds\n")
    print(f"{'model':<14} {'NCHW s':>8} {'channels_last s':>16} {'ratio':>7}")
    checks = []
    for model_name, interspace in (("lenet5", False), ("resnet20", False), ("resnet20", True)):
        label = model_name + ("+ip" if interspace else "")
        times = {"nchw": [], "channels_last": []}
        for _ in range(rounds):
            times["nchw"].append(epoch_seconds(model_name, interspace, data, channels_last=False))
            times["channels_last"].append(epoch_seconds(model_name, interspace, data, channels_last=True))
        nchw, fast = statistics.median(times["nchw"]), statistics.median(times["channels_last"])
        print(f"{label:<14} {nchw:>8.2f} {fast:>16.2f} {fast / nchw:>7.3f}")
        checks.append((label, fast / nchw))
    print("\n## Targets")
    for label, ratio in checks:
        limit = 1.05 if label.endswith("+ip") else 1.0
        print(f"{'PASS' if ratio <= limit else 'FAIL'}  channels_last/NCHW train() time {label} <= {limit:.2f}x  "
              f"({ratio:.3f})")


if __name__ == "__main__":
    main()
