"""The pipeline as one call: build, score, select, train and write a run directory (resumable).

A run directory holds ``config.json`` (the resolved config), ``masks.safetensors`` (True = trained),
``plan.json`` (the per-layer table), ``checkpoint.safetensors`` (model and optimizer after the last
finished epoch), ``metrics.jsonl`` (one line per epoch), and at the end ``model.safetensors`` (the
trained state dict under the model's own names) and ``summary.json``. No pickle anywhere.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from compress.config import RunConfig, config_from_dict
from compress.cops import cops_masks
from compress.data import Data, load_data
from compress.init import initial_values, initialise
from compress.interspace import to_interspace
from compress.models import build_model
from compress.params import compressible_parameters
from compress.scores import score as compute_scores
from compress.selection import Plan, select
from compress.training import MaskConstraint, derived_seed, optimizer_state_tensors, train

CONFIG_FILE = "config.json"
MASKS_FILE = "masks.safetensors"
PLAN_FILE = "plan.json"
CHECKPOINT_FILE = "checkpoint.safetensors"
METRICS_FILE = "metrics.jsonl"
MODEL_FILE = "model.safetensors"
SUMMARY_FILE = "summary.json"


@dataclass
class LayerRow:
    """One line of the plan table."""

    name: str
    shape: list[int]
    weights: int
    trained: int
    mode: str
    kind: str = "weights"  # "weights" or interspace "coefficients"

    @property
    def density(self) -> float:
        return self.trained / self.weights if self.weights else 1.0


@dataclass
class Prepared:
    """Everything built before training: resolved config, data, initialised model, plan and rows."""

    config: RunConfig
    data: Data
    model: torch.nn.Module
    plan: Plan | None
    rows: list[LayerRow]
    device: torch.device
    score_seconds: float
    interspace_layers: list[str]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for but no CUDA device is available; use --device cpu")
    return torch.device(name)


def describe_device(device: torch.device) -> str:
    """The device a run trained on, in words: ``cpu`` or ``cuda (NVIDIA H200)``."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def load_run_data(config: RunConfig) -> Data:
    return load_data(
        config.data,
        config.data_root,
        subset=config.subset,
        val_split=config.val_split,
        shape=tuple(config.data_shape) if config.data_shape else None,
        num_classes=config.num_classes,
        seed=config.seed,
    )


