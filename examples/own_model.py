"""Your own CNN on Fashion-MNIST in a plain PyTorch loop: FreezeNet at 1%, saved, reloaded into a fresh instance.

    python examples/own_model.py                       # 2 epochs on the real Fashion-MNIST (about a minute)
    python examples/own_model.py --subset 2000 --epochs 1 --out runs/own.cpk

The model is defined here, in no registry of compress. ``compress.sparsify`` scores it with SNIP on one
batch of 100 and keeps 1% of its conv/linear weights trained, the rest frozen at their seeded init;
``sparse.attach(optimizer)`` keeps that true on every ``optimizer.step()`` of the loop below, which is
plain PyTorch. ``compress.save`` writes only the trained values, the masks and the seed;
``formats.load(path, model=SmallCNN())`` fills a fresh instance, whose outputs are identical.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import compress
import formats
from compress.data import load_data


class SmallCNN(nn.Module):
    """A user's network: two conv blocks with BatchNorm and a linear head."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 5), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, 256), nn.ReLU(), nn.Linear(256, classes))

    def forward(self, x):
        return self.head(self.features(x))


def accuracy(model: nn.Module, split) -> float:
    model.eval()
    correct = count = 0
    with torch.no_grad():
        for x, y in split.batches(500):
            correct += int((model(x).argmax(1) == y).sum())
            count += len(y)
    return correct / count


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="fashion-mnist", help="fashion-mnist (offline from the apt package) or synthetic")
    parser.add_argument("--subset", type=int, default=None, help="train on N samples only")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--out", default="runs/own_model.cpk")
    args = parser.parse_args(argv)
    data = load_data(args.data, subset=args.subset)
    model = SmallCNN()
    scoring = next(iter(data.train.batches(100, shuffle=True, generator=torch.Generator().manual_seed(0))))
    sparse = compress.sparsify(model, method="freezenet", density=args.density, batches=[scoring], seed=0)
    print(f"sparsified: {sparse.trained:,} of {sparse.total:,} conv/linear weights trained "
          f"(density {sparse.density:.2%}), the rest frozen at their seeded init")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sparse.attach(optimizer)
    for epoch in range(args.epochs):  # the user's own loop
        model.train()
        order = torch.Generator().manual_seed(epoch)
        for x, y in data.train.batches(128, shuffle=True, generator=order, train=True):
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        print(f"epoch {epoch + 1}: train loss {loss.item():.4f}, test accuracy {accuracy(model, data.test):.2%}")
    info = compress.save(model, args.out, sparse, values="fp32", force=True)
    fresh = formats.load(args.out, model=SmallCNN())
    model.eval()
    x, _ = next(iter(data.test.batches(256)))
    with torch.no_grad():
        identical = torch.equal(fresh(x), model(x))
    totals = info["totals"]
    print(f"saved {args.out}: {totals['file_bytes']:,} bytes, {totals['ratio_to_dense_fp32']:.1f}x smaller than the "
          f"dense fp32 file ({totals['dense_fp32_bytes']:,} bytes); reloaded into a fresh SmallCNN: outputs "
          f"{'identical' if identical else 'DIFFERENT'}")
    if not identical:
        raise SystemExit("the reloaded model differs")


if __name__ == "__main__":
    main()
