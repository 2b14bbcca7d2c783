"""Training under a Plan: pruned entries stay exactly zero, frozen entries stay bit-identical to init.

The constraint is kept without hooks or extra parameters: before each optimizer step the gradient of
every masked parameter (with its L2 weight decay folded in) is set to exactly zero where the mask is
unset, so the momentum and Adam moments of untrained entries stay zero and their update is exactly
zero: ``p - lr * 0 == p`` bit for bit, with SGD (momentum, Nesterov) and Adam alike. That costs one
pass over each masked tensor per step (``torch.nn.utils.prune`` pays a masked copy in every forward
and its backward). The parameters are also projected onto the plan (zero, or the seeded initial
value) before training and after every epoch, a safety net that the tests show never changes a bit.
The model itself stays a plain module. That is the dense engine; ``compress.engine`` holds the sparse one, which
trains each masked Linear/Conv weight as a vector of its trained entries (``train`` installs it for the duration
when ``TrainSettings.engine`` asks for it).
"""
from __future__ import annotations

import hashlib
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from compress.distributed import agree, all_sum, broadcast_buffers, current_world
from compress.engine import ENGINES, INDEX_PREFIX, SparseEngine
from compress.progress import track
from compress.selection import Plan
from formats.errors import UserError

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "step", "multistep", "cosine")


