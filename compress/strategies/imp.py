"""``imp``: lottery tickets by iterative magnitude pruning with rewinding (Frankle & Carbin 2019; Frankle
et al. 2020), as open_lth defines them.

Level 0 trains dense (or under the at-init plan of ``--score`` at ``--start-density``). At each level
1..N the fraction F (``--prune-fraction``) of the still-trained compressible weights with the smallest
trained magnitude is removed (``--scope global|layer``), the weights are rewound to the rewind point R
(``0`` = init, ``Nit`` = after N steps, ``Nep`` = after N epochs of level 0) and the level trains
``--epochs`` again. ``--levels N`` counts the pruning levels, so the last level trains (1 - F)^N of the
weights; ``--density D`` instead runs as many levels as needed, the last pruning to D exactly. Removed
weights are zero (prune) or back at their seeded init (freeze); with ``--interspace`` the coefficients
are pruned (IP-IMP). Branches (``--branch randomize,reinit``) train the controls of open_lth's lottery
branches beside every level after 0: the same per-layer counts at random positions, or the same mask
from fresh weights.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from compress.selection import Plan, _top_k_flat, top_k_over
from compress.strategies import LevelContext, LevelStart, Strategy, register
from compress.training import derived_seed
from formats.errors import UserError

BRANCHES = ("randomize", "reinit")
_REWIND = re.compile(r"^(0|[1-9][0-9]*(it|ep))$")


@dataclass(frozen=True)
class ImpOptions:
    levels: int | None = field(default=None, metadata={
        "help": "Pruning levels after level 0; the last level trains (1 - F)^N of the weights. Give --levels or "
                "--density (the target; the last level prunes to it exactly)."})
    prune_fraction: float = field(default=0.2, metadata={
        "help": "Fraction F of the still-trained weights removed at each level, those of smallest trained "
                "magnitude. [default: 0.2]"})
    rewind: str = field(default="0", metadata={
        "help": "Rewind point: 0 (init, the original lottery ticket), Nit (after N steps) or Nep (after N epochs) "
                "of level 0. [default: 0]"})
    branch: str = field(default="", metadata={
        "help": "Controls trained beside every level after 0, comma-separated: randomize (same per-layer counts, "
                "random positions) and/or reinit (same mask, fresh seeded weights). [default: none]"})
    start_density: float = field(default=1.0, metadata={
        "help": "Density of level 0: 1 trains it dense; below 1 it starts from the at-init plan of --score. "
                "[default: 1]"})


def rewind_steps(rewind: str, steps_per_epoch: int) -> int:
    """``0`` -> 0, ``Nit`` -> N, ``Nep`` -> N x steps per epoch."""
    if rewind == "0":
        return 0
    count = int(rewind[:-2])
    return count * steps_per_epoch if rewind.endswith("ep") else count


def _keep_top(scores: dict[str, torch.Tensor], keep: dict[str, int] | int) -> dict[str, torch.Tensor]:
    """Masks of the ``keep`` highest scores: over all tensors (an int) or per tensor (a dict)."""
    if isinstance(keep, dict):
        return {name: _top_k_flat(s.flatten().double(), keep[name]).reshape(s.shape) for name, s in scores.items()}
    chosen = top_k_over(list(scores.values()), keep)
    return {name: mask.reshape(s.shape) for (name, s), mask in zip(scores.items(), chosen)}


def _keep(trained: int, fraction: float, target: int | None) -> int:
    """Entries kept of ``trained`` by one level: F of them removed, and at least one while above the target."""
    removed = round(fraction * trained)
    if target is None:
        return trained - removed
    return max(trained - max(removed, 1 if trained > target else 0), target)


def next_counts(scope: str, fraction: float, density: float | None, sizes: dict[str, int],
                trained: dict[str, int]) -> dict[str, int] | int | None:
    """The counts the next level keeps (per layer with layer scope, else one total); None when the level would
    change nothing (the target is reached)."""
    if scope == "layer":
        keep = {n: _keep(trained[n], fraction, None if density is None else round(density * sizes[n])) for n in sizes}
        return None if keep == trained else keep
    total = sum(trained.values())
    keep = _keep(total, fraction, None if density is None else round(density * sum(sizes.values())))
    return None if keep == total else keep


@register("imp")
class IterativeMagnitudePruning(Strategy):
    description = "lottery tickets: train, prune the smallest trained weights, rewind, repeat (levels)"
    Options = ImpOptions
    multilevel = True

    def check(self, config, options: ImpOptions) -> None:
        if config.scope == "erk":
            raise UserError("--method imp prunes by trained magnitude over all layers (--allocation global) or in "
                            "every layer (--allocation uniform); ERK allocation is for at-init and dynamic methods")
        if (options.levels is None) == (config.density is None):
            raise UserError("--method imp needs --levels N (pruning levels) or --density D (the target), not both "
                            "and not neither")
        if options.levels is not None and (isinstance(options.levels, bool) or not isinstance(options.levels, int)
                                           or not 1 <= options.levels <= 1000):
            raise UserError(f"--levels must be an integer from 1 to 1000, got {options.levels!r}")
        if isinstance(options.prune_fraction, bool) or not isinstance(options.prune_fraction, (int, float)) \
                or not 0 < options.prune_fraction < 1:
            raise UserError(f"--prune-fraction must be in (0, 1), got {options.prune_fraction!r}")
        if not isinstance(options.rewind, str) or not _REWIND.match(options.rewind):
            raise UserError(f"--rewind must be 0, Nit (after N steps) or Nep (after N epochs), e.g. 500it or 1ep; "
                            f"got {options.rewind!r}")
        if options.rewind.endswith("ep") and int(options.rewind[:-2]) > config.epochs:
            raise UserError(f"--rewind {options.rewind} is after the end of level 0 ({config.epochs} epochs); "
                            "rewind to an earlier point")
        unknown = [b for b in self.branches(options) if b not in BRANCHES]
        if unknown:
            raise UserError(f"unknown --branch {', '.join(unknown)}; known: {', '.join(BRANCHES)}")
        if isinstance(options.start_density, bool) or not isinstance(options.start_density, (int, float)) \
                or not 0 < options.start_density <= 1:
            raise UserError(f"--start-density must be in (0, 1], got {options.start_density!r}")
        if options.start_density < 1 and not config.score_names():
            raise UserError("--start-density below 1 needs an at-init --score for level 0's plan (e.g. --score snip)")
        if config.density is not None and config.density >= options.start_density:
            raise UserError(f"--density {config.density:g} is not below level 0's density {options.start_density:g}: "
                            "there is nothing to prune")

    def check_model(self, config, options: ImpOptions, sizes: dict[str, int], steps_per_epoch: int) -> None:
        rewind = self.rewind_step(options, steps_per_epoch)
        if rewind > config.epochs * steps_per_epoch:
            raise UserError(f"--rewind {options.rewind} is after the end of level 0 ({config.epochs * steps_per_epoch} "
                            "steps); rewind to an earlier point")
        if options.levels is None or options.start_density < 1:  # level 0's counts come from its at-init plan
            return
        if config.scope != "layer":
            sizes = {"all": sum(sizes.values())}
        trained = dict(sizes)
        for level in range(1, options.levels + 1):
            keep = next_counts(config.scope, options.prune_fraction, None, sizes, trained)
            if keep is None:
                raise UserError(f"--prune-fraction {options.prune_fraction:g} removes no weight at level {level} "
                                f"(F x trained rounds to 0); raise --prune-fraction or ask for fewer --levels")
            trained = keep if isinstance(keep, dict) else {"all": keep}

    def initial_density(self, config, options: ImpOptions) -> float | None:
        return options.start_density if options.start_density < 1 else None

    def rewind_step(self, options: ImpOptions, steps_per_epoch: int) -> int:
        return rewind_steps(options.rewind, steps_per_epoch)

    def branches(self, options: ImpOptions) -> list[str]:
        return [b.strip() for b in options.branch.split(",") if b.strip()]

    def next_level(self, context: LevelContext, level: int, trained: dict[str, torch.Tensor], plan: Plan | None,
                   rewind_state: dict[str, torch.Tensor] | None) -> LevelStart | None:
        options, config = context.options, context.config
        if options.levels is not None and level >= options.levels:
            return None
        current = {n: plan.masks[n].cpu() if plan is not None else torch.ones(context.shapes[n], dtype=torch.bool)
                   for n in context.params}
        keep = self._keep_counts(context, current)
        if keep is None:
            return None
        scores = {n: torch.where(current[n], trained[n].detach().cpu().abs().double(), torch.tensor(-1.0, dtype=torch.float64))
                  for n in context.params}
        masks = _keep_top(scores, keep)
        label = f"imp(level {level + 1}, prune {options.prune_fraction:g}, rewind {options.rewind})"
        return LevelStart(Plan(config.mode, masks, config.density or self._density(masks), config.scope, label),
                          dict(rewind_state))

    def _keep_counts(self, context: LevelContext, current: dict[str, torch.Tensor]) -> dict[str, int] | int | None:
        """How many entries the next level keeps (per layer with layer scope); None when the target is reached."""
        sizes = {name: mask.numel() for name, mask in current.items()}
        trained = {name: int(torch.count_nonzero(mask)) for name, mask in current.items()}
        return next_counts(context.config.scope, context.options.prune_fraction, context.config.density, sizes, trained)

    @staticmethod
    def _density(masks: dict[str, torch.Tensor]) -> float:
        return sum(int(torch.count_nonzero(m)) for m in masks.values()) / sum(m.numel() for m in masks.values())

    def branch_start(self, context: LevelContext, branch: str, level: int, plan: Plan,
                     rewind_state: dict[str, torch.Tensor] | None) -> LevelStart:
        seed = context.config.seed
        if branch == "randomize":
            masks = {}
            for name, mask in plan.masks.items():
                generator = torch.Generator().manual_seed(derived_seed(seed, "randomize", level, name))
                chosen = torch.randperm(mask.numel(), generator=generator)[: int(torch.count_nonzero(mask))]
                flat = torch.zeros(mask.numel(), dtype=torch.bool)
                flat[chosen] = True
                masks[name] = flat.reshape(mask.shape)
            label = f"{plan.score}, randomized positions"
            return LevelStart(Plan(plan.mode, masks, plan.density, plan.scope, label), dict(rewind_state))
        if branch == "reinit":
            fresh = context.fresh_state(derived_seed(seed, "reinit", level) % 2**32)
            return LevelStart(Plan(plan.mode, dict(plan.masks), plan.density, plan.scope, f"{plan.score}, reinitialized"),
                              fresh)
        raise UserError(f"unknown branch {branch!r}; known: {', '.join(BRANCHES)}")
