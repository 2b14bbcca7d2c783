"""Preparation before training: resolve the config, load data, build and initialise the model, score, select."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch

from compress.config import RunConfig
from compress.data import Data, load_data
from compress.init import initialise
from formats.interspace import to_interspace
from formats.models import build_model
from compress.params import compressible_parameters
from compress.distributed import current_world
from compress.scores import score as compute_scores
from compress.selection import Plan, select_with
from compress.training import derived_seed
from formats.errors import UserError


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
    """A line on stderr, from rank 0 only in a run of several processes (the ranks compute the same)."""
    if current_world().rank == 0:
        print(message, file=sys.stderr, flush=True)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for but no CUDA device is available; use --device cpu")
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
        augment=config.augment,
        workers=config.workers,
    )


def describe_data(data: Data) -> str:
    """One line: the splits' sizes, the input shape and the classes."""
    names = data.class_names()
    shown = ", ".join(names[:10]) + (f", ... ({len(names)} in all)" if len(names) > 10 else "")
    val = f", {len(data.val):,} validation" if data.val is not None else ""
    return (f"data {data.name}: {len(data.train):,} training{val} and {len(data.test):,} test images of "
            f"{'x'.join(map(str, data.input_shape))}, {data.num_classes} classes ({shown})")


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
    subset = split.select(order, augment=False)
    batch_size = len(order) // config.score_batches or 1
    return list(subset.batches(batch_size))


def plan_rows(model: torch.nn.Module, plan: Plan | None, mode: str) -> list[LayerRow]:
    named = dict(model.named_parameters())
    names = list(plan.masks) if plan is not None else compressible_parameters(model)
    rows = []
    for name in names:
        param = named[name]
        trained = int(torch.count_nonzero(plan.masks[name])) if plan is not None else param.numel()
        kind = "coefficients" if name.endswith(".coefficients") else "weights"
        rows.append(LayerRow(name, list(param.shape), param.numel(), trained, mode if plan is not None else "dense",
                             kind))
    return rows


def check_trains_something(config: RunConfig, sizes: list[int], trained: int | None = None,
                           density: float | None = None) -> None:
    """A plan that trains no weight at all is an error naming the smallest density that trains one.

    Selection keeps ``round(density * n)`` entries (of all ``n`` together, or of every layer with
    layer scope); ``trained`` is the count of a finished plan.
    """
    if not sizes:
        return
    density = config.density if density is None else density
    if trained is None:
        counts = sizes if config.scope == "layer" else [sum(sizes)]
        trained = sum(round(density * n) for n in counts)
    if trained > 0:
        return
    smallest = 1.0 / (max(sizes) if config.scope == "layer" else sum(sizes))
    raise UserError(
        f"density {density:g} trains no weight at all of {config.model} ({sum(sizes):,} compressible "
        f"weights, {config.scope} scope); use --density {smallest:.3g} or more, which trains at least one weight"
    )


def plan_from_masks(config: RunConfig, model: torch.nn.Module, masks: dict[str, torch.Tensor], label: str) -> Plan:
    """A plan from stored masks (resume never scores again); they must fit the model's compressible parameters."""
    params = compressible_parameters(model, config.include_bias)
    if sorted(masks) != sorted(params) or any(masks[n].shape != model.get_parameter(n).shape for n in params):
        raise UserError(f"the stored masks do not fit the parameters of {config.model}: the run directory is "
                        "damaged or from another version; start a new run with --overwrite")
    device = next(model.parameters()).device
    return Plan(config.mode, {n: masks[n].to(device, torch.bool) for n in params}, config.density, config.scope, label)


def initialised_model(config: RunConfig, data: Data, seed: int) -> tuple[torch.nn.Module, list[str]]:
    """The run's model (interspace layers converted) initialised from ``seed``, and its interspace layers."""
    model = build_model(config.model, data.input_shape, data.num_classes)
    layers = to_interspace(model, config.basis, not config.fixed_basis) if config.interspace else []
    if config.interspace and not layers:
        raise UserError(f"model {config.model} has no convolution larger than 1x1: --interspace has nothing to do; "
                        "drop --interspace")
    initialise(model, seed)
    return model, layers


def density_with_bases(config: RunConfig, model: torch.nn.Module, layers: list[str], density: float) -> float:
    """The density of the masked entries that leaves room for the trained bases inside ``density`` of them
    (``--basis-in-budget``: interspace pruning at equal trained parameters with standard pruning)."""
    masked = sum(model.get_parameter(name).numel() for name in compressible_parameters(model, config.include_bias))
    bases = sum(model.get_parameter(f"{layer}.basis").numel() for layer in layers)
    left = density * masked - bases
    if left < 1:
        raise UserError(f"the {bases:,} trained basis entries of {len(layers)} interspace layers fill the whole budget of "
                        f"density {density:g} ({density * masked:,.0f} entries); raise --density or drop "
                        "--basis-in-budget")
    return left / masked


def prepare(config: RunConfig, *, quiet: bool = False, masks: dict[str, torch.Tensor] | None = None,
            masks_label: str = "") -> Prepared:
    """Resolve the config, load data, build and initialise the model, score and select.

    With ``masks`` (a resumed run's stored masks) nothing is scored: the plan is made of them.
    """
    from compress.strategies import STRATEGIES

    config = config.resolved()
    density = STRATEGIES.get(config.strategy).initial_density(config, config.strategy_settings())
    device = resolve_device(config.device)
    data = load_run_data(config)
    model, layers = initialised_model(config, data, config.seed)
    if not quiet:  # after the model is built: a bad model name is the only line
        log(describe_data(data))
    model.to(device)
    if density is not None and config.basis_in_budget:
        density = density_with_bases(config, model, layers, density)
    plan, seconds = None, 0.0
    if masks is not None:
        plan = plan_from_masks(config, model, masks, masks_label or str(config.score))
    elif density is not None:
        params = compressible_parameters(model, config.include_bias)
        check_trains_something(config, [model.get_parameter(name).numel() for name in params], density=density)
        names = config.score_names()
        batches = scoring_batches(data, config, balanced="grasp" in names)
        batches = [(x.to(device), y.to(device)) for x, y in batches]
        if not quiet:
            log(f"scoring {len(params)} parameters with {' and '.join(names)} ...")
        started = time.perf_counter()
        scores = [compute_scores(model, name, batches, params, density=density, seed=config.seed, scope=config.scope,
                                 mode=config.score_mode, progress=not quiet) for name in names]
        plan = select_with(config.selector, scores, density, config.scope, config.mode,
                           config.selector_options(config), names)
        seconds = time.perf_counter() - started
        check_trains_something(config, [m.numel() for m in plan.masks.values()], plan.trained, density=density)
    rows = plan_rows(model, plan, config.mode)
    collapsed = plan.collapsed_layers() if plan is not None else []
    if collapsed:
        message = (
            f"layer collapse: {', '.join(collapsed)} would have no trained weight at density {plan.density:g} "
            f"({config.scope} scope); raise the density, use --scope layer, or another score"
        )
        if config.on_collapse == "error":
            raise UserError(message)
        if not quiet:
            log(f"warning: {message}")
    return Prepared(config, data, model, plan, rows, device, seconds, layers)


def plan_run(config: RunConfig) -> Prepared:
    """Build and select without training (``compress plan``)."""
    return prepare(config)