PRECISIONS = ("fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainSettings:
    """Optimisation hyperparameters; the schedule is a pure function of the step, so resume is exact."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = False
    schedule: str = "cosine"
    step_size: int = 30  # epochs between decays for "step"
    milestones: list[int] = field(default_factory=list)  # epochs of decay for "multistep"
    lr_decay: float = 0.1  # factor at each decay of "step" / "multistep"
    weight_decay: float = 5e-4
    eval_every: int = 1  # epochs between test-set evaluations; the last epoch is always evaluated
    precision: str = "fp32"  # PRECISIONS: the forward and backward under autocast; weights stay float32
    engine: str = "auto"  # ENGINES: dense, or masked layers trained as vectors of their trained entries

    def validate(self) -> "TrainSettings":
        positive_ints = {"epochs": self.epochs, "batch_size": self.batch_size, "step_size": self.step_size,
                         "eval_every": self.eval_every}
        for name, value in positive_ints.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise UserError(f"lr must be a positive number, got {self.lr!r}")
        if self.engine not in ENGINES:
            raise UserError(f"unknown engine {self.engine!r}; known: {', '.join(ENGINES)}")
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown precision {self.precision!r}; known: {', '.join(PRECISIONS)}")
        if not 0 <= self.weight_decay < 1:
            raise UserError(f"weight-decay must be in [0, 1), got {self.weight_decay!r}")
        if not 0 <= self.momentum < 1:
            raise UserError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if not 0 < self.lr_decay <= 1:
            raise UserError(f"lr-decay must be in (0, 1], got {self.lr_decay!r}")
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"unknown optimizer {self.optimizer!r}; known: {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise UserError(f"unknown schedule {self.schedule!r}; known: {', '.join(SCHEDULES)}")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise UserError("nesterov needs --optimizer sgd with a momentum > 0")
        if any(not isinstance(m, int) or m < 1 for m in self.milestones):
            raise UserError(f"milestones must be positive epoch numbers, got {self.milestones!r}")
        return self

    def evaluates_after(self, epoch: int) -> bool:
        """Whether the test set is evaluated after (0-based) ``epoch``: every ``eval_every``-th and the last."""
        return (epoch + 1) % self.eval_every == 0 or epoch + 1 == self.epochs

    def lr_at(self, step: int, steps_per_epoch: int) -> float:
        """Learning rate of global step ``step`` (0-based)."""
        epoch = step // steps_per_epoch
        if self.schedule == "cosine":
            total = self.epochs * steps_per_epoch
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * step / total))
        if self.schedule == "step":
            return self.lr * self.lr_decay ** (epoch // self.step_size)
        if self.schedule == "multistep":
            return self.lr * self.lr_decay ** sum(epoch >= m for m in self.milestones)
        return self.lr


class MaskConstraint:
    """Keeps the parameters of a model on a Plan; an explicit object, nothing is attached to the model.

    The masks may move during training (``set_mask``, for dynamic sparse training); a moved entry is put
    on the plan at once: zero (prune) or its seeded initial value (freeze) where no longer trained. The
    masks are the plan's own tensors where they already sit on the parameters' devices (a large model holds
    them once); they are never changed in place: ``set_mask`` replaces a mask, so a mask handed out stays valid.
    """

    def __init__(self, model: nn.Module, plan: Plan | None, initial: dict[str, torch.Tensor] | None = None):
        self.mode = plan.mode if plan is not None else "dense"
        named = dict(model.named_parameters())
        self.names = list(plan.masks) if plan is not None else []
        self._entries = []
        for name in self.names:
            param = named[name]
            trained = plan.masks[name].to(param.device, torch.bool)
            frozen = None
            if self.mode == "freeze":
                if initial is None or name not in initial:
                    raise ValueError(f"freeze mode needs the initial value of {name}")
                frozen = initial[name].to(param.device, param.dtype)
            self._entries.append((param, trained, frozen))

    def follow_devices(self) -> None:
        """Move the masks (and frozen values) to their parameters' devices, if a model was moved since."""
        for index, (param, trained, frozen) in enumerate(self._entries):
            if trained.device != param.device:
                self._entries[index] = (param, trained.to(param.device),
                                        None if frozen is None else frozen.to(param.device))

    def parameter(self, name: str) -> nn.Parameter:
        return self._entries[self.names.index(name)][0]

    def mask(self, name: str) -> torch.Tensor:
        """The current mask of ``name`` (True = trained), on the parameter's device; do not change it in place."""
        return self._entries[self.names.index(name)][1]

    def masks(self) -> dict[str, torch.Tensor]:
        """Every current mask, on the CPU (for checkpoints); do not change them in place."""
        return {name: trained.cpu() for name, (_, trained, _) in zip(self.names, self._entries)}

    @torch.no_grad()
    def set_mask(self, name: str, mask: torch.Tensor) -> None:
        """Train ``name`` where ``mask`` is set from now on; entries no longer trained go back on the plan."""
        index = self.names.index(name)
        param, _, frozen = self._entries[index]
        trained = mask.to(param.device, torch.bool, copy=True)
        self._entries[index] = (param, trained, frozen)
        self._project_one(param, trained, frozen)

    @torch.no_grad()
    def project(self) -> None:
        """Put every masked parameter on the plan: zero (prune) or the initial value (freeze) where untrained."""
        for param, trained, frozen in self._entries:
            self._project_one(param, trained, frozen)

    @staticmethod
    def _project_one(param: torch.Tensor, trained: torch.Tensor, frozen: torch.Tensor | None) -> None:
        if frozen is None:
            param.masked_fill_(~trained, 0.0)
        else:
            param.copy_(torch.where(trained, param, frozen))

    @torch.no_grad()
    def mask_gradients(self, weight_decay: float) -> None:
        """grad <- grad + weight_decay * p, then exactly 0 where untrained: untrained entries get no update."""
        for param, trained, _ in self._entries:
            if param.grad is None:
                continue
            if weight_decay:
                param.grad.add_(param, alpha=weight_decay)
            param.grad.masked_fill_(~trained, 0.0)

    @torch.no_grad()
    def decay_trained(self, factor: float) -> None:
        """p <- p * factor at the trained entries (AdamW's decoupled decay, before its step), nowhere else."""
        for param, trained, _ in self._entries:
            if param.grad is not None:
                param.mul_(torch.where(trained, factor, 1.0))

    def dense_gradients(self, skip: Iterable[str] = ()) -> dict[str, torch.Tensor]:
        """Copies of the loss gradients of every masked parameter but those in ``skip`` (the sparse engine's, which
        forms them itself), untrained entries included (call after the backward pass and before
        ``mask_gradients``); zero for a parameter that got none."""
        skipped = set(skip)
        return {name: (param.grad.detach().clone() if param.grad is not None else torch.zeros_like(param))
                for name, (param, _, _) in zip(self.names, self._entries) if name not in skipped}


class MaskUpdater(Protocol):
    """Moves the masks during training (dynamic sparse training); called after the optimizer step."""

    def due(self, step: int) -> bool:
        """Whether the masks move after (0-based) global step ``step``; its dense gradients are kept then."""

    def update(self, step: int, constraint: MaskConstraint, optimizer: torch.optim.Optimizer,
               gradients: dict[str, torch.Tensor]) -> dict:
        """Move the masks; returns the record of the update (for metrics.jsonl)."""

    def state(self) -> dict:
        """What a checkpoint keeps of the updater (JSON)."""


@torch.no_grad()
def reset_optimizer_state(optimizer: torch.optim.Optimizer, param: torch.Tensor, where: torch.Tensor) -> None:
    """Zero the optimizer's per-entry state (momentum, Adam moments) of ``param`` where ``where`` is set."""
    for value in optimizer.state.get(param, {}).values():
        if torch.is_tensor(value) and value.shape == param.shape:
            value.masked_fill_(where.to(value.device), 0)


def make_optimizer(model: nn.Module, settings: TrainSettings, masked: list[str],
                   engine: SparseEngine | None = None) -> torch.optim.Optimizer:
    """Masked parameters get weight decay through MaskConstraint (an L2 term folded into the gradient, or AdamW's
    decoupled decay at the trained entries), the others and the sparse engine's value vectors here."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    masked_set = set(masked)
    groups = [
        {"params": [p for n, p in named if n in masked_set], "weight_decay": 0.0},
        {"params": [p for n, p in named if n not in masked_set], "weight_decay": settings.weight_decay},
        {"params": engine.values() if engine else [], "weight_decay": settings.weight_decay},
    ]
    groups = [g for g in groups if g["params"]]
    if settings.optimizer == "adam":
        return torch.optim.Adam(groups, lr=settings.lr)
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=settings.lr)
    return torch.optim.SGD(groups, lr=settings.lr, momentum=settings.momentum, nesterov=settings.nesterov)


def optimizer_state_tensors(optimizer: torch.optim.Optimizer, model: nn.Module,
                            engine: SparseEngine | None = None) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state as named tensors (``optimizer/<param>/<key>``), for safetensors; the
    sparse engine's state is a vector over the trained entries of ``<param>``, whose flat indices are
    ``optimizer-index/<param>``."""
    names = {id(p): n for n, p in model.named_parameters()}
    if engine:
        names.update(engine.state_names())
    tensors = {}
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if value is None:
                continue
            tensor = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"optimizer/{names[id(param)]}/{key}"] = tensor.detach().cpu().contiguous()
    if engine and tensors:
        tensors.update(engine.index_tensors())
    return tensors


