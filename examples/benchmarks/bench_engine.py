#!/usr/bin/env python
"""Training cost of the sparse engine against the dense one (issue 19), as ratios measured in one run.

Part 1, step time: one training step (``compress.training.training_step``: forward, backward, masking, optimizer
step and, for the sparse engine, the write-back of the trained values; SGD with momentum 0.9, weight decay 5e-4,
batch 128, random inputs) of lenet300, lenet5, resnet20 and vgg16 under random per-layer masks (every layer at the
density) in prune and freeze mode, for ``--engine dense``, ``sparse`` and ``auto``, conv nets in channels_last as
``compress train`` runs them on the CPU. The three engines of one (model, mode, density) are timed round-robin
(the order rotated every repeat) so that a busy neighbour slows them alike; each repeat gives the ratio of the
engine's median step to dense's, and the table shows the median of those ratios with their interquartile range.

Part 2, memory: the optimizer-state bytes with Adam (its two moments and step counters, plus for the sparse engine
the int32 indices its checkpoint stores with them) against dense Adam's; the bytes of every tensor training keeps
between steps (parameters, gradients, optimizer state, the engine's vectors, indices and CSR structures); and the
peak resident memory a few training steps add, each engine in a process of its own (the model built and the batch
made, the kernel's peak-RSS mark is reset through ``/proc/self/clear_refs`` and read back from ``VmHWM`` after the
steps: Linux only).

Part 3 (``--crossover``, full runs only): the weight-gradient kernels of one Linear layer alone, the ``sampled``
SDDMM against the dense product, and the CSR forward against the dense one, over densities and layer sizes:
where the rule of ``compress.engine.choice`` (``SAMPLED_MAX_DENSITY``, ``CSR_MAX_DENSITY``,
``SAMPLED_MIN_WEIGHTS``) comes from.

Part 4 (``--epoch``): one epoch of the issue's run (lenet300, FreezeNet at 1%, Fashion-MNIST) through
``compress.training.train`` per engine, the engines in turn, twice.

Targets (PASS/FAIL, exit status 0 either way), at density 1%: the lenet300 step at most 0.75x dense in freeze
mode and 0.6x in prune mode, under ``sparse`` and under ``auto``; optimizer state at most 2% of dense Adam's;
under ``auto``, no model slower than dense (a ratio at most 1.05, the noise of a shared machine) at any density.

    python examples/benchmarks/bench_engine.py --quick   # lenet300 and lenet5, a few minutes on 2 cores
    python examples/benchmarks/bench_engine.py           # every model, and the crossover (about 25 min)
    python examples/benchmarks/bench_engine.py --quick --device cuda   # the GPU check (gpu_smoke.sh runs it)
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from compress.engine import SparseEngine  # noqa: E402
from compress.engine.choice import CSR_MAX_DENSITY, SAMPLED_MAX_DENSITY, SAMPLED_MIN_WEIGHTS  # noqa: E402
from compress.init import initial_values, initialise  # noqa: E402
from compress.scores import score  # noqa: E402
from compress.selection import select  # noqa: E402
from compress.training import MaskConstraint, TrainSettings, make_optimizer, train, training_step  # noqa: E402
from formats.models import build_model  # noqa: E402

SHAPES = {"lenet300": (1, 28, 28), "lenet5": (1, 28, 28), "resnet20": (3, 32, 32), "vgg16": (3, 32, 32)}
DENSITIES = (0.1, 0.01, 0.001)
MODES = ("freeze", "prune")
ENGINES = ("dense", "sparse", "auto")
BATCH = 128
TARGETS = {"freeze": 0.75, "prune": 0.6}  # lenet300 at 1% under sparse
STATE_TARGET = 0.02
AUTO_LIMIT = 1.05
DEVICE = torch.device("cpu")  # --device


@dataclass(frozen=True)
class Level:
    models: tuple[str, ...]
    repeats: int  # round-robin repeats per (model, mode, density), at most
    steps: int  # timed steps per engine per repeat (their median is the repeat's time)
    budget_s: float  # per (model, mode, density): no new repeat after this (at least 3 repeats)
    memory_models: tuple[str, ...]


LEVELS = {"quick": Level(("lenet300", "lenet5"), 40, 8, 6.0, ("lenet300", "lenet5")),
          "full": Level(tuple(SHAPES), 40, 2, 30.0, tuple(SHAPES))}


class Trainer:
    """One model on one engine, ready to step (the engine installed until ``close``)."""

    def __init__(self, model_name: str, mode: str, density: float, engine: str, optimizer: str = "sgd"):
        self.model = initialise(build_model(model_name, SHAPES[model_name], 10), 0).to(DEVICE)
        self.conv = DEVICE.type == "cpu" and any(p.dim() == 4 for p in self.model.parameters())
        plan = select(score(self.model, "random", [], seed=0, scope="layer"), density=density, mode=mode,
                      score="random", scope="layer")
        initial = initial_values(self.model, 0, list(plan.masks)) if mode == "freeze" else None
        self.constraint = MaskConstraint(self.model, plan, initial)
        self.constraint.project()
        self.settings = TrainSettings(batch_size=BATCH, lr=0.01, optimizer=optimizer, weight_decay=5e-4, engine=engine)
        self.engine = SparseEngine.build(engine, self.model, self.constraint, DEVICE)
        self.stack = ExitStack()
        if self.conv:
            self.model.to(memory_format=torch.channels_last)
        self.stack.enter_context(self.engine.installed(self.model))
        self.optimizer = make_optimizer(self.model, self.settings, self.constraint.names, self.engine)
        self.model.train()

    def step(self, inputs: torch.Tensor, labels: torch.Tensor) -> None:
        training_step(self.model, self.optimizer, self.constraint, inputs, labels, self.settings.weight_decay,
                      engine=self.engine)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    def state_bytes(self) -> int:
        """Adam's state as a checkpoint keeps it: the moments and step counters, and the engine's indices (uint16
        for weights of up to 65,536 entries, else int32)."""
        total = sum(v.numel() * v.element_size() for state in self.optimizer.state.values()
                    for v in state.values() if torch.is_tensor(v))
        return total + sum(index.numel() * index.element_size() for index in self.engine.index_tensors().values())

    def training_bytes(self) -> int:
        """Every tensor training keeps between steps: parameters, gradients, optimizer state and the engine's value
        vectors, their gradients, indices and CSR structures."""
        tensors = list(self.model.parameters()) + [p.grad for p in self.model.parameters() if p.grad is not None]
        tensors += [v for state in self.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
        for layer in self.engine.layers.values():
            tensors += [layer.values, layer.index]
            for csr in (layer._pattern, layer._csr, layer._csr_transposed):
                if csr is not None:
                    tensors += [csr.crow_indices(), csr.col_indices(), csr.values()]
            tensors += [layer.values.grad] if layer.values.grad is not None else []
            tensors += [getattr(layer, "_transpose_order", None)]
        storages = {(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for t in tensors if t is not None}
        return sum(nbytes for _, nbytes in storages)  # a storage shared by several tensors counts once

    def close(self) -> None:
        self.stack.close()


def batch(model_name: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(BATCH, *SHAPES[model_name], generator=generator)
    labels = torch.randint(0, 10, (BATCH,), generator=generator)
    if DEVICE.type == "cpu" and model_name != "lenet300":
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    return inputs.to(DEVICE), labels.to(DEVICE)


def time_engines(model_name: str, mode: str, density: float, level: Level,
                 engines: tuple[str, ...] = ENGINES) -> dict[str, tuple[float, float, float]]:
    """Median (and quartiles) over repeats of each engine's median step time relative to dense's (the first)."""
    trainers = {engine: Trainer(model_name, mode, density, engine) for engine in engines}
    inputs, labels = batch(model_name)
    for trainer in trainers.values():
        for _ in range(2):
            trainer.step(inputs, labels)
    ratios = {engine: [] for engine in engines}
    started = time.perf_counter()
    for repeat in range(level.repeats):
        order = engines[repeat % len(engines):] + engines[:repeat % len(engines)]
        medians = {}
        for engine in order:
            times = []
            for _ in range(level.steps):
                tick = time.perf_counter()
                trainers[engine].step(inputs, labels)
                times.append(time.perf_counter() - tick)
            medians[engine] = statistics.median(times)
        for engine in engines:
            ratios[engine].append(medians[engine] / medians["dense"])
        if repeat >= 2 and time.perf_counter() - started > level.budget_s:
            break
    for trainer in trainers.values():
        trainer.close()
    result = {}
    for engine, values in ratios.items():
        quartiles = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
        result[engine] = (statistics.median(values), quartiles[0], quartiles[2])
    return result


def memory_child(model_name: str, engine: str) -> dict:
    """Run in a child process: peak RSS that 3 Adam steps at 1% (freeze) add, the optimizer-state bytes and the
    training tensors' bytes."""
    trainer = Trainer(model_name, "freeze", 0.01, engine, optimizer="adam")
    inputs, labels = batch(model_name)
    if DEVICE.type == "cuda":  # the peak of CUDA allocations the steps add
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() // 1024
    else:  # Linux: reset the process's peak resident size (VmHWM) to its current size, then read it back
        Path("/proc/self/clear_refs").write_text("5")
        before = _status_kib("VmHWM")
    for _ in range(3):
        trainer.step(inputs, labels)
    if DEVICE.type == "cuda":
        after = torch.cuda.max_memory_allocated() // 1024
    else:
        after = _status_kib("VmHWM")
    return {"peak_kib": after - before, "state_bytes": trainer.state_bytes(),
            "training_bytes": trainer.training_bytes()}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_table(level: Level, engines: tuple[str, ...]) -> list[dict]:
    rows = []
    for model_name in level.memory_models:
        row = {"model": model_name}
        for engine in engines:
            output = subprocess.run([sys.executable, __file__, "--memory-child", model_name, engine, "--device",
                                     DEVICE.type],
                                    check=True, capture_output=True, text=True, timeout=600).stdout
            row[engine] = json.loads(output.strip().splitlines()[-1])
        rows.append(row)
    return rows


