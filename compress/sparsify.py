"""Sparsify any model in a few lines and keep its masks in your own training loop.

    sparse = compress.sparsify(model, method="freezenet", density=0.01, batches=batches, seed=0)
    sparse.attach(optimizer)                 # masks kept on every optimizer.step(), whatever the optimizer
    for x, y in loader:                      # your own loop
        loss = F.cross_entropy(model(x), y); loss.backward()
        optimizer.step(); optimizer.zero_grad()
    compress.save(model, "model.cpk", sparse)

Without ``attach``, call ``sparse.before_step()`` just before and ``sparse.after_step()`` just after every
``optimizer.step()``. ``before_step`` zeroes the gradients of untrained entries; ``after_step`` puts untrained entries back
exactly on the plan (zero, or the seeded init), which undoes what an optimizer changes without a gradient:
coupled weight decay of SGD/Adam (which also feeds their momentum there, harmlessly) and AdamW's
decoupled decay. The masked layers are ``SUPPORTED_LAYERS`` (their weights, and biases with
``include_bias``); every other parameter trains densely; tied weights are refused. Freeze mode needs
the seeded init, so ``sparsify`` initialises the model from ``seed`` (``init=True``, the default: every
conv/linear weight and bias from the portable generator, norm layers to weight 1, bias 0 and fresh
running statistics; every method here starts from the init) or, with ``init=False``, keeps the model's
weights: any values in prune mode, only the seeded init itself in freeze mode. Move the model to its
device before or after ``sparsify``: the masks follow it. Read the current masks from ``sparse.masks``
(``sparse.plan`` holds those it started with).

Strategies whose masks change: ``set``/``rigl`` move them after the due steps of ``after_step`` (give
``total_steps``); ``imp`` starts dense (level 0) and ``sparse.next_level(fraction, rewind=state)``
returns the next level's masks after a level of your training.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from torch import nn

from compress.errors import UserError
from compress.init import WEIGHTED_LAYERS, initial_values, initialise
from compress.methods import METHODS
from compress.params import compressible_parameters
from compress.scores import score as compute_score
from compress.selection import SELECTORS, Plan, check_density, select_with
from compress.strategies import STRATEGIES, build_options
from compress.training import MaskConstraint, reset_optimizer_state
from formats.rng import check_seed

SUPPORTED_LAYERS = WEIGHTED_LAYERS  # Conv1d, Conv2d, Conv3d, Linear
DATA_FREE_SCORES = ("random", "magnitude", "synflow")


@dataclass
class Sparse:
    """A model's masks, kept in your loop: the plan, the constraint that enforces it, and (for set/rigl) the
    updater that moves it. Plain data; nothing is attached to the model."""

    model: nn.Module
    plan: Plan
    seed: int
    method: str
    constraint: MaskConstraint
    updater: object | None = None  # compress.training.MaskUpdater for set/rigl
    optimizer: torch.optim.Optimizer | None = None
    steps: int = 0  # optimizer steps done under these masks
    updates: list[dict] = field(default_factory=list)  # the records of every mask update (set/rigl)
    _gradients: dict | None = None
    _handles: list = field(default_factory=list)

    @property
    def mode(self) -> str:
        return self.plan.mode

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """The current masks (True = trained), on the CPU."""
        return self.constraint.masks()

    @property
    def trained(self) -> int:
        return sum(int(torch.count_nonzero(m)) for m in self.masks.values())

    @property
    def total(self) -> int:
        return sum(m.numel() for m in self.masks.values())

    @property
    def density(self) -> float:
        return self.trained / self.total if self.total else 1.0

    def before_step(self) -> None:
        """Call after ``loss.backward()``, before ``optimizer.step()``: untrained entries get no gradient."""
        self.constraint.follow_devices()  # the model may have moved (model.cuda()) since sparsify
        if self.updater is not None and self.updater.due(self.steps):
            self._gradients = self.constraint.dense_gradients()  # RigL grows where these are largest
        self.constraint.mask_gradients(0.0)

    def after_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Call after ``optimizer.step()``: untrained entries back exactly on the plan; set/rigl move the masks
        when an update is due (``optimizer``, or the attached one, has its state zeroed where they moved)."""
        self.constraint.project()
        if self._gradients is not None:
            optimizer = optimizer or self.optimizer
            if optimizer is None:
                raise UserError(f"--method {self.method} moves the masks and resets the optimizer state where they "
                                "moved: pass the optimizer, sparse.after_step(optimizer), or sparse.attach(optimizer)")
            self.updates.append(self.updater.update(self.steps, self.constraint, optimizer, self._gradients))
            self._gradients = None
        self.steps += 1

    def attach(self, optimizer: torch.optim.Optimizer) -> "Sparse":
        """Run ``before_step``/``after_step`` around every ``optimizer.step()`` (torch's optimizer step hooks,
        removed by ``detach``); returns ``self``."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise UserError(f"attach() takes a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.detach()
        self.optimizer = optimizer
        self._handles = [optimizer.register_step_pre_hook(lambda *_: self.before_step()),
                         optimizer.register_step_post_hook(lambda opt, *_: self.after_step(opt))]
        return self

    def detach(self) -> None:
        """Remove the hooks ``attach`` registered."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def next_level(self, fraction: float = 0.2, rewind: dict[str, torch.Tensor] | None = None,
                   scope: str | None = None) -> "Sparse":
        """Lottery tickets (IMP) in your loop: after a level of training, remove the fraction ``fraction`` of
        the still-trained weights with the smallest magnitude (``scope`` global or layer, default the plan's),
        load ``rewind`` (a state dict, e.g. saved at init or after k steps) and return the next level's
        ``Sparse`` (attached to the same optimizer; with ``rewind`` its state is cleared, as a fresh optimizer's,
        else it is zeroed where weights were removed)."""
        from compress.strategies.imp import _keep_top, next_counts

        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
            raise UserError(f"fraction must be in (0, 1), got {fraction!r}")
        scope = scope or ("layer" if self.plan.scope == "layer" else "global")
        if scope not in ("global", "layer"):
            raise UserError(f"next_level prunes over all layers (global) or per layer (layer), got {scope!r}")
        current = self.masks
        sizes = {name: mask.numel() for name, mask in current.items()}
        trained = {name: int(torch.count_nonzero(mask)) for name, mask in current.items()}
        counts = next_counts(scope, fraction, None, sizes, trained)
        if counts is None:
            raise UserError(f"fraction {fraction:g} removes no weight (F x trained rounds to 0); raise it")
        scores = {name: torch.where(mask, self.constraint.parameter(name).detach().cpu().abs().double(),
                                    torch.tensor(-1.0, dtype=torch.float64)) for name, mask in current.items()}
        masks = _keep_top(scores, counts)
        if rewind is not None:
            try:
                self.model.load_state_dict(rewind)
            except (RuntimeError, TypeError, AttributeError) as error:
                raise UserError(f"rewind= is not a state dict of this model: {' '.join(str(error).split())[:300]}") \
                    from None
            if self.optimizer is not None:
                self.optimizer.state.clear()  # as open_lth: every level trains with a fresh optimizer state
        self.detach()
        device = next(iter(self.constraint.parameter(n) for n in self.constraint.names)).device
        plan = Plan(self.plan.mode, {n: m.to(device) for n, m in masks.items()},
                    sum(int(torch.count_nonzero(m)) for m in masks.values()) / sum(sizes.values()), scope,
                    f"imp(prune {fraction:g})")
        following = _constrained(self.model, plan, self.seed, self.method)
        if self.optimizer is not None:
            for name, mask in masks.items():
                reset_optimizer_state(self.optimizer, self.constraint.parameter(name), current[name] & ~mask)
            following.attach(self.optimizer)
        return following


