"""Training strategies: who owns the masks over time. One file per strategy plus one registry line.

A run trains one or more *levels*; a level is a complete training of ``--epochs`` epochs under fixed
masks, started from given weights. A strategy decides the masks and the starting weights of each
level: ``oneshot`` (every at-init method) trains one level under the at-init plan; ``imp`` (lottery
tickets) prunes by magnitude between levels and rewinds; ``set`` and ``rigl`` (dynamic sparse training)
move the masks every few steps within their one level through a mask updater. The training loop only enforces the current
masks (``compress.training.MaskConstraint``: prune = exactly zero, freeze = bit-identical to the
seeded init) and the runner calls the strategy at level boundaries. A strategy's options are a
dataclass whose defaults are no-ops; its fields become CLI options (``--levels``, ...), documented by
their ``help`` metadata, and are part of the run's config.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from formats.registry import Registry
from compress.selection import Plan
from formats.errors import UserError


@dataclass(frozen=True)
class NoOptions:
    """A strategy without options of its own."""


@dataclass
class LevelContext:
    """What a strategy sees at a level boundary: plain data, nothing it could keep hidden state in."""

    config: Any  # the resolved RunConfig
    options: Any  # the strategy's options dataclass
    params: list[str]  # the compressible parameters (masks are over these)
    shapes: dict[str, tuple[int, ...]]
    initial_state: dict[str, torch.Tensor]  # the model's state at init (the run seed), on the CPU
    fresh_state: Callable[[int], dict[str, torch.Tensor]]  # a freshly initialised state for another seed


@dataclass
class LevelStart:
    """The masks of a level (None: dense) and the weights it starts from (a full state dict)."""

    plan: Plan | None
    state: dict[str, torch.Tensor]


class Strategy:
    """The interface every strategy implements; the defaults are those of a single-level strategy."""

    description: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    multilevel: ClassVar[bool] = False  # levels are kept in sub-directories level_0, level_1, ...
    moving_masks: ClassVar[bool] = False  # the masks move within a level (dynamic sparse training)
    default_scope: ClassVar[str] = "global"  # the scope (allocation) when none is given

    def check(self, config, options) -> None:
        """Raise ``UserError`` for options that do not fit the rest of the config."""

    def check_model(self, config, options, sizes: dict[str, int], steps_per_epoch: int) -> None:
        """Raise ``UserError`` for options that do not fit the model (its compressible sizes) or the data; called
        before the run directory is made."""

    def initial_density(self, config, options) -> float | None:
        """The density of level 0's at-init selection (None: level 0 trains every weight)."""
        return config.density if config.score_names() and config.density < 1.0 else None

    def rewind_step(self, options, steps_per_epoch: int) -> int | None:
        """The step of level 0 after which the weights are kept for later levels (None: not needed)."""
        return None

    def next_level(self, context: LevelContext, level: int, trained: dict[str, torch.Tensor], plan: Plan | None,
                   rewind_state: dict[str, torch.Tensor] | None) -> LevelStart | None:
        """The level after ``level`` (whose final weights are ``trained``), or None when the run is done."""
        return None

    def mask_updater(self, config, options, steps_per_epoch: int, start_step: int, state: dict | None):
        """The ``compress.training.MaskUpdater`` that moves the masks during a level starting at global step
        ``start_step`` (``state``: what the checkpoint kept of it); None: the masks stay fixed in a level."""
        return None

    def branches(self, options) -> list[str]:
        """Control branches trained beside the main line at every level after 0."""
        return []

    def branch_start(self, context: LevelContext, branch: str, level: int, plan: Plan,
                     rewind_state: dict[str, torch.Tensor] | None) -> LevelStart:
        raise UserError(f"unknown branch {branch!r}")


STRATEGIES: Registry[Strategy] = Registry("strategy")


def register(name: str):
    """Class decorator: register one instance of the strategy class under ``name``."""

    def add(cls: type[Strategy]) -> type[Strategy]:
        STRATEGIES.register(name)(cls())
        return cls

    return add


def option_fields(strategy: Strategy) -> list[dataclasses.Field]:
    return list(dataclasses.fields(strategy.Options))


def all_option_names() -> dict[str, list[str]]:
    """Every strategy option name, with the strategies that take it."""
    names: dict[str, list[str]] = {}
    for name in STRATEGIES.names():
        for field in option_fields(STRATEGIES.get(name)):
            names.setdefault(field.name, []).append(name)
    return names


def build_options(strategy_name: str, values: dict):
    """The strategy's options dataclass from ``values``; an option of another strategy is a ``UserError``."""
    strategy = STRATEGIES.get(strategy_name)
    known = {field.name for field in option_fields(strategy)}
    foreign = sorted(set(values) - known)
    if foreign:
        owners = all_option_names()
        hints = [f"--{n.replace('_', '-')} ({'/'.join(owners.get(n, ['no strategy']))})" for n in foreign]
        raise UserError(f"{', '.join(hints)} do(es) not apply to the {strategy_name} strategy of this method; "
                        "drop it, or choose a method of that strategy")
    return strategy.Options(**values)


from compress.strategies import imp, oneshot, rigl, set_strategy  # noqa: E402,F401  (registration)

__all__ = ["STRATEGIES", "Strategy", "LevelContext", "LevelStart", "NoOptions", "build_options", "option_fields",
           "register"]
