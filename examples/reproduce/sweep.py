"""Reproduce the papers' comparisons on real Fashion-MNIST: train, pack and tabulate every run.

    python examples/reproduce/sweep.py --quick            # a small slice, under 10 minutes on 2 cores
    python examples/reproduce/sweep.py                    # the full sweep (hours; resumable)
    python examples/reproduce/sweep.py --part lenet       # only the LeNet part (or --part resnet)
    python examples/reproduce/sweep.py --part lenet --models lenet300   # one model of a part

Part "lenet": LeNet-300-100 and LeNet-5-Caffe, dense and at densities 10%, 5%, 2%, 1%, 0.64% (157x),
0.3%, 0.1% with SNIP (prune), FreezeNet (SNIP score, freeze), random (freeze), GraSP, SynFlow and COPS
(snip+grasp, gamma 0.5), 3 seeds each, on the full 60k training set.
Part "resnet": resnet20 on a training subset of Fashion-MNIST, standard against interspace pruning
for SNIP, SynFlow and FreezeNet at densities 10%, 5%, 2%, 3 seeds.

Every method uses the same hyperparameters (the model's defaults of `compress train`: SGD, momentum
0.9, cosine schedule, batch 128, weight decay 5e-4 (1e-4 for resnet20), lr 0.05 for LeNets and 0.1
for resnet20) and the same epochs. Every run is packed (fp16 values). Finished runs and artifacts are
skipped, so an interrupted sweep continues where it stopped. Results: `results.csv` (one row per run),
`results.md` (mean and standard deviation over seeds) and PNG plots in the output directory.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import formats
from compress.config import build_config
from compress.packing import pack_run
from compress.run import train_run

LENET_DENSITIES = [0.1, 0.05, 0.02, 0.01, 0.0064, 0.003, 0.001]
RESNET_DENSITIES = [0.1, 0.05, 0.02]
LENET_METHODS = {
    "snip": {"method": "snip"},
    "freezenet": {"method": "freezenet"},
    "random-freeze": {"method": "random", "mode": "freeze"},
    "grasp": {"method": "grasp"},
    "synflow": {"method": "synflow"},
    "cops": {"method": "cops", "scores": "snip,grasp", "gamma": 0.5},
}
RESNET_METHODS = {"snip": {"method": "snip"}, "synflow": {"method": "synflow"}, "freezenet": {"method": "freezenet"}}


@dataclass
class Run:
    """One training run of the sweep: where it goes and its options for `compress train`."""

    part: str
    model: str
    method: str  # label in the tables
    density: float  # 1.0 for dense
    seed: int
    options: dict = field(default_factory=dict)

    @property
    def path(self) -> str:
        return f"{self.part}/{self.model}/{self.method}/d{self.density:g}/s{self.seed}"


def plan_runs(quick: bool, parts: list[str], seeds: int, lenet_epochs: int, resnet_epochs: int,
              resnet_subset: int) -> list[Run]:
    runs = []
    lenet_common = {"data": "fashion-mnist", "epochs": lenet_epochs}
    resnet_common = {"data": "fashion-mnist", "epochs": resnet_epochs, "subset": resnet_subset}
    if quick:
        lenet_common["subset"] = 10_000
    if "lenet" in parts:
        densities = [0.05, 0.0064] if quick else LENET_DENSITIES
        for model in ("lenet300", "lenet5"):
            for seed in range(seeds):
                runs.append(Run("lenet", model, "dense", 1.0, seed, {**lenet_common, "method": "dense"}))
                for label, options in LENET_METHODS.items():
                    for density in densities:
                        runs.append(Run("lenet", model, label, density, seed,
                                        {**lenet_common, **options, "density": density}))
    if "resnet" in parts:
        densities = [0.05] if quick else RESNET_DENSITIES
        for seed in range(seeds):
            for label, options in RESNET_METHODS.items():
                for interspace in (False, True):
                    for density in densities:
                        name = f"{label}{'+ip' if interspace else ''}"
                        runs.append(Run("resnet", "resnet20", name, density, seed,
                                        {**resnet_common, **options, "density": density, "interspace": interspace}))
    return runs


def execute(run: Run, root: Path) -> dict:
    """Train (skipped when finished) and pack (skipped when packed); return the results row."""
    out = root / run.path
    overrides = {"model": run.model, "seed": run.seed, **run.options}
    summary = train_run(build_config(None, overrides), out, progress=False)
    artifact = out.with_suffix(".cpk")
    if not artifact.is_file():
        pack_run(out, artifact)
    totals = formats.read_info(artifact)["totals"]
    return {
        "part": run.part, "model": run.model, "method": run.method, "density": run.density, "seed": run.seed,
        "test_acc": summary["test_acc"], "trained_params": summary["trained_params"],
        "total_params": summary["total_params"], "artifact_bytes": totals["file_bytes"],
        "dense_fp32_bytes": totals["dense_fp32_bytes"], "train_seconds": summary["train_seconds"],
    }


def aggregate(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["part"], row["model"], row["method"], row["density"]), []).append(row)
    table = []
    for (part, model, method, density), members in groups.items():
        accuracies = [m["test_acc"] for m in members]
        table.append({
            "part": part, "model": model, "method": method, "density": density, "seeds": len(members),
            "acc_mean": statistics.mean(accuracies),
            "acc_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "trained_params": round(statistics.mean(m["trained_params"] for m in members)),
            "artifact_bytes": round(statistics.mean(m["artifact_bytes"] for m in members)),
            "dense_ratio": statistics.mean(m["dense_fp32_bytes"] / m["artifact_bytes"] for m in members),
        })
    return sorted(table, key=lambda r: (r["part"], r["model"], r["method"], -r["density"]))


def markdown(table: list[dict]) -> str:
    lines = []
    for model in dict.fromkeys(r["model"] for r in table):
        lines += [f"\n### {model}\n",
                  "| method | density | seeds | test acc (mean ± std) | trained params | artifact bytes | x smaller than dense fp32 |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in (r for r in table if r["model"] == model):
            lines.append(f"| {r['method']} | {r['density']:.2%} | {r['seeds']} | {100 * r['acc_mean']:.2f} ± "
                         f"{100 * r['acc_std']:.2f} | {r['trained_params']:,} | {r['artifact_bytes']:,} | "
                         f"{r['dense_ratio']:.1f} |")
    return "\n".join(lines) + "\n"


def plots(table: list[dict], root: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install -e '.[reproduce]')", file=sys.stderr)
        return []
    written = []
    for model in dict.fromkeys(r["model"] for r in table):
        rows = [r for r in table if r["model"] == model]
        figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for method in dict.fromkeys(r["method"] for r in rows):
            points = sorted((r for r in rows if r["method"] == method), key=lambda r: r["density"])
            if method == "dense":
                for axis in axes:
                    axis.axhline(100 * points[0]["acc_mean"], color="black", linestyle="--", label="dense")
                continue
            accuracy = [100 * p["acc_mean"] for p in points]
            error = [100 * p["acc_std"] for p in points]
            axes[0].errorbar([p["density"] for p in points], accuracy, yerr=error, marker="o", label=method, capsize=3)
            axes[1].errorbar([p["artifact_bytes"] for p in points], accuracy, yerr=error, marker="o", label=method,
                             capsize=3)
        axes[0].set(xscale="log", xlabel="density (fraction of weights trained)", ylabel="test accuracy (%)",
                    title=f"{model}: accuracy against density")
        axes[1].set(xscale="log", xlabel="artifact bytes (fp16 values)", ylabel="test accuracy (%)",
                    title=f"{model}: accuracy against storage")
        for axis in axes:
            axis.grid(True, which="both", alpha=0.3)
            axis.legend(fontsize=8)
        figure.tight_layout()
        path = root / f"{model}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one seed, two densities, 1 epoch, subsets (< 10 min)")
    parser.add_argument("--out", default=None, help="output directory [runs/reproduce or runs/reproduce-quick]")
    parser.add_argument("--part", choices=["lenet", "resnet", "all"], default="all")
    parser.add_argument("--models", default=None,
                        help="comma-separated subset of the part's models, e.g. lenet300 (run the sweep in pieces)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per setting [3; 1 with --quick]")
    parser.add_argument("--lenet-epochs", type=int, default=None, help="epochs for the LeNets [10; 1 with --quick]")
    parser.add_argument("--resnet-epochs", type=int, default=None, help="epochs for resnet20 [10; 1 with --quick]")
    parser.add_argument("--resnet-subset", type=int, default=None,
                        help="training samples for resnet20 [10000; 2000 with --quick]")
    args = parser.parse_args()
    quick = args.quick
    root = Path(args.out or ("runs/reproduce-quick" if quick else "runs/reproduce"))
    root.mkdir(parents=True, exist_ok=True)
    parts = ["lenet", "resnet"] if args.part == "all" else [args.part]
    runs = plan_runs(quick, parts, args.seeds or (1 if quick else 3), args.lenet_epochs or (1 if quick else 10),
                     args.resnet_epochs or (1 if quick else 10), args.resnet_subset or (2000 if quick else 10_000))
    if args.models:
        wanted = {name.strip() for name in args.models.split(",")}
        runs = [run for run in runs if run.model in wanted]
        if not runs:
            sys.exit(f"no run of the chosen part uses the models {sorted(wanted)}")
    started = time.perf_counter()
    rows = []
    for index, run in enumerate(runs, 1):
        row = execute(run, root)
        rows.append(row)
        elapsed = time.perf_counter() - started
        print(f"[{index}/{len(runs)}] {run.path}: test acc {row['test_acc']:.2%}, {row['artifact_bytes']:,} B "
              f"({elapsed / 60:.1f} min so far)", flush=True)
    with open(root / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = aggregate(rows)
    command = "python examples/reproduce/sweep.py " + " ".join(sys.argv[1:])
    header = (f"Command: `{command.strip()}`\n\nRuns: {len(rows)}; wall time of this invocation "
              f"{(time.perf_counter() - started) / 60:.1f} min (finished runs are skipped, not retimed).\n")
    (root / "results.md").write_text(header + markdown(table), encoding="utf-8")
    (root / "results.json").write_text(json.dumps(table, indent=2), encoding="utf-8")
    for path in plots(table, root):
        print(f"plot: {path}")
    print(f"results: {root / 'results.md'}, {root / 'results.csv'}")
    print(markdown(table))
    if any(math.isnan(r["acc_mean"]) for r in table):
        sys.exit("some runs have no accuracy")


if __name__ == "__main__":
    main()