def optimizer_state_keys(settings: TrainSettings) -> set[str]:
    """The per-parameter state keys the optimizer of ``settings`` keeps after a step (a resume checks them)."""
    probe = nn.Linear(1, 1, bias=False)
    optimizer = make_optimizer(probe, settings, [])
    probe.weight.grad = torch.ones_like(probe.weight)
    optimizer.step()
    return {key for key, value in optimizer.state[probe.weight].items() if value is not None}


def load_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, tensors: dict[str, torch.Tensor],
                         engine: SparseEngine | None = None):
    """Inverse of ``optimizer_state_tensors``; state of the wrong form for ``engine`` is a ``UserError``."""
    params = dict(model.named_parameters())
    vectors = engine.vectors() if engine else {}
    for name, layer in (engine.layers.items() if engine else ()):
        index = tensors.get(INDEX_PREFIX + name)
        has_state = any(key.startswith(f"optimizer/{name}/") for key in tensors)
        if has_state and (index is None or not torch.equal(index.to(layer.index.device, torch.int64), layer.index)):
            raise UserError(f"the checkpoint's optimizer state of {name} is not over its trained entries (it was "
                            f"written by another engine, or is damaged): resume with the run's own --engine, or "
                            f"start a new run with --overwrite")
    foreign = sorted(key[len(INDEX_PREFIX):] for key in tensors
                     if key.startswith(INDEX_PREFIX) and key[len(INDEX_PREFIX):] not in vectors)
    if foreign:
        raise UserError(f"the checkpoint's optimizer state of {foreign[0]} is a vector over its trained entries, "
                        "which this engine does not train: resume with the run's own --engine, or start a new run "
                        "with --overwrite")
    for key, value in tensors.items():
        if not key.startswith("optimizer/"):
            continue
        name, state_key = key[len("optimizer/") :].rsplit("/", 1)
        if name not in params:
            raise ValueError(f"checkpoint has optimizer state for unknown parameter {name}")
        param = vectors.get(name, params[name])
        device = "cpu" if state_key == "step" else param.device
        optimizer.state[param][state_key] = value.to(device)


def derived_seed(seed: int, *purpose: object) -> int:
    """A 63-bit seed for torch generators, derived from the run seed and a purpose (e.g. epoch)."""
    text = ":".join(str(p) for p in (seed, *purpose))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


