"""A torchvision model built in your own code (not ``--model tv:``): SynFlow at 5% with ERK per-layer densities
(a global top-k would empty its squeeze-excitation layers), pruned, a few steps of your loop, saved, reloaded
into a fresh instance.

    python examples/own_torchvision.py [--model mobilenet_v3_small] [--steps 5] [--out runs/own_tv.cpk]

SynFlow is data-free, so no batch is needed to score; the training batches here are random tensors
standing for your data. ``formats.load(path, model=...)`` takes a fresh instance built the same way.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import torchvision

import compress
import formats


def build(name: str) -> torch.nn.Module:
    return torchvision.models.get_model(name, weights=None, num_classes=10)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mobilenet_v3_small", help="a torchvision classification model name")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default="runs/own_tv.cpk")
    args = parser.parse_args(argv)
    model = build(args.model)
    sparse = compress.sparsify(model, method="synflow", density=0.05, scope="erk", input_shape=(3, 32, 32))
    print(f"{args.model}: {sparse.trained:,} of {sparse.total:,} conv/linear weights trained (density {sparse.density:.2%})")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sparse.attach(optimizer)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for step in range(args.steps):  # your loop, with your data
        x, y = torch.randn(16, 3, 32, 32, generator=generator), torch.randint(0, 10, (16,), generator=generator)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    info = compress.save(model, args.out, sparse, values="fp32", force=True)
    fresh = formats.load(args.out, model=build(args.model))
    model.eval()
    x = torch.randn(4, 3, 32, 32, generator=generator)
    with torch.no_grad():
        identical = torch.equal(fresh(x), model(x))
    print(f"saved {args.out}: {info['totals']['file_bytes']:,} bytes, {info['totals']['ratio_to_dense_fp32']:.1f}x "
          f"smaller than dense fp32; reloaded: outputs {'identical' if identical else 'DIFFERENT'}")
    if not identical:
        raise SystemExit("the reloaded model differs")


if __name__ == "__main__":
    main()