def scoring_batches(data: Data, config: RunConfig, balanced: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``score_batches`` batches of ``score_batch_size`` training samples, drawn with the run seed.

    ``balanced`` draws the same number of samples from every class (GraSP's reference does).
    """
    split = data.train
    generator = torch.Generator().manual_seed(derived_seed(config.seed, "score-batches"))
    needed = config.score_batches * config.score_batch_size
    order = torch.randperm(len(split), generator=generator)
    if balanced:
        per_class = max(1, config.score_batch_size // data.num_classes)
        labels = split.y[order]
        by_class = [order[labels == cls] for cls in range(data.num_classes)]
        order = torch.cat([members[b * per_class : (b + 1) * per_class]
                           for b in range(config.score_batches) for members in by_class])
    else:
        order = order[: min(needed, len(split))]
    subset = replace(split, x=split.x[order], y=split.y[order], augment=False)
    batch_size = len(order) // config.score_batches or 1
    return list(subset.batches(batch_size))


def plan_rows(model: torch.nn.Module, plan: Plan | None, mode: str) -> list[LayerRow]:
    named = dict(model.named_parameters())
    names = list(plan.masks) if plan is not None else compressible_parameters(model)
    rows = []
    for name in names:
        param = named[name]
        trained = int(plan.masks[name].sum()) if plan is not None else param.numel()
        kind = "coefficients" if name.endswith(".coefficients") else "weights"
        rows.append(LayerRow(name, list(param.shape), param.numel(), trained, mode if plan is not None else "dense",
                             kind))
    return rows


def prepare(config: RunConfig, *, quiet: bool = False) -> Prepared:
    """Resolve the config, load data, build and initialise the model, score and select."""
    config = config.resolved()
    device = resolve_device(config.device)
    data = load_run_data(config)
    model = build_model(config.model, data.input_shape, data.num_classes)
    layers = to_interspace(model, config.basis, not config.fixed_basis) if config.interspace else []
    if config.interspace and not layers:
        raise ValueError(f"model {config.model} has no convolution larger than 1x1: --interspace has nothing to do")
    initialise(model, config.seed)
    model.to(device)
    plan, seconds = None, 0.0
    if config.score is not None and config.density < 1.0:
        params = compressible_parameters(model, config.include_bias)
        names = config.scores if config.score == "cops" else [config.score]
        batches = scoring_batches(data, config, balanced="grasp" in names)
        batches = [(x.to(device), y.to(device)) for x, y in batches]
        if not quiet:
            log(f"scoring {len(params)} parameters with {' and '.join(names)} ...")
        started = time.perf_counter()
        scores = [compute_scores(model, name, batches, params, density=config.density, seed=config.seed)
                  for name in names]
        if config.score == "cops":
            masks = cops_masks(scores[0], scores[1], config.density, config.scope, config.gamma)
            label = f"cops({','.join(names)};gamma={config.gamma:g})"
            plan = Plan(config.mode, masks, config.density, config.scope, label)
        else:
            plan = select(scores[0], config.density, config.scope, config.mode, score=config.score)
        seconds = time.perf_counter() - started
    rows = plan_rows(model, plan, config.mode)
    collapsed = plan.collapsed_layers() if plan is not None else []
    if collapsed:
        message = (
            f"layer collapse: {', '.join(collapsed)} would have no trained weight at density {config.density:g} "
            f"({config.scope} scope); raise the density, use --scope layer, or another score"
        )
        if config.on_collapse == "error":
            raise ValueError(message)
        if not quiet:
            log(f"warning: {message}")
    return Prepared(config, data, model, plan, rows, device, seconds, layers)


def format_plan(prepared: Prepared) -> str:
    """The per-layer table: weights, trained, density and mode, with totals and density vs sparsity."""
    rows = prepared.rows
    width = max([len("parameter")] + [len(r.name) for r in rows])
    lines = [f"{'parameter':<{width}}  {'shape':<18} {'weights':>11} {'trained':>10} {'density':>9}  mode"]
    for r in rows:
        flag = "  <- collapsed" if r.weights and r.trained == 0 else ""
        shape = "x".join(str(s) for s in r.shape)
        kind = "  (interspace coefficients)" if r.kind == "coefficients" else ""
        lines.append(
            f"{r.name:<{width}}  {shape:<18} {r.weights:>11,} {r.trained:>10,} {r.density:>9.4%}  {r.mode}{kind}{flag}"
        )
    total = sum(r.weights for r in rows)
    trained = sum(r.trained for r in rows)
    density = trained / total if total else 1.0
    lines.append(f"{'total':<{width}}  {'':<18} {total:>11,} {trained:>10,} {density:>9.4%}")
    c = prepared.config
    all_params = sum(p.numel() for p in prepared.model.parameters())
    if prepared.interspace_layers:
        bases = sum(prepared.model.get_parameter(f"{layer}.basis").numel() for layer in prepared.interspace_layers)
        lines.append(f"interspace: {len(prepared.interspace_layers)} convolutions as coefficients over {c.basis} filter "
                     f"bases ({bases:,} basis entries, {'fixed' if c.fixed_basis else 'trained'}); density counts "
                     "coefficients of those layers and weights of the others")
    lines.append(
        f"model {c.model} ({all_params:,} parameters), method {c.method}, "
        f"score {prepared.plan.score if prepared.plan is not None else c.score}, mode {c.mode}, "
        f"scope {c.scope}: density {density:.4%} trained = sparsity {1 - density:.4%} "
        f"{'pruned' if c.mode == 'prune' else 'frozen'} ({total / max(trained, 1):.1f}x fewer trained weights)"
    )
    return "\n".join(lines)


def plan_run(config: RunConfig) -> Prepared:
    """Build and select without training (``compress plan``)."""
    return prepare(config)


# --------------------------------------------------------------------------------------------------------------
# Run directories


def _write_json(path: Path, value) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def check_writable(out: Path) -> None:
    """Fail early when ``out`` cannot be created or written."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} exists and is not a directory; choose another --out")
    ancestor = out
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"output directory {out} is not writable ({ancestor} does not allow writing); choose another --out")