def _constrained(model: nn.Module, plan: Plan, seed: int, method: str, updater=None) -> Sparse:
    initial = initial_values(model, seed, list(plan.masks)) if plan.mode == "freeze" else None
    constraint = MaskConstraint(model, plan, initial)
    constraint.project()
    return Sparse(model, plan, seed, method, constraint, updater)


def sparsify(model: nn.Module, method: str = "freezenet", density: float | None = None, *,
             sparsity: float | None = None, batches=(), seed: int = 0, mode: str | None = None,
             score: str | None = None, scores: list[str] | None = None, gamma: float = 0.5,
             scope: str | None = None, init: bool = True, include_bias: bool = False,
             total_steps: int | None = None, input_shape: tuple[int, ...] | None = None,
             score_mode: str = "eval", **strategy_options) -> Sparse:
    """Score and select the trained entries of ``model``'s conv/linear layers and return the ``Sparse`` that keeps
    them in your loop. ``method``: any method of ``compress train`` (freezenet, snip, grasp, synflow, cops,
    magnitude, random, set, rigl, imp); ``batches``: (inputs, labels) pairs for the data-driven scores
    (SNIP scores one batch of 100, as its reference); ``scope``: global, layer or erk; ``init``: see the
    module docstring. set/rigl take ``total_steps`` and their options (``update_every=``, ``update_until=``,
    ``drop_fraction=``); data-free SynFlow takes ``input_shape`` (e.g. (3, 32, 32)) when no batch is given;
    ``score_mode``: the network's mode while SNIP or GraSP score it (eval, as the references, or train)."""
    if not isinstance(model, nn.Module):
        raise UserError(f"sparsify takes a torch.nn.Module, got {type(model).__name__}")
    seed = check_seed(seed)
    preset = METHODS.get(method)
    strategy = STRATEGIES.get(preset.strategy)
    density = _density(density, sparsity, preset.strategy)
    mode = mode or preset.mode
    scope = scope or strategy.default_scope
    params = compressible_parameters(model, include_bias)
    if not params:
        raise UserError(f"{type(model).__name__} has no layer sparsify can mask: it masks the weights of "
                        f"{', '.join(t.__name__ for t in SUPPORTED_LAYERS)} layers (other parameters train densely)")
    shared = [name for name in params if name not in dict(model.named_parameters())]
    if shared:
        raise UserError(f"{', '.join(shared[:3])} share their tensor with another layer (tied weights), which "
                        "sparsify does not support: untie them, or leave those layers out of the model")
    options = build_options(preset.strategy, strategy_options)  # every check before the model is touched
    selector = SELECTORS.get(preset.selector)
    names = list(scores or preset.scores) if selector.arity > 1 else [score or preset.score]
    batches = list(batches)
    if preset.strategy != "imp":
        if names == [None]:
            raise UserError(f"method {method!r} trains every weight: there is nothing to sparsify")
        needs_data = [name for name in names if name not in DATA_FREE_SCORES]
        if needs_data and not batches:
            raise UserError(f"the {' and '.join(needs_data)} score(s) need data: pass batches=[(inputs, labels), "
                            "...] (SNIP's reference scores one batch of 100)")
        if any(not isinstance(batch, (tuple, list)) or len(batch) != 2 for batch in batches):
            raise UserError("batches= must be (inputs, labels) pairs")
        if "synflow" in names and not batches and input_shape is None:
            raise UserError("synflow is data-free but needs the input shape: pass input_shape=(C, H, W) (or one batch)")
    if strategy.moving_masks:
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise UserError(f"method {method!r} moves the masks on a schedule over the training: pass total_steps= "
                            "(the number of optimizer steps you will train)")
        strategy.check(SimpleNamespace(density=density, method=method), options)
    _prepare_weights(model, params, seed, mode, init)
    if preset.strategy == "imp":  # level 0 trains every weight; next_level prunes
        masks = {name: torch.ones_like(model.get_parameter(name), dtype=torch.bool) for name in params}
        return _constrained(model, Plan(mode, masks, 1.0, scope, "dense (level 0)"), seed, method)
    if "synflow" in names and not batches:
        batches = [(torch.zeros(1, *input_shape), torch.zeros(1, dtype=torch.long))]
    device = next(model.parameters()).device
    batches = [(x.to(device), None if y is None else y.to(device)) for x, y in batches]
    computed = [compute_score(model, name, batches, params, density=density, seed=seed, scope=scope, mode=score_mode)
                for name in names]
    plan = select_with(preset.selector, computed, density, scope, mode,
                       {"gamma": gamma} if "gamma" in selector.defaults else {}, names)
    plan.masks = {name: mask.to(device) for name, mask in plan.masks.items()}
    if plan.trained == 0:
        raise UserError(f"density {density:g} trains no weight of the {plan.total:,} in {type(model).__name__}; use "
                        f"density={1 / plan.total:.3g} or more")
    collapsed = plan.collapsed_layers()
    if collapsed:
        warnings.warn(f"layer collapse: {', '.join(collapsed)} have no trained weight at density {density:g} "
                      f"({scope} scope); raise the density, use scope='layer', or another score", stacklevel=2)
    updater = None
    if strategy.moving_masks:
        updater = strategy.mask_updater(SimpleNamespace(epochs=total_steps, seed=seed), options, 1, 0, None)
    return _constrained(model, plan, seed, method, updater)


def _density(density, sparsity, strategy: str) -> float:
    if density is not None and sparsity is not None:
        raise UserError("give density (the fraction trained) or sparsity (= 1 - density), not both")
    if sparsity is not None:
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
            raise UserError(f"sparsity must be in [0, 1) (the fraction of weights not trained), got {sparsity!r}")
        density = 1.0 - sparsity
    if density is None:
        if strategy == "imp":
            return 1.0
        raise UserError("give the fraction of weights to train: density=D or sparsity=S (= 1 - D)")
    return check_density(density)


@torch.no_grad()
def _prepare_weights(model: nn.Module, params: list[str], seed: int, mode: str, init: bool) -> None:
    """Initialise the model from the seed, or check that the kept weights fit the mode."""
    if init:
        initialise(model, seed)
        return
    if mode != "freeze":
        return
    initial = initial_values(model, seed, params)
    differ = [name for name in params if not torch.equal(model.get_parameter(name).detach(), initial[name])]
    if differ:
        raise UserError(f"freeze mode keeps untrained weights at their seeded init, but {', '.join(differ[:3])}"
                        f"{' ...' if len(differ) > 3 else ''} differ from the init of seed {seed}: pass init=True (the "
                        "seeded init replaces them), or mode='prune' to keep your weights")