def crossover() -> None:
    """The kernels of one Linear layer alone: the sampled SDDMM against the dense weight-gradient product, and the
    CSR forward against the dense one, each with the transposed copies the engine makes for it (its inputs
    column-major, the output gradient row-major by output); and the SDDMM handed its operands as they come, to show
    what those copies buy."""
    from compress.engine.kernels import LayerKernels, SparseLayer, _sampled

    print("\nPart 3: one Linear layer alone, batch 128: sparse kernel time / dense product time")
    print(f"  (auto: sampled gradient at density <= {SAMPLED_MAX_DENSITY:g}, CSR forward in prune mode at <= "
          f"{CSR_MAX_DENSITY:g}, on layers of >= {SAMPLED_MIN_WEIGHTS:,} weights; the sparse times include the "
          f"engine's transposed copies but for 'as given')")
    sizes = ((100, 10), (300, 100), (784, 300), (800, 500), (2048, 1024))
    densities = (0.2, 0.1, 0.05, 0.02, 0.01, 0.001)
    print(f"  {'kernel':<24} {'layer':>12} {'weights':>9} " + " ".join(f"{d:>7.1%}" for d in densities))
    for kernel in ("sampled gradient", "sampled, as given", "csr forward"):
        for fan_in, fan_out in sizes:
            layer_module = torch.nn.Linear(fan_in, fan_out)
            inputs, grads = torch.randn(BATCH, fan_in), torch.randn(BATCH, fan_out)
            cells = []
            for density in densities:
                mask = torch.rand(fan_out, fan_in, generator=torch.Generator().manual_seed(1)) < density
                layer = SparseLayer("w", layer_module, mask, LayerKernels("sampled", "csr"))
                if kernel == "sampled gradient":
                    dense_time = _best(lambda: grads.t() @ inputs)
                    sparse_time = _best(lambda: _sampled(layer, grads.t().contiguous(), inputs.t().contiguous().t()))
                elif kernel == "sampled, as given":
                    dense_time = _best(lambda: grads.t() @ inputs)
                    sparse_time = _best(lambda: torch.sparse.sampled_addmm(layer._pattern, grads.t(), inputs,
                                                                           beta=0.0))
                else:
                    weight = layer_module.weight.detach()
                    dense_time = _best(lambda: torch.nn.functional.linear(inputs, weight))
                    sparse_time = _best(lambda: torch.sparse.mm(layer.csr_weight(), inputs.t().contiguous()).t())
                cells.append(f"{sparse_time / dense_time:>6.2f}x")
            print(f"  {kernel:<24} {fan_in:>5}x{fan_out:<6} {fan_in * fan_out:>9,} " + " ".join(cells))


