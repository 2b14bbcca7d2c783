"""Dynamic sparse training (the machinery shared by ``set`` and ``rigl``): the per-layer counts stay fixed,
which entries are trained moves during training.

Every ``--update-every T`` steps, before the fraction ``--update-until U`` of the training steps, each
layer drops the fraction ``f_t = f/2 (1 + cos(pi t / T_end))`` (``--drop-fraction f``; t = steps done,
T_end = U x all steps) of its trained entries, those of smallest magnitude, and grows as many among the
entries that were untrained before the update (so the dropped and grown sets are disjoint and the
mask moves by exactly that many): SET at seeded random positions, RigL where the dense loss gradient of
the batch just trained is largest. RigL's reference code may regrow an entry it just dropped; here a
dropped entry waits at least one update, which keeps every update's count exact.

A dropped entry goes back on the plan at once (zero in prune mode, its seeded initial value in freeze
mode) and a grown one starts from there: zero (prune) or its seeded init (freeze), so the artifact still
stores only the final trained values. The optimizer state (momentum, Adam moments) of dropped and grown
entries is zeroed, so a grown entry starts without momentum and a dropped one does not move. Updates are
stateless but for their count: SET's positions come from a generator seeded by (run seed, step, layer),
so a resumed run draws exactly what an uninterrupted one does.

The dense gradient: on the dense engine every step already computes the gradient of every weight (the
training loop masks it afterwards), so at update steps it is copied before masking (one copy of the masked
weights). On the sparse engine (``compress.engine``) a step forms only the trained entries' gradients; at an
update step each engine layer forms its dense weight gradient too (one dense product, what a dense step
pays), and only then. Either way it is ranked per layer on the CPU, and a mask update moves the optimizer
state of the kept entries to their new places in the engine's vectors.
"""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from compress.selection import _top_k_flat
from compress.strategies import Strategy
from compress.training import MaskConstraint, derived_seed, reset_optimizer_state
from formats.errors import UserError


@dataclass(frozen=True)
class DynamicOptions:
    update_every: int = field(default=100, metadata={
        "help": "Steps between two mask updates (drop the weakest trained weights, grow as many). [default: 100]"})
    update_until: float = field(default=0.75, metadata={
        "help": "Fraction of the training steps after which the mask stops moving. [default: 0.75]"})
    drop_fraction: float = field(default=0.3, metadata={
        "help": "Fraction f of each layer's trained weights moved at the first update; it decays as "
                "f/2 (1 + cos(pi t / T_end)). [default: 0.3]"})


def drop_fraction_at(options: DynamicOptions, done: int, until: int) -> float:
    """The cosine-decayed fraction moved after ``done`` steps, the updates ending at step ``until``."""
    return options.drop_fraction / 2 * (1 + math.cos(math.pi * done / until))


