#!/usr/bin/env python
"""Training-step cost of masked training, and the cost of every registered score, on CPU.

Part 1 times one training step (forward + backward + optimizer step; SGD, momentum 0.9, weight decay
5e-4, batch 128, random inputs) of ``lenet5`` and ``resnet20`` in four variants:

* ``dense``       plain step, every weight trained (``training_step`` with an empty constraint);
* ``prune``       ``compress.training.MaskConstraint`` in prune mode at density 0.05, stepped by
                  ``compress.training.training_step``, the step of ``compress.training.train``
                  (forward, zero_grad, backward, ``mask_gradients(wd)``, ``optimizer.step()``; train
                  projects once before training and after every epoch, not per step), with
                  ``make_optimizer`` (masked parameters get their decay from the constraint);
* ``freeze``      the same in freeze mode (untrained entries held at their seeded initial value);
* ``torch-prune`` ``torch.nn.utils.prune.custom_from_mask`` with the same masks on every masked
                  module (``weight_orig`` + forward pre-hook), weight decay in the optimizer (stepped
                  by ``training_step`` with an empty constraint).

The variants are interleaved round-robin (the order rotated every repeat) so that the noise of a
shared machine hits all of them alike; each repeat gives one ratio per variant (median step time of
the variant in that repeat / median of dense in that repeat) and the table reports the median of
those ratios with their interquartile range (and the fastest step, the least noise-affected
estimate). A per-phase breakdown (forward, backward, mask_gradients, step) follows, and then
the cost each variant adds to a dense step timed in isolation (only the work that differs from dense,
repeated many times): on a shared machine a whole step varies by several percent, more than the
masking costs, so only the isolated numbers can rank variants that differ by a fraction of a percent.
The CPU time used by other processes during each part is printed, because with torch's default of one
thread per core a busy neighbour inflates every step (each parallel region waits for a descheduled
thread) and makes the ratios unreliable.

Part 2 times each registered score (``compress.scores.SCORES``) on the same models with one batch of
100 samples (SynFlow iterative at density 0.05, as the pipeline calls it: 100 rounds), relative to
one dense training step.

Targets (printed as PASS/FAIL; the exit status is 0 either way): prune and freeze cost at most
1.05x a dense step, and are faster than torch.nn.utils.prune. They are checked twice: on the
end-to-end step ratios (with a bootstrap 95% interval of the median; "within noise" when the interval
contains the target, i.e. the run cannot decide) and on the isolated added cost (at most 5% of a
dense step, and less than torch.nn.utils.prune adds).

    python examples/benchmarks/bench_train_step.py            # full run, a few minutes
    python examples/benchmarks/bench_train_step.py --quick    # under 2 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.utils import prune as torch_prune  # noqa: E402

from compress.init import initial_values, initialise  # noqa: E402
from formats.models import build_model  # noqa: E402
from compress.scores import SCORES, score  # noqa: E402
from compress.selection import Plan, select  # noqa: E402
from compress.training import MaskConstraint, TrainSettings, make_optimizer, training_step  # noqa: E402

MODELS = {"lenet5": (1, 28, 28), "resnet20": (3, 32, 32)}
NUM_CLASSES = 10
BATCH = 128
SCORE_BATCH = 100
DENSITY = 0.05
MAX_RATIO = 1.05
VARIANTS = ("dense", "prune", "freeze", "torch-prune")

MIN_REPEATS = 5  # interleaved repeats of the step timing, whatever the budget
MIN_ISOLATED_REPS = 20


@dataclass(frozen=True)
class Level:
    """How much to time. Every loop also stops once its time budget is spent (after a minimum), so a
    busy machine makes the run less precise rather than much longer; on an idle 2-core machine the
    quick level takes about a minute and the full one about four."""

    # per model: (max repeats, steps per variant per repeat, warm-up steps per variant, budget in s);
    # one repeat = one round over the four variants, the order rotated every repeat
    schedule: dict[str, tuple[int, int, int, float]]
    breakdown_steps: int  # instrumented steps per variant for the per-phase table
    breakdown_budget_s: float  # (at least 2 rounds)
    isolated_reps: int  # repeats of the isolated added-cost timing (each well under 2 ms when idle)
    isolated_budget_s: float  # (at least MIN_ISOLATED_REPS)
    score_repeats: int  # timed runs per score (median)
    score_budget_s: float  # no further timed run of a score once its runs took this long
    scores_deadline_s: float  # no further score is started once the whole run has taken this long


LEVELS = {
    "quick": Level(
        schedule={"lenet5": (40, 1, 3, 10.0), "resnet20": (12, 1, 2, 25.0)},
        breakdown_steps=3,
        breakdown_budget_s=8.0,
        isolated_reps=100,
        isolated_budget_s=5.0,
        score_repeats=1,
        score_budget_s=10.0,
        scores_deadline_s=80.0,
    ),
    "full": Level(
        schedule={"lenet5": (100, 2, 5, 45.0), "resnet20": (80, 1, 3, 120.0)},
        breakdown_steps=10,
        breakdown_budget_s=20.0,
        isolated_reps=200,
        isolated_budget_s=15.0,
        score_repeats=3,
        score_budget_s=20.0,
        scores_deadline_s=420.0,
    ),
}


# ----------------------------------------------------------------------------------------- helpers


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


class OtherLoad:
    """Share of the machine's CPU time used by *other* processes between construction and ``share()``.

    From /proc/stat (all CPUs) minus this process's own CPU time; None where /proc is unavailable.
    """

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample():
        try:
            with open("/proc/stat") as handle:
                fields = [int(x) for x in handle.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        own = os.times()
        return sum(fields), sum(fields) - idle, own.user + own.system

    def share(self) -> float | None:
        end = self._sample()
        if self.start is None or end is None:
            return None
        ticks = os.sysconf("SC_CLK_TCK")
        total = end[0] - self.start[0]
        busy = end[1] - self.start[1]
        own = (end[2] - self.start[2]) * ticks
        return max(0.0, (busy - own) / total) if total > 0 else None

    def describe(self) -> str:
        share = self.share()
        if share is None:
            return "CPU use by other processes: unknown"
        flag = "  << machine shared: timings inflated and noisy" if share > 0.10 else ""
        return f"CPU use by other processes during this part: {100 * share:.0f}% of all CPUs{flag}"


def bootstrap_ci(values: list[float], level: float = 0.95, rounds: int = 2000) -> tuple[float, float]:
    """Percentile-bootstrap interval of the median of ``values`` (fixed seed: reproducible output)."""
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(rounds))
    tail = (1 - level) / 2
    return quantile(medians, tail), quantile(medians, 1 - tail)


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class no_gc:
    """Collect, then keep the cyclic GC off while timing (as timeit does)."""

    def __enter__(self):
        gc.collect()
        self.enabled = gc.isenabled()
        gc.disable()

    def __exit__(self, *exc):
        if self.enabled:
            gc.enable()
        return False


def fresh_model(name: str, seed: int) -> nn.Module:
    model = initialise(build_model(name, MODELS[name], NUM_CLASSES), seed)
    model.train()
    return model


# ---------------------------------------------------------------------------------------- variants


@dataclass
class Variant:
    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    constraint: MaskConstraint  # MaskConstraint(model, None) for dense and torch-prune: a no-op
    weight_decay: float
    last_loss: float = float("nan")

    def step(self, inputs: torch.Tensor, labels: torch.Tensor, clock: dict[str, float] | None = None) -> None:
        """One training step, ``compress.training.training_step`` itself (what ``train`` runs per batch).

        With ``clock``, the same operations are spelled out and the time of each phase is added to it
        (in seconds), for the per-phase breakdown.
        """
        if clock is None:
            loss = training_step(self.model, self.optimizer, self.constraint, inputs, labels, self.weight_decay)
            self.last_loss = float(loss.detach())
            return
        tick = time.perf_counter
        t0 = tick()
        loss = F.cross_entropy(self.model(inputs), labels)
        t1 = tick()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t2 = tick()
        self.constraint.mask_gradients(self.weight_decay)
        t3 = tick()
        self.optimizer.step()
        t4 = tick()
        for key, value in (
            ("forward", t1 - t0),
            ("backward", t2 - t1),
            ("mask_gradients", t3 - t2),
            ("optimizer.step", t4 - t3),
            ("total", t4 - t0),
        ):
            clock[key] = clock.get(key, 0.0) + value
        self.last_loss = float(loss.detach())


def make_plan(model: nn.Module, mode: str, seed: int) -> Plan:
    scores = score(model, "random", [], seed=seed)
    return select(scores, density=DENSITY, mode=mode, score="random")


def build_variants(name: str, seed: int) -> list[Variant]:
    settings = TrainSettings(batch_size=BATCH, lr=0.01, optimizer="sgd", momentum=0.9, weight_decay=5e-4)
    wd = settings.weight_decay
    variants = []

    model = fresh_model(name, seed)
    variants.append(Variant("dense", model, make_optimizer(model, settings, []), MaskConstraint(model, None), wd))

    for mode in ("prune", "freeze"):
        model = fresh_model(name, seed)
        plan = make_plan(model, mode, seed)
        initial = initial_values(model, seed, list(plan.masks)) if mode == "freeze" else None
        constraint = MaskConstraint(model, plan, initial)
        optimizer = make_optimizer(model, settings, constraint.names)
        constraint.project()  # as train() does once before the first step
        variants.append(Variant(mode, model, optimizer, constraint, wd))

    model = fresh_model(name, seed)
    plan = make_plan(model, "prune", seed)
    for param_name, mask in plan.masks.items():
        module_name, attr = param_name.rsplit(".", 1)
        module = model.get_submodule(module_name)
        torch_prune.custom_from_mask(module, attr, mask.to(getattr(module, attr).dtype))
    optimizer = torch.optim.SGD(
        model.parameters(), lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
    )
    variants.append(Variant("torch-prune", model, optimizer, MaskConstraint(model, None), wd))
    return variants


# ------------------------------------------------------------------------------------- part 1: step


def _pruned_modules(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [
        (module, hook._tensor_name)
        for module in model.modules()
        for hook in module._forward_pre_hooks.values()
        if isinstance(hook, torch_prune.BasePruningMethod)
    ]


def isolated_overhead(
    variants: list[Variant], inputs, labels, reps: int, budget_s: float
) -> tuple[dict[str, float], int]:
    """Median ms per step that each variant adds to a dense step, timed in isolation (many repeats).

    A whole step varies by several percent on a shared machine, far more than the masking costs, so
    the end-to-end ratios cannot rank variants whose costs differ by a fraction of a percent. Here
    only the parts that differ from dense are timed, from one set of gradients:

    * dense: ``optimizer.step()`` (the reference);
    * prune / freeze: ``mask_gradients(wd)`` + ``optimizer.step()`` (train projects once per epoch);
    * torch-prune: ``optimizer.step()`` + the pruning pre-hooks (``weight = weight_orig * mask``)
      + the backward of that product (as its own ``autograd.backward`` call, which adds the launch of
      one small graph, a few tens of microseconds, that a real step shares with the model's backward).
    """
    by_name = {v.name: v for v in variants}
    for variant in variants:
        variant.optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(variant.model(inputs), labels).backward()

    pruned = _pruned_modules(by_name["torch-prune"].model)
    originals = [getattr(module, f"{attr}_orig") for module, attr in pruned]
    upstream = [torch.randn_like(p) * 1e-3 for p in originals]

    def hooks_and_backward():
        grads = [p.grad for p in originals]
        for p in originals:
            p.grad = None
        for module, _ in pruned:
            for hook in list(module._forward_pre_hooks.values()):
                hook(module, (inputs,))
        torch.autograd.backward([getattr(module, attr) for module, attr in pruned], upstream)
        for p, g in zip(originals, grads):  # keep the step's gradients for the next optimizer.step
            p.grad = g

    def tail(variant: Variant) -> Callable[[], None]:
        def run():
            variant.constraint.mask_gradients(variant.weight_decay)  # a no-op for dense and torch-prune
            variant.optimizer.step()

        return run

    parts = {v.name: [tail(v)] for v in variants}
    parts["torch-prune"].append(hooks_and_backward)
    samples: dict[str, list[float]] = {v.name: [] for v in variants}
    deadline = time.perf_counter() + budget_s
    with no_gc():
        for index in range(reps + 2):  # the first two rounds warm up
            if index >= MIN_ISOLATED_REPS + 2 and time.perf_counter() > deadline:
                break
            for variant in variants:
                started = time.perf_counter()
                for part in parts[variant.name]:
                    part()
                samples[variant.name].append(time.perf_counter() - started)
    dense = statistics.median(samples["dense"][2:])
    added = {name: statistics.median(values[2:]) - dense for name, values in samples.items()}
    return added, len(samples["dense"]) - 2



def bench_steps(name: str, seed: int, level: Level) -> dict:
    max_repeats, per_block, warmup, budget = level.schedule[name]
    breakdown_steps = level.breakdown_steps
    shape = MODELS[name]
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn((BATCH, *shape), generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (BATCH,), generator=generator)
    variants = build_variants(name, seed)
    load = OtherLoad()

    for variant in variants:
        for _ in range(warmup):
            variant.step(inputs, labels)

    times: dict[str, list[float]] = {v.name: [] for v in variants}
    per_repeat: dict[str, list[float]] = {v.name: [] for v in variants}  # median per repeat
    deadline = time.perf_counter() + budget
    repeats = 0
    for repeat in range(max_repeats):
        if repeat >= MIN_REPEATS and time.perf_counter() > deadline:
            break
        repeats += 1
        shift = repeat % len(variants)
        order = variants[shift:] + variants[:shift]
        for variant in order:
            block = []
            with no_gc():
                for _ in range(per_block):
                    started = time.perf_counter()
                    variant.step(inputs, labels)
                    block.append(time.perf_counter() - started)
            times[variant.name].extend(block)
            per_repeat[variant.name].append(statistics.median(block))

    ratios = {
        v: [t / d for t, d in zip(per_repeat[v], per_repeat["dense"])] for v in per_repeat
    }
    vs_torch = {
        v: [t / d for t, d in zip(per_repeat[v], per_repeat["torch-prune"])] for v in per_repeat
    }

    breakdown: dict[str, dict[str, float]] = {}
    if breakdown_steps:
        clocks = {v.name: {} for v in variants}
        deadline = time.perf_counter() + level.breakdown_budget_s
        done = 0
        for index in range(breakdown_steps):
            if index >= 2 and time.perf_counter() > deadline:
                break
            for variant in variants[index % len(variants):] + variants[: index % len(variants)]:
                with no_gc():
                    variant.step(inputs, labels, clocks[variant.name])
            done += 1
        breakdown = {k: {p: s / done for p, s in c.items()} for k, c in clocks.items()}
        breakdown_steps = done
    overhead, isolated_reps = isolated_overhead(
        variants, inputs, labels, level.isolated_reps, level.isolated_budget_s
    )

    nonfinite = [v.name for v in variants if not torch.isfinite(torch.tensor(v.last_loss))]
    return {
        "times": times,
        "ratios": ratios,
        "vs_torch": vs_torch,
        "breakdown": breakdown,
        "overhead": overhead,
        "isolated_reps": isolated_reps,
        "nonfinite": nonfinite,
        "repeats": repeats,
        "per_block": per_block,
        "warmup": warmup,
        "breakdown_steps": breakdown_steps,
        "load": load.describe(),
    }


def report_steps(name: str, result: dict) -> tuple[list[tuple[str, bool]], list[tuple[str, bool]]]:
    times, ratios, vs_torch = result["times"], result["ratios"], result["vs_torch"]
    steps = len(times["dense"])
    print(
        f"\n[{name}] train step, batch {BATCH}, input {'x'.join(map(str, MODELS[name]))}, "
        f"{result['repeats']} interleaved repeats x {result['per_block']} steps per variant "
        f"({steps} timed steps each, after {result['warmup']} warm-up)"
    )
    print(
        f"  {'variant':<12} {'ms/step':>9} {'ratio to dense':>15} {'IQR of ratio':>14}"
        f" {'min ms':>9} {'ratio of mins':>14}"
    )
    fastest_dense = min(times["dense"])
    for variant in VARIANTS:
        ms = statistics.median(times[variant]) * 1e3
        ratio = statistics.median(ratios[variant])
        iqr = f"{quantile(ratios[variant], 0.25):.3f}-{quantile(ratios[variant], 0.75):.3f}"
        fastest = min(times[variant])
        print(
            f"  {variant:<12} {ms:>9.2f} {ratio:>14.3f}x {iqr:>14} {fastest * 1e3:>9.2f}"
            f" {fastest / fastest_dense:>13.3f}x"
        )
    print(
        "  (ms/step: median of all timed steps; ratio: median over repeats of variant/dense within the "
        "repeat; min: fastest step, the least noise-affected estimate)"
    )
    print(f"  {result['load']}")
    if result["nonfinite"]:
        print(f"  warning: non-finite loss at the end for {', '.join(result['nonfinite'])}")

    def check(label: str, values: list[float], limit: float, strict: bool) -> tuple[str, bool]:
        value = statistics.median(values)
        low, high = bootstrap_ci(values)
        ok = value < limit if strict else value <= limit
        noise = "; within noise" if low <= limit <= high else ""
        return f"{label} (measured {value:.3f}x, 95% CI {low:.3f}-{high:.3f}{noise})", ok

    checks = []
    for variant in ("prune", "freeze"):
        checks.append(check(f"{name}: {variant} <= {MAX_RATIO:.2f}x dense", ratios[variant], MAX_RATIO, False))
        checks.append(
            check(f"{name}: {variant} faster than torch.nn.utils.prune", vs_torch[variant], 1.0, True)
        )
    for label, ok in checks:
        print(f"  {'PASS' if ok else 'FAIL'}  {label}")
    print(
        "  (\"within noise\": the bootstrap interval of the median ratio contains the target, so this run "
        "cannot decide the check; see the isolated costs below)"
    )

    breakdown = result["breakdown"]
    if breakdown:
        print(f"  per-phase mean ms over {result['breakdown_steps']} instrumented steps per variant:")
        phases = ("forward", "backward", "mask_gradients", "optimizer.step", "total")
        print("  " + f"{'variant':<12}" + "".join(f"{p:>16}" for p in phases))
        for variant in VARIANTS:
            row = breakdown[variant]
            print("  " + f"{variant:<12}" + "".join(f"{row.get(p, 0.0) * 1e3:>16.3f}" for p in phases))
        for variant in ("prune", "freeze"):
            row = breakdown[variant]
            extra = row["mask_gradients"]
            print(
                f"  {variant}: mask_gradients = {extra * 1e3:.3f} ms "
                f"= {100 * extra / breakdown['dense']['total']:.2f}% of a dense step"
            )

    overhead = result["overhead"]
    dense_ms = statistics.median(times["dense"]) * 1e3
    print(
        f"  isolated cost added to a dense step (median of {result['isolated_reps']} repeats of only the differing "
        "work; see isolated_overhead):"
    )
    for variant in ("prune", "freeze", "torch-prune"):
        ms = overhead[variant] * 1e3
        print(f"    {variant:<12} {ms:>+8.3f} ms  = {100 * ms / dense_ms:>+6.2f}% of a dense step")
    isolated_checks = []
    for variant in ("prune", "freeze"):
        share = overhead[variant] * 1e3 / dense_ms
        isolated_checks.append(
            (
                f"{name} (isolated): {variant} adds <= {100 * (MAX_RATIO - 1):.0f}% to a dense step "
                f"({100 * share:+.2f}%)",
                share <= MAX_RATIO - 1,
            )
        )
        isolated_checks.append(
            (
                f"{name} (isolated): {variant} adds less than torch.nn.utils.prune "
                f"({overhead[variant] * 1e3:+.3f} vs {overhead['torch-prune'] * 1e3:+.3f} ms)",
                overhead[variant] < overhead["torch-prune"],
            )
        )
    for label, ok in isolated_checks:
        print(f"    {'PASS' if ok else 'FAIL'}  {label}")
    return checks, isolated_checks


# ----------------------------------------------------------------------------------- part 2: scores


def bench_scores(name: str, seed: int, level: Level, dense_step_s: float, run_started: float) -> None:
    repeats = level.score_repeats
    shape = MODELS[name]
    generator = torch.Generator().manual_seed(seed + 1)
    batches = [
        (torch.randn((SCORE_BATCH, *shape), generator=generator),
         torch.randint(0, NUM_CLASSES, (SCORE_BATCH,), generator=generator))
    ]
    model = fresh_model(name, seed)
    print(
        f"\n[{name}] scores, one batch of {SCORE_BATCH}, density {DENSITY} "
        f"(synflow: iterative, {_synflow_rounds()} rounds), median of {repeats} timed run(s) after one warm-up "
        "(none for synflow: its first round warms it up); "
        f"one dense step = {dense_step_s * 1e3:.2f} ms"
    )
    print(f"  {'score':<10} {'ms':>10} {'ratio to one step':>18}")
    load = OtherLoad()
    for score_name in SCORES.names():
        elapsed = time.perf_counter() - run_started
        if elapsed > level.scores_deadline_s:
            print(f"  {score_name:<10} skipped: the run has taken {elapsed:.0f} s (> {level.scores_deadline_s:.0f} s)")
            continue
        if score_name != "synflow":
            score(model, score_name, batches, density=DENSITY, seed=seed)  # warm-up
        runs = []
        for _ in range(repeats):
            if sum(runs) > level.score_budget_s:
                break
            with no_gc():
                started = time.perf_counter()
                score(model, score_name, batches, density=DENSITY, seed=seed)
                runs.append(time.perf_counter() - started)
        ms = statistics.median(runs) * 1e3
        print(f"  {score_name:<10} {ms:>10.1f} {ms / (dense_step_s * 1e3):>17.2f}x")
    print(f"  {load.describe()}")


def _synflow_rounds() -> str:
    try:
        from compress.scores import synflow

        return str(synflow.ROUNDS)
    except (ImportError, AttributeError):
        return "?"


# -------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (under 2 minutes on 2 cores)")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-scores", action="store_true", help="skip part 2 (score timings)")
    args = parser.parse_args(argv)
    level_name = "quick" if args.quick else "full"
    level = LEVELS[level_name]

    started = time.perf_counter()
    whole_run = OtherLoad()
    command = shlex.join(["python", os.path.relpath(Path(__file__).resolve(), Path.cwd()), *sys.argv[1:]])
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    print(f"reproduce: {command}   (from {Path.cwd()})")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads (default), "
        f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs, {affinity} usable), python {platform.python_version()}"
    )
    print(f"load average (1, 5, 15 min) at start: {load_average()}")
    print(
        f"mode: {level_name}; SGD momentum 0.9, weight decay 5e-4, batch {BATCH}, density {DENSITY}, "
        f"random scores, seed {args.seed}; targets: prune/freeze <= {MAX_RATIO:.2f}x dense and "
        "faster than torch.nn.utils.prune"
    )

    checks: list[tuple[str, bool]] = []
    isolated_checks: list[tuple[str, bool]] = []
    dense_step: dict[str, float] = {}
    for name in args.models:
        result = bench_steps(name, args.seed, level)
        end_to_end, isolated = report_steps(name, result)
        checks += end_to_end
        isolated_checks += isolated
        dense_step[name] = statistics.median(result["times"]["dense"])
        del result

    if not args.no_scores:
        for name in args.models:
            bench_scores(name, args.seed, level, dense_step[name], started)

    print()
    for title, group in (("end-to-end step ratios", checks), ("isolated added cost", isolated_checks)):
        failed = [label for label, ok in group if not ok]
        print(f"summary, {title}: {len(group) - len(failed)}/{len(group)} checks PASS", end="")
        print("" if not failed else "; FAIL: " + "; ".join(failed))
    share = whole_run.share()
    print(f"load average at end: {load_average()}; {whole_run.describe().replace('this part', 'the whole run')}")
    if share is not None and share > 0.10:
        print(
            "note: the CPUs were shared with other work during this run; with torch's default of one "
            "thread per core, every parallel region then waits for a descheduled thread, so step times "
            "and ratios are inflated and noisy: rerun on an idle machine before trusting a FAIL"
        )
    print(f"total time {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
