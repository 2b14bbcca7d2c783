"""Benchmark of formats/mask_codec.py: coded size against log2 C(n, k), and encode/decode time.

    python examples/benchmarks/bench_mask_codec.py [--repeats 5] [--seed 0]

Prints, for uniform random masks of n = 10^6 entries, the coded bytes, the bound log2 C(n,k)/8,
their ratio, the best-of-R encode and decode times and the codec chosen, then PASS/FAIL for the
target (ratio <= 1.02 at densities 0.5%..25%). Two smaller tables follow: the ratio for n = 10^4,
10^5, 10^7 at the target densities, and masks whose rows differ in density (as pruned layers do),
where the adaptive codec goes below the uniform bound. Exit status 1 if the target fails. Runs in a
few seconds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from formats.mask_codec import (  # noqa: E402
    CODEC_NAMES,
    decode_mask,
    encode_mask,
    mask_information_bits,
)

DENSITIES = [0.005, 0.01, 0.02, 0.05, 0.10, 0.25, 0.50, 0.75, 0.99]
TARGET_DENSITIES = [0.005, 0.01, 0.02, 0.05, 0.10, 0.25]
TARGET_RATIO = 1.02


def uniform_mask(n: int, density: float, rng: np.random.Generator) -> np.ndarray:
    k = int(round(n * density))
    mask = np.zeros(n, bool)
    mask[rng.choice(n, k, replace=False)] = True
    return mask


def measure(mask: np.ndarray, repeats: int) -> dict:
    n, k = mask.size, int(mask.sum())
    enc = dec = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        data = encode_mask(mask)
        t1 = time.perf_counter()
        out = decode_mask(data, n, k)
        t2 = time.perf_counter()
        enc, dec = min(enc, t1 - t0), min(dec, t2 - t1)
    if not np.array_equal(out, mask):
        raise SystemExit("round trip failed")
    bound = mask_information_bits(n, k) / 8
    return {
        "n": n, "k": k, "bytes": len(data), "bound": bound,
        "ratio": len(data) / bound if bound else float("nan"),
        "payload_ratio": (len(data) - header_bytes(data)) / bound if bound else float("nan"),
        "enc_ms": enc * 1e3, "dec_ms": dec * 1e3, "codec": CODEC_NAMES[data[0]],
    }


def header_bytes(data: bytes) -> int:
    """Codec id plus parameter bytes (everything before the bit stream)."""
    codec = data[0]
    if codec in (0, 1):
        return 1
    if codec in (4, 5):
        return 4
    pos, varints = 1, 1 if codec in (2, 3) else 3
    for _ in range(varints):
        while data[pos] & 0x80:
            pos += 1
        pos += 1
    return pos


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timing repeats (best is kept)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()

    n = 10**6
    print(f"uniform random masks, n = {n:,} (times: best of {args.repeats})")
    print(f"{'density':>8} {'k':>8} {'bytes':>8} {'bound':>10} {'ratio':>7} "
          f"{'enc ms':>7} {'dec ms':>7}  codec")
    failed = []
    for density in DENSITIES:
        r = measure(uniform_mask(n, density, rng), args.repeats)
        print(f"{density:>8.1%} {r['k']:>8} {r['bytes']:>8} {r['bound']:>10.1f} {r['ratio']:>7.4f} "
              f"{r['enc_ms']:>7.1f} {r['dec_ms']:>7.1f}  {r['codec']}")
        if density in TARGET_DENSITIES and r["ratio"] > TARGET_RATIO:
            failed.append(density)
    verdict = "FAIL" if failed else "PASS"
    print(f"{verdict}: coded bytes <= {TARGET_RATIO} x log2C(n,k)/8 at densities "
          f"{TARGET_DENSITIES[0]:.1%}..{TARGET_DENSITIES[-1]:.0%}"
          + (f" (failed at {', '.join(f'{d:.1%}' for d in failed)})" if failed else ""))

    print("\nratio (all bytes / payload bytes without codec id and parameters) by n")
    print(f"{'n':>10} " + " ".join(f"{d:>13.1%}" for d in TARGET_DENSITIES))
    for size in (10**4, 10**5, 10**7):
        cells = []
        for density in TARGET_DENSITIES:
            r = measure(uniform_mask(size, density, rng), 1)
            cells.append(f"{r['ratio']:.3f}/{r['payload_ratio']:.3f}")
        print(f"{size:>10,} " + " ".join(f"{c:>13}" for c in cells))

    print("\nnon-uniform masks: 512 x 4608 weights, magnitude pruning, rows with lognormal scales")
    print(f"{'density':>8} {'row sigma':>9} {'bytes':>8} {'uniform bound':>13} {'ratio':>7}  codec")
    for density in (0.01, 0.05, 0.2):
        for sigma in (0.3, 1.0):
            w = rng.standard_normal((512, 4608)) * np.exp(sigma * rng.standard_normal((512, 1)))
            k = int(density * w.size)
            mask = (np.abs(w) >= np.partition(np.abs(w).ravel(), -k)[-k]).ravel()
            r = measure(mask, 1)
            print(f"{density:>8.1%} {sigma:>9.1f} {r['bytes']:>8} {r['bound']:>13.1f} "
                  f"{r['ratio']:>7.4f}  {r['codec']}")

    print(f"\ntotal {time.perf_counter() - start:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
