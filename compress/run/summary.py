"""``summary.json``: what a finished run is, computed from the metrics history of its checkpoint."""
from __future__ import annotations

import torch

from compress.run.pipeline import Prepared, describe_device


def make_summary(prepared: Prepared, history: list[dict], seconds: float) -> dict:
    """The summary of a finished run; the accuracies are those of the last epoch in ``history``."""
    config, model, plan = prepared.config, prepared.model, prepared.plan
    last = history[-1] if history else {}
    total = sum(p.numel() for p in model.parameters())
    masked = set(plan.masks) if plan is not None else set()
    compressible = sum(r.weights for r in prepared.rows)
    trained_compressible = sum(r.trained for r in prepared.rows)
    dense_trained = sum(p.numel() for n, p in model.named_parameters() if n not in masked and p.requires_grad)
    summary = {
        "model": config.model,
        "data": config.data,
        "input_shape": list(prepared.data.input_shape),
        "interspace": {"layers": prepared.interspace_layers, "basis": config.basis,
                       "trainable_basis": not config.fixed_basis} if prepared.interspace_layers else None,
        "normalization": {"mean": [float(v) for v in prepared.data.train.mean],
                          "std": [float(v) for v in prepared.data.train.std]},
        "num_classes": prepared.data.num_classes,
        "class_names": prepared.data.class_names(),
        "splits": {"train": len(prepared.data.train), "val": len(prepared.data.val or ()), "test": len(prepared.data.test)},
        "method": config.method,
        "score": plan.score if plan is not None else config.score,
        "mode": config.mode if plan is not None else "dense",
        "scope": config.scope,
        "seed": config.seed,
        "requested_density": config.density,
        "density": trained_compressible / compressible if compressible else 1.0,
        "sparsity": 1.0 - (trained_compressible / compressible if compressible else 1.0),
        "compressible_params": compressible,
        "trained_compressible_params": trained_compressible,
        "trained_params": trained_compressible + (dense_trained if plan is not None else 0),
        "total_params": total,
        "collapsed_layers": plan.collapsed_layers() if plan is not None else [],
        "epochs": config.epochs,
        "test_acc": last.get("test_acc"),
        "test_loss": last.get("test_loss"),
        "train_loss": last.get("train_loss"),
        "score_seconds": round(prepared.score_seconds, 3),
        "train_seconds": round(seconds, 3),
        "threads": torch.get_num_threads(),
        "device": describe_device(prepared.device),
        "torch": torch.__version__,
    }
    if plan is None:
        summary["trained_params"] = total
    if "val_acc" in last:
        summary["val_acc"] = last["val_acc"]
    return summary
