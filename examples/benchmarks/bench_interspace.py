"""Interspace pruning benchmark: training-step time of IP relative to standard pruning.

    python examples/benchmarks/bench_interspace.py [--quick]

resnet20 and vgg16 (3x32x32, 10 classes) at batch 128, random masks at density 5%, prune mode,
SGD with momentum: one step = forward, backward, mask the gradients, optimizer step, project. IP adds
W = lam F per convolution per step (and its backward). Both variants are timed interleaved in one run.
Target (issue "Interspace pruning"): IP at most 1.10x standard pruning.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from compress.init import initialise
from formats.interspace import to_interspace
from formats.models import build_model
from compress.scores import score
from compress.selection import select
from compress.training import MaskConstraint, TrainSettings, make_optimizer, training_step


def make_step(model_name: str, interspace: bool):
    model = build_model(model_name, (3, 32, 32), 10)
    if interspace:
        to_interspace(model, "dct")
    initialise(model, 0)
    plan = select(score(model, "random", [], seed=0), 0.05, mode="prune")
    constraint = MaskConstraint(model, plan)
    settings = TrainSettings(lr=0.05, weight_decay=5e-4)
    optimizer = make_optimizer(model, settings, constraint.names)
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(128, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 10, (128,), generator=generator)
    model.train()

    def step() -> float:
        started = time.perf_counter()
        training_step(model, optimizer, constraint, inputs, labels, settings.weight_decay)
        return time.perf_counter() - started

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps")
    args = parser.parse_args()
    print(f"# compress interspace benchmark: python {' '.join(sys.argv)}")
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads)\n")
    print(f"{'model':<9} {'standard ms':>12} {'interspace ms':>14} {'ratio':>7}  target <= 1.10")
    checks = []
    for model_name, rounds in (("resnet20", 6 if args.quick else 15), ("vgg16", 2 if args.quick else 5)):
        standard, interspace = make_step(model_name, False), make_step(model_name, True)
        standard(), interspace()  # warm-up
        times = {"standard": [], "interspace": []}
        for _ in range(rounds):  # interleaved, so machine noise hits both alike
            for _ in range(2):
                times["standard"].append(standard())
                times["interspace"].append(interspace())
        s, i = statistics.median(times["standard"]), statistics.median(times["interspace"])
        print(f"{model_name:<9} {s * 1e3:>12.1f} {i * 1e3:>14.1f} {i / s:>7.3f}")
        checks.append((model_name, i / s))
    print("\n## Targets")
    for model_name, ratio in checks:
        print(f"{'PASS' if ratio <= 1.10 else 'FAIL'}  interspace/standard step time {model_name} <= 1.10x  ({ratio:.3f})")


if __name__ == "__main__":
    main()
