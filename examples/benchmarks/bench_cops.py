"""COPS benchmark: the analytic Lagrangian search against a general LP solver (HiGHS via scipy).

    python examples/benchmarks/bench_cops.py [--quick]

Random problems (two standard normal scores, k = 1% of n, gamma = 0.5) at n = 10^4, 10^5 and, without
--quick, 10^6 (HiGHS needs minutes there); the objective of both must agree. Then the time to combine
the scores of ResNet-18's 11.2M weights (target: under 2 s). scipy is a test-only dependency.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from scipy.optimize import linprog

from compress.cops import solve_relaxed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="skip n = 10^6 against HiGHS")
    args = parser.parse_args()
    print(f"# compress COPS benchmark: python {' '.join(sys.argv)}")
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads)\n")
    print(f"{'n':>10} {'cops ms':>10} {'HiGHS ms':>11} {'ratio':>8} {'rel. objective diff':>20}")
    sizes = [10**4, 10**5] + ([] if args.quick else [10**6])
    results = []
    for n in sizes:
        generator = torch.Generator().manual_seed(n)
        s1 = torch.randn(n, generator=generator, dtype=torch.float64)
        s2 = torch.randn(n, generator=generator, dtype=torch.float64)
        k = n // 100
        started = time.perf_counter()
        solution = solve_relaxed(s1, s2, k, 0.5)
        ours = time.perf_counter() - started
        started = time.perf_counter()
        result = linprog(-s1.numpy(), A_ub=[-s2.numpy()], b_ub=[-solution.target], A_eq=[np.ones(n)], b_eq=[k],
                         bounds=(0, 1), method="highs")
        theirs = time.perf_counter() - started
        difference = abs(-result.fun - solution.objective) / abs(result.fun)
        print(f"{n:>10,} {ours * 1e3:>10.1f} {theirs * 1e3:>11.1f} {theirs / ours:>7.0f}x {difference:>20.2e}")
        results.append((n, theirs / ours, difference))
    model_weights = 11_164_352  # ResNet-18 (CIFAR) conv and linear weights
    generator = torch.Generator().manual_seed(0)
    s1 = torch.rand(model_weights, generator=generator, dtype=torch.float64)
    s2 = torch.randn(model_weights, generator=generator, dtype=torch.float64)
    started = time.perf_counter()
    solve_relaxed(s1, s2, model_weights // 100, 0.5)
    seconds = time.perf_counter() - started
    print(f"\nResNet-18 ({model_weights:,} weights, density 1%): {seconds:.2f} s (target < 2 s)")
    print("\n## Targets")
    for n, ratio, difference in results:
        print(f"{'PASS' if ratio > 1 and difference < 1e-9 else 'FAIL'}  cops faster than HiGHS at n={n:,}, same "
              f"objective  ({ratio:.1f}x)")
    print(f"{'PASS' if seconds < 2 else 'FAIL'}  cops on ResNet-18's weights < 2 s  ({seconds:.2f})")


if __name__ == "__main__":
    main()
