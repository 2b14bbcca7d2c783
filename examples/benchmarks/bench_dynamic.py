"""Dynamic sparse training cost: the per-epoch time of RigL and SET against a oneshot run at the same density.

    python examples/benchmarks/bench_dynamic.py [--quick]

Each side trains one prepared run (5% density with ERK per-layer counts, prune mode, synthetic 1x28x28
data, batch 32: 128 steps an epoch) through ``run_level``, checkpoints and all, interleaved in one run:
``oneshot`` (random ERK masks, fixed), ``set`` and ``rigl`` with ``--update-every 100`` and
``--update-until 1`` (the masks move over the whole run, an upper bound of the default 0.75). An update
ranks every masked layer on the CPU (drop by magnitude, grow at random or by the dense gradient, which
every step computes anyway: RigL only copies it at update steps). Target: at most 1.10x per epoch. The
whole runs are noisy on a shared machine, so the update is also timed alone against the 100 training
steps before it (back to back): 1 + that share is the per-epoch ratio the updates alone cause.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from compress.config import RunConfig
from compress.run.levels import run_level
from compress.run.pipeline import prepare
from compress.run.runner import write_level_files
from compress.strategies import STRATEGIES
from compress.training import MaskConstraint, make_optimizer, training_step

SIDES = {
    "oneshot": {"method": "random"},
    "set": {"method": "set", "strategy_options": {"update_every": 100, "update_until": 1.0}},
    "rigl": {"method": "rigl", "strategy_options": {"update_every": 100, "update_until": 1.0}},
}


def prepared_run(model: str, side: str, samples: int, epochs: int):
    config = RunConfig(model=model, data="synthetic", subset=samples, density=0.05, scope="erk", epochs=epochs,
                       batch_size=32, device="cpu", **SIDES[side])
    return prepare(config, quiet=True)


def timed_run(prepared, state, work: Path) -> float:
    prepared.model.load_state_dict(state)
    work.mkdir()
    write_level_files(work, prepared.plan, prepared.rows)  # the run's setup: not timed
    started = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):  # the per-epoch log lines
        run_level(prepared, work, work, prepared.plan, None, progress=False)
    return time.perf_counter() - started


def isolated_update_share(model_name: str, side: str, rounds: int) -> float:
    """One mask update's time over that of the 100 training steps before it (median over rounds, each pair
    timed back to back): the overhead of --update-every 100 without the noise of whole runs."""
    prepared = prepared_run(model_name, side, 4096, 3)
    config = prepared.config
    constraint = MaskConstraint(prepared.model, prepared.plan)
    constraint.project()
    optimizer = make_optimizer(prepared.model, config.train_settings(), constraint.names)
    updater = STRATEGIES.get(config.strategy).mask_updater(config, config.strategy_settings(), 128, 0, None)
    batches = list(prepared.data.train.batches(32))[:100]
    shares = []
    for _ in range(rounds):
        started = time.perf_counter()
        for inputs, labels in batches:
            gradients = {}
            training_step(prepared.model, optimizer, constraint, inputs, labels, config.weight_decay, gradients)
        steps = time.perf_counter() - started
        started = time.perf_counter()
        updater.update(99, constraint, optimizer, gradients)
        shares.append((time.perf_counter() - started) / steps)
    return statistics.median(shares)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    args = parser.parse_args()
    print(f"# compress dynamic-sparse-training benchmark: python {' '.join(sys.argv)}")
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads)\n")
    samples, epochs, rounds = (4096, 2, 3) if args.quick else (4096, 3, 7)
    steps = epochs * samples // 32
    print(f"{epochs} epochs of {samples} samples, batch 32 ({steps} steps, {steps // 100} mask updates), test passes "
          f"and checkpoints included, median of {rounds} interleaved rounds; seconds per epoch\n")
    print(f"{'model':<10} {'oneshot':>9} {'set':>9} {'rigl':>9} {'set/oneshot':>12} {'rigl/oneshot':>13}")
    checks = []
    for model_name in ("lenet300", "lenet5"):
        prepared = {side: prepared_run(model_name, side, samples, epochs) for side in SIDES}
        states = {side: {k: v.clone() for k, v in p.model.state_dict().items()} for side, p in prepared.items()}
        times = {side: [] for side in SIDES}
        with tempfile.TemporaryDirectory() as scratch:
            timed_run(dataclasses.replace(prepared["rigl"]), states["rigl"], Path(scratch) / "warm-up")
            for index in range(rounds):
                for side in SIDES:
                    seconds = timed_run(dataclasses.replace(prepared[side]), states[side],
                                        Path(scratch) / f"{side}{index}")
                    times[side].append(seconds / epochs)
        median = {side: statistics.median(values) for side, values in times.items()}
        ratios = {side: median[side] / median["oneshot"] for side in ("set", "rigl")}
        print(f"{model_name:<10} {median['oneshot']:>9.3f} {median['set']:>9.3f} {median['rigl']:>9.3f} "
              f"{ratios['set']:>12.3f} {ratios['rigl']:>13.3f}")
        checks += [(f"{side} {model_name}", ratio) for side, ratio in ratios.items()]
    print("\nIsolated: one update against the 100 training steps before it (median of rounds)")
    for model_name in ("lenet300", "lenet5"):
        for side in ("set", "rigl"):
            share = isolated_update_share(model_name, side, rounds)
            print(f"{model_name:<10} {side:<5} update = {share:.2%} of 100 steps")
            checks.append((f"{side} {model_name} (isolated: update / 100 steps + 1)", 1 + share))
    print("\n## Targets")
    for label, ratio in checks:
        print(f"{'PASS' if ratio <= 1.10 else 'FAIL'}  per-epoch time with --update-every 100 / oneshot, {label} "
              f"<= 1.10x  ({ratio:.3f})")


if __name__ == "__main__":
    main()
