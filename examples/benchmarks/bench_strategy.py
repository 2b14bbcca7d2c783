"""Strategy-layer overhead: a oneshot run's training through the strategy layer against the bare loop.

    python examples/benchmarks/bench_strategy.py [--quick]

The strategy layer (compress/strategies, compress/run/levels.py) trains every method as levels: a
oneshot run is one level whose checkpoints also hold the masks and the strategy's state. This times
the training of one prepared run (SNIP at 5%, freeze mode, synthetic 1x28x28 data, batch 128) through
``run_level`` against ``training.train`` with a plain per-epoch checkpoint of the model and optimizer,
the metrics file, and the model and summary at the end (what a run wrote before the layer existed),
interleaved in one run. The layer adds the masks (as bits) to every checkpoint and a few small files per
run: a constant of milliseconds per epoch, which a real epoch (60,000 images) hides. Target: at most 1.05x
(within the noise of this shared machine).
"""
from __future__ import annotations

import argparse
import json
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from compress.config import RunConfig
from compress.init import initial_values
from compress.run.levels import run_level
from compress.run.pipeline import prepare
from compress.run.runner import write_level_files
from compress.run.rundir import CHECKPOINT_FILE, METRICS_FILE, MODEL_FILE, SUMMARY_FILE, write_json, write_tensors
from compress.training import MaskConstraint, train
from formats.atomic import write_atomic


def prepared_run(model: str, samples: int, epochs: int):
    config = RunConfig(model=model, data="synthetic", subset=samples, method="freezenet", density=0.05,
                       epochs=epochs, batch_size=128, device="cpu")
    return prepare(config, quiet=True)


def through_strategy_layer(prepared, state, work: Path) -> float:
    prepared.model.load_state_dict(state)
    work.mkdir()
    write_level_files(work, prepared.plan, prepared.rows)  # the run's setup, as before the layer: not timed
    started = time.perf_counter()
    run_level(prepared, work, work, prepared.plan, None, progress=False)
    return time.perf_counter() - started


def bare_loop(prepared, state, work: Path) -> float:
    model, config = prepared.model, prepared.config
    model.load_state_dict(state)
    work.mkdir()
    started = time.perf_counter()
    constraint = MaskConstraint(model, prepared.plan, initial_values(model, config.seed, list(prepared.plan.masks)))

    history = []

    def checkpoint(epoch, metrics, optimizer_tensors):
        history.append(metrics)
        tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
        tensors.update(optimizer_tensors)
        write_tensors(work / CHECKPOINT_FILE, tensors, {"epoch": str(epoch + 1)})
        write_atomic(work / METRICS_FILE, "".join(json.dumps(m) + "\n" for m in history).encode())

    train(model, prepared.data, config.train_settings(), constraint, seed=config.seed, device=prepared.device,
          on_epoch_end=checkpoint, progress=False)
    write_tensors(work / MODEL_FILE, model.state_dict())
    write_json(work / SUMMARY_FILE, {"test_acc": history[-1].get("test_acc")})
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer samples and rounds")
    args = parser.parse_args()
    print(f"# compress strategy-layer benchmark: python {' '.join(sys.argv)}")
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads)\n")
    samples, epochs, rounds = (4096, 2, 5) if args.quick else (4096, 3, 9)  # synthetic: 4,096 at most
    print(f"{epochs} epochs of {samples} samples (test passes and checkpoints included), median of {rounds} "
          "interleaved rounds\n")
    print(f"{'model':<10} {'bare loop s':>12} {'strategy layer s':>17} {'ratio':>7}")
    checks = []
    for model_name in ("lenet300", "lenet5"):
        prepared = prepared_run(model_name, samples, epochs)
        state = {k: v.clone() for k, v in prepared.model.state_dict().items()}
        times = {"bare": [], "layer": []}
        with tempfile.TemporaryDirectory() as scratch:
            bare_loop(prepared, state, Path(scratch) / "warm-up")  # first-touch costs go to neither side
            for index in range(rounds):
                times["bare"].append(bare_loop(prepared, state, Path(scratch) / f"bare{index}"))
                times["layer"].append(through_strategy_layer(dataclasses.replace(prepared), state,
                                                             Path(scratch) / f"layer{index}"))
        bare, layer = statistics.median(times["bare"]), statistics.median(times["layer"])
        print(f"{model_name:<10} {bare:>12.2f} {layer:>17.2f} {layer / bare:>7.3f}")
        checks.append((model_name, layer / bare))
    print("\n## Targets")
    for label, ratio in checks:
        print(f"{'PASS' if ratio <= 1.05 else 'FAIL'}  oneshot training through the strategy layer / bare loop "
              f"{label} <= 1.05x  ({ratio:.3f})")


if __name__ == "__main__":
    main()