@torch.no_grad()
def evaluate(model: nn.Module, split, batch_size: int, device: torch.device) -> dict[str, float]:
    """Mean cross-entropy and accuracy of ``model`` on a data split, in eval mode."""
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for inputs, labels in split.batches(max(batch_size, 256)):
        inputs, labels = inputs.to(device), labels.to(device)
        logits = model(inputs)
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(1) == labels).sum())
        count += len(labels)
    return {"loss": loss_sum / max(count, 1), "acc": correct / max(count, 1)}


EpochCallback = Callable[[int, dict, dict[str, torch.Tensor]], None]  # epoch, metrics, optimizer state tensors


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer, constraint: MaskConstraint,
                  inputs: torch.Tensor, labels: torch.Tensor, weight_decay: float,
                  gradients: dict[str, torch.Tensor] | None = None, batch_total: int | None = None,
                  world_size: int = 1, precision: str = "fp32",
                  scaler: torch.amp.GradScaler | None = None, engine: SparseEngine | None = None,
                  decoupled_decay: float = 0.0) -> torch.Tensor:
    """One constrained step: forward, backward, mask the gradients, optimizer step; returns the loss.

    ``gradients``, when given, receives the dense loss gradients of the masked parameters (before masking).
    Data parallel (``model`` a DistributedDataParallel, ``inputs`` this rank's shard of a global batch of
    ``batch_total`` samples): the loss is the shard's summed cross-entropy over ``batch_total`` times the world
    size, so that the ranks' averaged gradient is that of the global batch's mean loss, however it was split.
    ``precision`` bf16/fp16 runs the forward under autocast (the loss in float32); fp16 scales the loss with
    ``scaler`` and unscales the gradients before they are masked, so masks and frozen values stay exact.
    ``engine`` (the sparse engine, installed in ``model``) forms the weight gradients of its layers as vectors, is
    asked for their dense gradients when ``gradients`` is given, and writes the stepped values back into the
    weights. ``decoupled_decay`` (AdamW's lr x weight decay) shrinks the trained entries of the masked parameters.
    """
    if engine:
        engine.capture(gradients is not None)
    dtype = AUTOCAST_DTYPES.get(precision)
    with torch.autocast(inputs.device.type, dtype) if dtype is not None else nullcontext():
        logits = model(inputs)
    if batch_total is None:
        loss = F.cross_entropy(logits.float(), labels)
    else:
        loss = F.cross_entropy(logits.float(), labels, reduction="sum") * (world_size / batch_total)
    optimizer.zero_grad(set_to_none=True)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if engine and batch_total is not None and world_size > 1:
        engine.all_reduce_gradients(world_size)
    if scaler is not None:
        scaler.unscale_(optimizer)
    if gradients is not None:
        gradients.update(constraint.dense_gradients(skip=engine.layers if engine else ()))
        if engine:
            gradients.update(engine.dense_gradients())
            engine.capture(False)
    constraint.mask_gradients(weight_decay)
    if decoupled_decay:
        constraint.decay_trained(1.0 - decoupled_decay)
    if scaler is not None:
        scaler.step(optimizer)  # skipped when a gradient overflowed; the scale then shrinks
        scaler.update()
    else:
        optimizer.step()
    if engine:
        engine.write_back()
    return loss


