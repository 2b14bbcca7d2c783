"""Run every benchmark under examples/benchmarks and print one table of their targets.

    python examples/benchmarks/run_all.py [--full] [--log-dir DIR]

Each benchmark runs in its own process (quick mode unless --full) and prints its own tables; this
collects every line that starts with PASS or FAIL into one summary (training-step overhead, scoring
cost, mask bytes against the limit, artifact ratio, rebuild time, ONNX latency, COPS against the LP
solver, interspace overhead, channels_last against NCHW, the strategy layer against the bare loop, SET/RigL against oneshot, the sparse engine against the dense one). Full outputs go to --log-dir. Ratios are
measured in one run on a shared machine: rerun a FAIL on an idle machine before trusting it.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = [
    ("training step and scores", "bench_train_step.py", True),
    ("mask codec", "bench_mask_codec.py", False),
    ("artifact", "bench_artifact.py", True),
    ("onnx latency", "bench_onnx.py", True),
    ("cops vs LP solver", "bench_cops.py", True),
    ("interspace overhead", "bench_interspace.py", True),
    ("conv layout", "bench_layout.py", True),
    ("strategy layer", "bench_strategy.py", True),
    ("dynamic sparse training", "bench_dynamic.py", True),
    ("sparse training engine", "bench_engine.py", True),
    ("artifact size vs compressors", "bench_artifact_size.py", True),
    ("streaming image folders", "bench_streaming.py", True),
    ("large-model memory", "bench_large_model.py", True),
]
VERDICT = re.compile(r"^\s*(PASS|FAIL)\b[\s:]*(.+?)\s*$")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="run the full benchmarks instead of --quick")
    parser.add_argument("--log-dir", default="runs/benchmarks", help="where each benchmark's output is written")
    args = parser.parse_args()
    logs = Path(args.log_dir)
    logs.mkdir(parents=True, exist_ok=True)
    summary = []
    for title, script, has_quick in BENCHMARKS:
        command = [sys.executable, str(HERE / script)] + (["--quick"] if has_quick and not args.full else [])
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        (logs / f"{Path(script).stem}.log").write_text(result.stdout + result.stderr, encoding="utf-8")
        verdicts = [VERDICT.match(line) for line in result.stdout.splitlines()]
        verdicts = [(m.group(1), m.group(2)) for m in verdicts if m]
        if result.returncode != 0:
            verdicts.append(("FAIL", f"exited with status {result.returncode} (see {logs / Path(script).stem}.log)"))
        summary.append((title, seconds, verdicts))
        print(f"{title}: {sum(v == 'PASS' for v, _ in verdicts)}/{len(verdicts)} PASS ({seconds:.0f} s)", flush=True)
    print("\n| benchmark | verdict | check |\n|---|---|---|")
    for title, _, verdicts in summary:
        for verdict, text in verdicts:
            print(f"| {title} | {verdict} | {text} |")
    total = sum(len(v) for _, _, v in summary)
    passed = sum(v == "PASS" for _, _, vs in summary for v, _ in vs)
    print(f"\n{passed}/{total} targets PASS; logs in {logs}")


if __name__ == "__main__":
    main()