def epoch_times(rounds: int = 2) -> None:
    """The issue's runs: one epoch of ``compress.training.train`` on Fashion-MNIST (lenet300, FreezeNet at 1%) per
    engine, the engines in turn, ``rounds`` times; the steps' median, the epoch as the run logs it, and the bytes
    of optimizer state its checkpoint would hold."""
    from compress.config import build_config
    from compress.run.pipeline import prepare

    print("\nPart 4: one epoch of lenet300, FreezeNet at 1%, Fashion-MNIST (train(), as compress train runs it)")
    for round_number in range(rounds):
        cells = []
        for engine in ENGINES:
            config = build_config(None, {"model": "lenet300", "data": "fashion-mnist", "method": "freezenet",
                                         "density": 0.01, "epochs": 1, "engine": engine, "device": "cpu"})
            prepared = prepare(config, quiet=True)
            model, plan = prepared.model, prepared.plan
            constraint = MaskConstraint(model, plan, initial_values(model, prepared.config.seed, list(plan.masks)))
            stamps, state_bytes = [], []
            history = train(model, prepared.data, prepared.config.train_settings(), constraint,
                            seed=prepared.config.seed, device=torch.device("cpu"), progress=False,
                            on_step_end=lambda step: stamps.append(time.perf_counter()),
                            on_epoch_end=lambda epoch, metrics, tensors: state_bytes.append(
                                sum(t.numel() * t.element_size() for t in tensors.values())))
            step = statistics.median(b - a for a, b in zip(stamps, stamps[1:]))
            cells.append(f"{engine} {history[-1]['seconds']:.2f} s (step {step * 1e3:.2f} ms, test acc "
                         f"{history[-1]['test_acc']:.2%}, optimizer state {state_bytes[-1]:,} B)")
        print(f"  round {round_number + 1}: " + "; ".join(cells), flush=True)