def train_run(config: RunConfig, out: str | Path, *, overwrite: bool = False, progress: bool = True) -> dict:
    """Run the whole pipeline into run directory ``out`` and return the summary.

    An existing finished run with the same config is not retrained (its summary is returned); an
    unfinished or different one is an error unless ``overwrite`` (or resume it with ``resume_run``).
    """
    out = Path(out)
    check_writable(out)
    resolved = config.resolved()
    if out.exists() and any(out.iterdir()) and not overwrite:
        existing = out / CONFIG_FILE
        if (out / SUMMARY_FILE).is_file() and existing.is_file():
            if same_config(json.loads(existing.read_text()), resolved):
                log(f"{out} already holds this finished run; nothing to do")
                return json.loads((out / SUMMARY_FILE).read_text())
            raise ValueError(f"{out} holds a finished run with a different config; choose another --out or pass --overwrite")
        raise ValueError(
            f"{out} already exists and is not empty; continue it with --resume {out}, "
            "or choose another --out, or pass --overwrite"
        )
    prepared = prepare(resolved)
    if out.exists() and overwrite:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / CONFIG_FILE, _jsonable(prepared.config.to_dict()))
    if prepared.plan is not None:
        _save_safetensors(out / MASKS_FILE, prepared.plan.masks, {"mode": prepared.plan.mode})
    _write_json(out / PLAN_FILE, [asdict(r) | {"density": r.density} for r in prepared.rows])
    (out / METRICS_FILE).write_text("", encoding="utf-8")
    return _train_prepared(prepared, out, start_epoch=0, optimizer_state=None, progress=progress)


def same_config(stored: dict, resolved: RunConfig) -> bool:
    """Whether a stored config.json describes ``resolved``; keys added since it was written take defaults."""
    try:
        stored_resolved = config_from_dict(stored).resolved()
    except (ValueError, TypeError):
        return False
    return _jsonable(stored_resolved.to_dict()) == _jsonable(resolved.to_dict())