def train(
    model: nn.Module,
    data,
    settings: TrainSettings,
    constraint: MaskConstraint,
    *,
    seed: int,
    device: torch.device,
    start_epoch: int = 0,
    optimizer_state: dict[str, torch.Tensor] | None = None,
    on_epoch_end: EpochCallback | None = None,
    on_step_end: Callable[[int], None] | None = None,
    progress: bool = True,
    channels_last: bool = True,
    mask_updater: MaskUpdater | None = None,
    loss_scale_state: dict | None = None,
) -> list[dict]:
    """Train ``model`` in place for the epochs ``start_epoch .. settings.epochs - 1``; returns metrics.

    Shuffling and dropout are seeded per epoch from ``seed``, so a run resumed at an epoch boundary
    ends with exactly the weights of an uninterrupted run (on CPU). ``channels_last=False`` keeps conv
    nets in NCHW layout on the CPU (the layout benchmark's baseline). ``mask_updater`` moves the masks
    after the steps it is due at (their dense gradients kept for it); its records go into the epoch's
    metrics as ``mask_updates``. With ``settings.precision`` fp16 the loss scaler's state is in each epoch's
    metrics (``loss_scale``); ``loss_scale_state`` (the last epoch's) restores it on resume. ``settings.engine``
    picks the engine (``compress.engine``); ``on_epoch_end`` gets the optimizer state as named tensors.
    """
    settings.validate()
    constraint.follow_devices()
    constraint.project()
    engine = SparseEngine.build(settings.engine, model, constraint, device)
    world = current_world()
    agree("masks", constraint.masks(), "at the start of training")
    scaler = torch.amp.GradScaler(device.type) if settings.precision == "fp16" else None
    if scaler is not None and loss_scale_state:
        scaler.load_state_dict(loss_scale_state)
    steps_per_epoch = math.ceil(len(data.train) / settings.batch_size)
    coupled_decay = 0.0 if settings.optimizer == "adamw" else settings.weight_decay
    history = []
    with _fast_cpu_layout(model, device, channels_last) as fast_layout, engine.installed(model):
        optimizer = make_optimizer(model, settings, constraint.names, engine)
        if optimizer_state:
            load_optimizer_state(optimizer, model, optimizer_state, engine)
        forward = model
        if world.active and any(p.requires_grad for p in model.parameters()):
            # gradients averaged over the ranks during backward; the masks act after it (the engine's value
            # vectors are not module parameters: training_step averages their gradients)
            forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        for epoch in range(start_epoch, settings.epochs):
            started = time.perf_counter()
            torch.manual_seed(derived_seed(seed, "dropout", epoch))
            shuffle = torch.Generator().manual_seed(derived_seed(seed, "shuffle", epoch))
            model.train()
            loss_sum, seen, updates = 0.0, 0, []
            batches = data.train.batches(settings.batch_size, shuffle=True, generator=shuffle, train=True)
            label = f"epoch {epoch + 1}/{settings.epochs}"
            with track(batches, steps_per_epoch, label, enabled=progress, count=lambda batch: len(batch[1])) as bar:
                for step_in_epoch, (inputs, labels) in enumerate(bar):
                    lr = settings.lr_at(epoch * steps_per_epoch + step_in_epoch, steps_per_epoch)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    batch_total = len(labels)
                    if world.active and batch_total < world.size:  # a last batch too small to share: skipped
                        continue
                    inputs, labels = world.shard(inputs, labels)
                    inputs, labels = inputs.to(device), labels.to(device)
                    if fast_layout and inputs.dim() == 4:
                        inputs = inputs.contiguous(memory_format=torch.channels_last)
                    step = epoch * steps_per_epoch + step_in_epoch
                    due = mask_updater is not None and mask_updater.due(step)
                    gradients = {} if due else None
                    loss = training_step(forward, optimizer, constraint, inputs, labels, coupled_decay,
                                         gradients, batch_total if world.active else None, world.size,
                                         settings.precision, scaler, engine,
                                         lr * settings.weight_decay if settings.optimizer == "adamw" else 0.0)
                    if due:
                        updates.append(mask_updater.update(step, constraint, optimizer, gradients))
                        engine.follow_masks(constraint, optimizer)
                        agree("masks", constraint.masks(), f"after the mask update at step {step}")
                    if on_step_end is not None:
                        on_step_end(step)
                    loss_sum += float(loss.detach()) * (batch_total / world.size if world.active else len(labels))
                    seen += len(labels)
            constraint.project()
            broadcast_buffers(model)
            loss_sum, seen = all_sum([loss_sum, seen])
            metrics = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "lr": lr}
            if mask_updater is not None:
                metrics["mask_updates"] = updates
            if scaler is not None:
                metrics["loss_scale"] = scaler.state_dict()
            if settings.evaluates_after(epoch):
                test = evaluate(model, data.test, settings.batch_size, device)
                metrics.update(test_loss=test["loss"], test_acc=test["acc"])
            if data.val is not None:
                val = evaluate(model, data.val, settings.batch_size, device)
                metrics.update(val_loss=val["loss"], val_acc=val["acc"])
            metrics["seconds"] = round(time.perf_counter() - started, 3)
            history.append(metrics)
            if on_epoch_end is not None:
                on_epoch_end(epoch, metrics, optimizer_state_tensors(optimizer, model, engine))
    agree("weights", model.state_dict(), "at the end of training")
    return history


@contextmanager
def _fast_cpu_layout(model: nn.Module, device: torch.device, allowed: bool = True):
    """Train conv nets on the CPU in channels_last layout, which oneDNN runs 1.1-2x faster (LeNet-5: ~1.5x);
    the parameters keep their identity and are handed back contiguous. Yields whether the layout changed."""
    change = allowed and device.type == "cpu" and any(p.dim() == 4 for p in model.parameters())
    if change:
        model.to(memory_format=torch.channels_last)
    try:
        yield change
    finally:
        if change:
            model.to(memory_format=torch.contiguous_format)