def _best(function, repeats: int = 30) -> float:
    function()
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        function()
        times.append(time.perf_counter() - tick)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="lenet300 and lenet5 only, fewer repeats")
    parser.add_argument("--crossover", action="store_true", help="also time the Linear gradient kernels alone")
    parser.add_argument("--epoch", action="store_true",
                        help="also time one epoch of the issue's Fashion-MNIST run per engine (needs the data set)")
    parser.add_argument("--models", help=f"comma-separated models to time (default: the level's; known: "
                        f"{', '.join(SHAPES)})")
    parser.add_argument("--engines", default="sparse,auto",
                        help="the engines timed against dense [default: sparse,auto]")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own, one per core)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where to train (cuda: the GPU check; auto keeps the dense kernels there)")
    parser.add_argument("--memory-child", nargs=2, metavar=("MODEL", "ENGINE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    global DEVICE
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU")
    DEVICE = torch.device(args.device)
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(*args.memory_child)))
        return
    level = LEVELS["quick" if args.quick else "full"]
    if args.models:
        models = tuple(name.strip() for name in args.models.split(",") if name.strip())
        unknown = [name for name in models if name not in SHAPES]
        if unknown or not models:
            parser.error(f"--models takes some of {', '.join(SHAPES)}; got {args.models!r}")
        level = Level(models, level.repeats, level.steps, level.budget_s, models)
    where = torch.cuda.get_device_name() if DEVICE.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"torch {torch.__version__}, {where}, batch {BATCH}, SGD momentum 0.9")
    print("\nPart 1: step time relative to --engine dense (median over round-robin repeats [interquartile range])")
    compared = tuple(name.strip() for name in args.engines.split(",") if name.strip())
    if not compared or any(name not in ENGINES[1:] for name in compared):
        parser.error(f"--engines takes sparse and/or auto; got {args.engines!r}")
    engines = ("dense", *compared)
    header = f"  {'model':<9} {'mode':<7} {'density':>7}  " + "  ".join(f"{e:>22}" for e in compared)
    print(header)
    results = {}
    for model_name in level.models:
        for mode in MODES:
            for density in DENSITIES:
                ratios = time_engines(model_name, mode, density, level, engines)
                results[(model_name, mode, density)] = ratios
                cells = [f"{r[0]:>6.3f}x [{r[1]:.3f}-{r[2]:.3f}]" for r in (ratios[e] for e in compared)]
                print(f"  {model_name:<9} {mode:<7} {density:>7.1%}  " + "  ".join(f"{c:>22}" for c in cells),
                      flush=True)
    print("\nPart 2: memory with Adam at density 1% (freeze mode), each engine in its own process")
    print("  state: Adam's moments and steps (+ the engine's int32 indices), as a share of dense Adam's; tensors:")
    print("  parameters, gradients, optimizer state and engine structures kept between steps; peak: the memory 3")
    print("  steps add at their peak (CPU: VmHWM after a reset; CUDA: the peak of allocations)")
    print(f"  {'model':<9} {'engine':<7} {'state bytes':>12} {'share':>7} {'tensor bytes':>13} {'share':>7} "
          f"{'peak':>11}")
    memory = memory_table(level, engines)
    for row in memory:
        dense = row["dense"]
        for engine in engines:
            values = row[engine]
            values["state_share"] = values["state_bytes"] / dense["state_bytes"]
            print(f"  {row['model']:<9} {engine:<7} {values['state_bytes']:>12,} {values['state_share']:>6.2%} "
                  f"{values['training_bytes']:>13,} {values['training_bytes'] / dense['training_bytes']:>6.1%} "
                  f"{values['peak_kib'] / 1024:>7.1f} MiB")
    if (args.crossover or not args.quick) and DEVICE.type == "cpu":
        crossover()
    if args.epoch:
        epoch_times()
    print()
    for engine in compared:
        for mode, target in TARGETS.items():
            if ("lenet300", mode, 0.01) not in results:
                continue
            ratio = results[("lenet300", mode, 0.01)][engine][0]
            verdict = "PASS" if ratio <= target else "FAIL"
            print(f"{verdict}: lenet300 {mode} step at 1% under --engine {engine}: {ratio:.3f}x dense "
                  f"(target <= {target}x)")
    worst_state = max(memory, key=lambda row: row[compared[0]]["state_share"])
    share = worst_state[compared[0]]["state_share"]
    verdict = "PASS" if share <= STATE_TARGET else "FAIL"
    print(f"{verdict}: optimizer state at 1% at most {share:.2%} of dense Adam's ({worst_state['model']}, indices "
          f"included; target <= {STATE_TARGET:.0%})")
    if "auto" in compared:
        worst = max(results.items(), key=lambda item: item[1]["auto"][0])
        (model_name, mode, density), ratios = worst
        median, low, high = ratios["auto"]
        verdict = "PASS" if median <= AUTO_LIMIT else "FAIL"
        noise = f"; its interquartile range {low:.3f}-{high:.3f} contains 1: within noise" if low <= 1 <= high else ""
        print(f"{verdict}: --engine auto never slower than dense: worst {median:.3f}x ({model_name} {mode} "
              f"{density:.1%}; limit {AUTO_LIMIT}x{noise})")


if __name__ == "__main__":
    main()