def resume_run(run_dir: str | Path, *, progress: bool = True) -> dict:
    """Continue an interrupted run from its last finished epoch; ends with the uninterrupted weights."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise ValueError(f"{run_dir} is not a run directory (no {CONFIG_FILE}); start it with --out")
    if (run_dir / SUMMARY_FILE).is_file():
        log(f"{run_dir} is already finished; nothing to resume")
        return json.loads((run_dir / SUMMARY_FILE).read_text())
    config = config_from_dict(json.loads((run_dir / CONFIG_FILE).read_text()), source=str(run_dir / CONFIG_FILE))
    prepared = prepare(config, quiet=True)
    if prepared.plan is not None:
        stored = load_file(str(run_dir / MASKS_FILE))
        for name, mask in prepared.plan.masks.items():
            if name not in stored or not torch.equal(stored[name].to(mask.device), mask):
                raise ValueError(f"{run_dir}: the stored mask of {name} differs from the recomputed one")
    start_epoch, optimizer_state = 0, None
    checkpoint = run_dir / CHECKPOINT_FILE
    if checkpoint.is_file():
        from safetensors import safe_open

        with safe_open(str(checkpoint), "pt") as handle:
            start_epoch = int(handle.metadata()["epoch"])
        tensors = load_file(str(checkpoint))
        state = {k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")}
        prepared.model.load_state_dict(state)
        optimizer_state = {k: v for k, v in tensors.items() if k.startswith("optimizer/")}
    metrics_path = run_dir / METRICS_FILE
    lines = metrics_path.read_text().splitlines() if metrics_path.is_file() else []
    metrics_path.write_text("".join(line + "\n" for line in lines[:start_epoch]), encoding="utf-8")
    log(f"resuming {run_dir} after epoch {start_epoch}")
    return _train_prepared(prepared, run_dir, start_epoch=start_epoch, optimizer_state=optimizer_state, progress=progress)


def _jsonable(value):
    return json.loads(json.dumps(value))


def _train_prepared(prepared: Prepared, out: Path, *, start_epoch, optimizer_state, progress) -> dict:
    config, model = prepared.config, prepared.model
    initial = None
    if prepared.plan is not None and prepared.plan.mode == "freeze":
        initial = initial_values(model, config.seed, list(prepared.plan.masks))
    constraint = MaskConstraint(model, prepared.plan, initial)
    started = time.perf_counter()

    def on_epoch_end(epoch: int, metrics: dict, optimizer) -> None:
        tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
        tensors.update(optimizer_state_tensors(optimizer, model))
        _save_safetensors(out / CHECKPOINT_FILE, tensors, {"epoch": str(epoch + 1)})
        with open(out / METRICS_FILE, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(metrics, sort_keys=True) + "\n")
        val = f"  val acc {metrics['val_acc']:.2%}" if "val_acc" in metrics else ""
        test = f"  test acc {metrics['test_acc']:.2%}" if "test_acc" in metrics else ""
        log(f"epoch {metrics['epoch']}/{config.epochs}: train loss {metrics['train_loss']:.4f}{test}{val}  "
            f"({metrics['seconds']:.1f} s)")

    settings = config.train_settings()
    train(model, prepared.data, settings, constraint, seed=config.seed, device=prepared.device,
          start_epoch=start_epoch, optimizer_state=optimizer_state, on_epoch_end=on_epoch_end, progress=progress)
    _save_safetensors(out / MODEL_FILE, model.state_dict(), {"format": "compress-run-model", "model": config.model})
    summary = make_summary(prepared, out, time.perf_counter() - started)
    _write_json(out / SUMMARY_FILE, summary)
    log(f"done: test acc {summary['test_acc']:.2%} with {summary['trained_params']:,} of "
        f"{summary['total_params']:,} parameters trained (density {summary['density']:.4%}); run in {out}")
    return summary


def make_summary(prepared: Prepared, out: Path, seconds: float) -> dict:
    config, model, plan = prepared.config, prepared.model, prepared.plan
    metrics = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines() if line]
    last = metrics[-1] if metrics else {}
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


def train_from_options(
    config_file: str | None,
    overrides: dict,
    *,
    out: str | None,
    resume: str | None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """What ``compress train`` does: resume ``resume``, or build the config and train into ``out``."""
    from compress.config import build_config

    given = {k: v for k, v in overrides.items() if v is not None and k != "device"}
    if resume is not None:
        if out is not None or config_file is not None or given:
            raise ValueError(
                f"--resume takes every setting from {Path(resume) / CONFIG_FILE}; drop --out, --config and "
                f"the other options ({', '.join('--' + k.replace('_', '-') for k in given) or '--out/--config'})"
            )
        return resume_run(resume, progress=progress)
    if out is None:
        raise ValueError("give a run directory with --out DIR (or continue one with --resume DIR)")
    return train_run(build_config(config_file, overrides), out, overwrite=overwrite, progress=progress)


def plan_from_options(config_file: str | None, overrides: dict) -> str:
    """What ``compress plan`` does: build the config, score and select, and return the table."""
    from compress.config import build_config

    return format_plan(plan_run(build_config(config_file, overrides)))