def top_where(score: torch.Tensor, allowed: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` highest-scoring entries among ``allowed`` (flat, CPU; NaN ranks lowest); ties go to the lower
    index. Only the allowed entries are ranked, so exactly ``min(k, allowed)`` are chosen whatever the scores."""
    index = torch.nonzero(allowed).flatten()
    chosen = _top_k_flat(torch.nan_to_num(score[index].double(), nan=-math.inf), k)
    result = torch.zeros_like(allowed)
    result[index[chosen]] = True
    return result


def update_until_step(options: DynamicOptions, total_steps: int) -> int:
    return math.floor(options.update_until * total_steps)


@dataclass
class MaskSchedule:
    """The updater a dynamic strategy hands the training loop: when the masks move, and how."""

    strategy: "DynamicSparse"
    options: DynamicOptions
    total_steps: int
    seed: int
    updates: int = 0  # updates done so far (kept in every checkpoint)

    @property
    def until(self) -> int:
        return update_until_step(self.options, self.total_steps)

    def due(self, step: int) -> bool:
        done = step + 1
        return done % self.options.update_every == 0 and done < self.until  # at T_end the fraction is 0

    def updates_before(self, step: int) -> int:
        """How many updates an uninterrupted run has done before (0-based) global step ``step``."""
        return max(0, min(step, self.until - 1)) // self.options.update_every

    def state(self) -> dict:
        return {"updates": self.updates}

    def update(self, step: int, constraint: MaskConstraint, optimizer: torch.optim.Optimizer,
               gradients: dict[str, torch.Tensor]) -> dict:
        done = step + 1
        fraction = drop_fraction_at(self.options, done, self.until)
        dropped, grown, active_total = {}, {}, 0
        for name in constraint.names:
            param = constraint.parameter(name)
            mask = constraint.mask(name).detach().cpu().flatten()
            active = int(torch.count_nonzero(mask))
            active_total += active
            k = min(round(fraction * active), mask.numel() - active)
            dropped[name] = grown[name] = k
            if k == 0:
                continue
            magnitude = param.detach().abs().cpu().flatten()
            if not bool(torch.isfinite(magnitude[mask]).all()):
                raise UserError(f"the trained weights of {name} are not finite at step {done} (training diverged): "
                                "lower the learning rate")
            drop = top_where(-magnitude, mask, k)
            growth = self.strategy.grow_scores(name, gradients[name].detach().cpu().flatten(),
                                               self._generator(done, name))
            grow = top_where(growth, ~mask, k)
            moved = mask & ~drop | grow
            counts = tuple(int(torch.count_nonzero(t)) for t in (moved, drop, grow))
            if counts != (active, k, k) or bool((drop & grow).any()):
                raise RuntimeError(f"mask update of {name} at step {done} broke its count")  # a bug, not a user error
            constraint.set_mask(name, moved.reshape(param.shape))
            reset_optimizer_state(optimizer, param, (drop | grow).reshape(param.shape))
        self.updates += 1
        moved_total = sum(dropped.values())
        return {"step": done, "drop_fraction": round(fraction, 6), "dropped": dropped, "grown": grown,
                "moved": moved_total / active_total if active_total else 0.0}

    def _generator(self, done: int, name: str) -> torch.Generator:
        return torch.Generator().manual_seed(derived_seed(self.seed, self.strategy.name, "grow", done, name))


class DynamicSparse(Strategy, abc.ABC):
    """Base of the dynamic sparse strategies (never registered itself): subclasses name themselves and say
    where to grow."""

    name: ClassVar[str] = ""
    Options = DynamicOptions
    default_scope = "erk"
    moving_masks = True

    @abc.abstractmethod
    def grow_scores(self, name: str, gradient: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Scores of the flat entries of ``name`` for growing (the highest untrained ones are grown)."""

    def check(self, config, options: DynamicOptions) -> None:
        if config.density is None or config.density >= 1:
            raise UserError(f"--method {config.method} needs --density D below 1 (the fraction of weights trained "
                            "at any time)")
        if isinstance(options.update_every, bool) or not isinstance(options.update_every, int) \
                or options.update_every < 1:
            raise UserError(f"--update-every must be a positive number of steps, got {options.update_every!r}")
        for flag, value in (("--update-until", options.update_until), ("--drop-fraction", options.drop_fraction)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise UserError(f"{flag} must be in (0, 1], got {value!r}")

    def check_model(self, config, options: DynamicOptions, sizes: dict[str, int], steps_per_epoch: int) -> None:
        until = update_until_step(options, config.epochs * steps_per_epoch)
        if until <= options.update_every:
            from compress.run.pipeline import log

            log(f"warning: --update-every {options.update_every} is more than the {until} steps before "
                f"--update-until {options.update_until:g} ({config.epochs} epochs of {steps_per_epoch} steps): "
                "the mask never moves; lower --update-every or train longer")

    def initial_density(self, config, options) -> float | None:
        return config.density

    def mask_updater(self, config, options: DynamicOptions, steps_per_epoch: int, start_step: int,
                     state: dict | None) -> MaskSchedule:
        schedule = MaskSchedule(self, options, config.epochs * steps_per_epoch, config.seed)
        expected = schedule.updates_before(start_step)
        stored = (state or {}).get("updates", 0 if start_step == 0 else None)
        if stored != expected:
            raise UserError(f"the checkpoint records {stored!r} mask updates where {expected} were due before step "
                            f"{start_step}: it is damaged or from another version; start a new run with --overwrite")
        schedule.updates = expected
        return schedule
