"""Our SNIP, GraSP and SynFlow against Synaptic-Flow's own pruners, on identical weights of a BatchNorm network.

    git clone https://github.com/ganguli-lab/Synaptic-Flow /tmp/Synaptic-Flow   # (pip install tqdm: it imports it)
    python examples/reproduce/check_reference_scores.py --reference /tmp/Synaptic-Flow

A small CNN with BatchNorm (conv 3->8, BN, ReLU, conv 8->16, BN, ReLU, average pool, linear 16->10) is built twice
from one state dict: with Synaptic-Flow's masked layers (``Layers.layers``) and as a plain ``torch.nn`` model for
``compress.scores.score``. Its BatchNorm running statistics are set unlike any batch's, so that eval and train mode
give different scores. The reference scores with ``prune_loop`` (global scope, one round for SNIP and GraSP; one
and 100 exponential rounds for SynFlow) in its default eval mode (``train_mode=False``) and in train mode; ours
with ``--score-mode eval`` (the default) and ``train``. Printed per score and mode: the largest difference of the
scores, each divided by its largest entry (the references divide by a sum, which changes no mask), and how much
the kept sets at 5% overlap (entries both keep, of those either keeps), at the reference's count. The reference is
imported from the given checkout; nothing of it is copied here.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

DENSITY = 0.05


def plain_model() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1),
                         nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def reference_model(layers) -> nn.Sequential:
    return nn.Sequential(layers.Conv2d(3, 8, 3, padding=1), layers.BatchNorm2d(8), nn.ReLU(),
                         layers.Conv2d(8, 16, 3, padding=1), layers.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), layers.Linear(16, 10))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", required=True, type=Path, help="a checkout of ganguli-lab/Synaptic-Flow")
    args = parser.parse_args()
    if not (args.reference / "Pruners" / "pruners.py").is_file():
        raise SystemExit(f"error: {args.reference} is not a Synaptic-Flow checkout (no Pruners/pruners.py)")
    sys.path.insert(0, str(args.reference))
    try:
        from Layers import layers
        from Pruners import pruners
        from Utils import generator
        from prune import prune_loop
    except ImportError as error:
        raise SystemExit(f"error: cannot import the reference ({error}); it needs tqdm: pip install tqdm")

    from compress.init import initialise
    from compress.scores import score
    from compress.selection import top_k_over

    torch.manual_seed(0)
    plain = initialise(plain_model(), 0)
    with torch.no_grad():
        for bn in (plain[1], plain[4]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    state = copy.deepcopy(plain.state_dict())
    generator_ = torch.Generator().manual_seed(1)
    batches = [(torch.randn(32, 3, 16, 16, generator=generator_), torch.randint(0, 10, (32,), generator=generator_))
               for _ in range(2)]
    params = ["0.weight", "3.weight", "8.weight"]
    runs = [("snip", pruners.SNIP, 1), ("grasp", pruners.GraSP, 1), ("synflow", pruners.SynFlow, 1),
            ("synflow", pruners.SynFlow, 100)]
    total = sum(plain.get_parameter(p).numel() for p in params)
    keep = total - int((1.0 - DENSITY) * total)  # the reference's count (ours is round(density * n): one fewer here)
    print(f"torch {torch.__version__}; a BatchNorm CNN, {total:,} scored weights, 2 batches of 32; masks of the "
          f"{keep} highest scores ({DENSITY:.0%}, global, the reference's count)\n")
    print(f"{'score':<8} {'rounds':>6} {'mode':<6} {'score difference':>17} {'kept sets overlap':>18}")
    for name, pruner_class, rounds in runs:
        for mode in ("eval", "train"):
            if name == "synflow" and mode == "train":
                continue  # data-free: both linearise the network in eval mode
            reference = reference_model(layers)
            reference.load_state_dict(state, strict=False)  # the reference's masks stay all ones
            pruner = pruner_class(generator.masked_parameters(reference, False, False, False))
            prune_loop(reference, nn.CrossEntropyLoss(), pruner, batches, torch.device("cpu"), DENSITY,
                       "exponential", "global", rounds, train_mode=mode == "train")
            masked = list(generator.masked_parameters(reference, False, False, False))
            theirs = [pruner.scores[id(p)].float() for _, p in masked]
            their_masks = [m.bool() for m, _ in masked]
            if rounds > 1:  # the reference's masks come from its rounds; its last scores only from the last one
                ours = score(plain, name, batches, params, density=DENSITY, mode=mode)
                difference = "-"
            else:
                ours = score(plain, name, batches, params, mode=mode)
                # each normalised by its largest entry: the references divide by a sum (GraSP: |sum| + 1e-10),
                # a positive factor that changes no mask
                largest = [max(float(t.abs().max()) for t in values) for values in (theirs, [ours[p] for p in params])]
                gap = max(float((ours[p] / largest[1] - t / largest[0]).abs().max()) for p, t in zip(params, theirs))
                difference = f"{gap:.2e}"
            ranked = top_k_over([ours[p] for p in params], keep)
            both = sum(int((o.reshape(m.shape) & m).sum()) for o, m in zip(ranked, their_masks))
            either = sum(int((o.reshape(m.shape) | m).sum()) for o, m in zip(ranked, their_masks))
            print(f"{name:<8} {rounds:>6} {mode:<6} {difference:>17} {both:>7} of {either:<3} ({both / either:.1%})")
    for name in ("snip", "grasp"):  # the network is one where the mode matters
        modes = [score(plain, name, batches, params, mode=mode) for mode in ("eval", "train")]
        largest = [max(float(v.abs().max()) for v in m.values()) for m in modes]
        gap = max(float((modes[0][p] / largest[0] - modes[1][p] / largest[1]).abs().max()) for p in params)
        print(f"ours, {name} in eval against train mode on this network: a score difference of {gap:.2e}")


if __name__ == "__main__":
    main()
