"""Pruning scores: one module per score, registered in ``SCORES``; higher score = more worth training.

A score function takes ``(model, batches, params, context)`` and returns a dict from parameter name to
a tensor of the parameter's shape. It gets the caller's model, not a copy (a copy would double the memory of
scoring a large model): it must leave the parameters as they are (SynFlow, which linearises the network,
works on a copy of its own), while ``score`` restores every module's train/eval flag and the buffers (the
running statistics that a forward in train mode updates) afterwards, so the caller's model is never touched
(a classic bug of public SNIP/GraSP code); a registry-wide test holds every score to this. ``score`` runs it
under a forked, seeded global RNG, so dropout is reproducible and the caller's RNG state is left as it was.
"""
from __future__ import annotations

from compress.errors import UserError
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, Protocol

import torch
from torch import nn

from compress.params import compressible_parameters
from formats.registry import Registry
from compress.selection import SCOPES, check_choice
from compress.training import derived_seed

Batch = tuple[torch.Tensor, torch.Tensor]
# The mode the network is in while a data-dependent score (SNIP, GraSP) runs it: eval, as the references
# (Synaptic-Flow's prune_loop, snip-public's is_train=False), so BatchNorm uses its running statistics and
# dropout is off; train uses each scoring batch's own statistics.
SCORE_MODES = ("eval", "train")


@dataclass(frozen=True, eq=False)  # eq=False: masks hold tensors, which do not compare to a bool
class ScoreContext:
    """What a score may need beyond the model and data: the target, and the current masks.

    ``masks`` (True = still trained) are the current masks of some scored parameters; entries outside
    them are already removed (zeroed or frozen in the model), score 0 and are never re-selected.
    """

    density: float | None = None  # target density, used by iterative scores (SynFlow)
    scope: str = "global"  # the scope iterative scores select with
    masks: dict[str, torch.Tensor] | None = None
    seed: int = 0
    name: str = ""  # the score's name, which keys its random streams
    mode: str = "eval"  # SCORE_MODES: the network's mode while a data-dependent score runs it
    progress: bool = False  # show the progress of long scores (SynFlow's rounds) on stderr

    def generator(self) -> torch.Generator:
        """A fresh CPU generator seeded from ``seed`` and the score's name."""
        return torch.Generator().manual_seed(derived_seed(self.seed, "score-generator", self.name))

    def mask(self, param: str, like: torch.Tensor) -> torch.Tensor:
        """The current mask of ``param`` on ``like``'s device (all True when none was given)."""
        if self.masks is None or param not in self.masks:
            return torch.ones_like(like, dtype=torch.bool)
        return self.masks[param].to(like.device)

    def restrict(self, param: str, value: torch.Tensor) -> torch.Tensor:
        """``value`` with the entries outside the current mask of ``param`` set to 0 (as is without one)."""
        if self.masks is None or param not in self.masks:
            return value
        return torch.where(self.masks[param].to(value.device), value, 0.0)


class ScoreFunction(Protocol):
    def __call__(
        self, model: nn.Module, batches: list[Batch], params: list[str], context: ScoreContext
    ) -> dict[str, torch.Tensor]: ...


SCORES: Registry[ScoreFunction] = Registry("score")


def score(
    model: nn.Module,
    name: str,
    batches: Iterable[Batch] = (),
    params: list[str] | None = None,
    *,
    density: float | None = None,
    seed: int = 0,
    scope: str = "global",
    masks: dict[str, torch.Tensor] | None = None,
    mode: str = "eval",
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Score the compressible parameters of ``model`` with the registered score ``name``.

    ``batches`` are (inputs, labels) pairs (data-free scores ignore them); ``density`` and ``scope``
    are the target, used only by iterative scores (SynFlow); ``seed`` drives random scores and
    dropout; ``masks`` are the current masks (entries outside them score 0); ``mode`` (``SCORE_MODES``)
    is the network's mode while SNIP or GraSP run it; ``progress`` shows the rounds of iterative scores on
    stderr (``compress.progress.track``). Returns float32 CPU tensors.
    """
    function = SCORES.get(name)
    batches = list(batches)
    params = compressible_parameters(model) if params is None else list(params)
    known = dict(model.named_parameters())
    unknown = [p for p in params if p not in known]
    if unknown:
        raise UserError(f"cannot score {unknown}: not parameters of the model")
    if density is not None and not 0.0 < density <= 1.0:
        raise UserError(f"density must be in (0, 1], got {density}")
    check_choice("scope", scope, SCOPES)
    check_choice("score mode", mode, SCORE_MODES)
    check_masks(masks, params, known)
    context = ScoreContext(density, scope, masks, seed, name, mode, progress)
    devices = cuda_devices(model)
    with torch.random.fork_rng(devices=devices):  # seed only what is forked, so all of it is restored
        rng_seed = derived_seed(seed, "score-rng", name)
        torch.default_generator.manual_seed(rng_seed)
        for index in devices:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(rng_seed)
        with kept_state(model):
            scores = function(model, batches, params, context)
    result = {}
    for param in params:
        value = scores.pop(param).detach().to("cpu", torch.float32)  # pop: one copy of a large model's scores
        if value.shape != known[param].shape:
            raise RuntimeError(f"score {name!r} returned shape {tuple(value.shape)} for {param}")
        result[param] = context.restrict(param, value)
    return result


@contextmanager
def kept_state(model: nn.Module) -> Iterator[None]:
    """Restore every module's train/eval flag and every buffer's value on leaving (a score may run the model in
    train mode, which updates BatchNorm's running statistics); the buffers are small next to the parameters."""
    flags = [(module, module.training) for module in model.modules()]
    buffers = [(buffer, buffer.detach().clone()) for buffer in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in buffers:
                buffer.copy_(value)
        for module, training in flags:
            module.training = training


def cuda_devices(model: nn.Module) -> list[int]:
    """Indices of the CUDA devices holding ``model``'s parameters or buffers."""
    tensors = [*model.parameters(), *model.buffers()]
    return sorted({t.device.index if t.device.index is not None else torch.cuda.current_device()
                   for t in tensors if t.device.type == "cuda"})


def check_masks(masks: dict[str, torch.Tensor] | None, params: list[str], known: dict[str, nn.Parameter]) -> None:
    """Current masks must be boolean tensors of scored parameters, of their shapes."""
    if masks is None:
        return
    for param, mask in masks.items():
        if param not in params:
            raise UserError(f"mask given for {param!r}, which is not scored; pass masks only for scored parameters")
        if not torch.is_tensor(mask) or mask.dtype != torch.bool or mask.shape != known[param].shape:
            raise UserError(f"mask of {param} must be a bool tensor of shape {tuple(known[param].shape)} "
                            "(True = still trained)")


def require_batches(name: str, batches: list[Batch]) -> None:
    """Data-driven scores need at least one batch."""
    if not batches:
        raise UserError(f"score {name!r} needs at least one data batch (set --score-batches >= 1)")


def parameters_by_name(model: nn.Module, params: list[str]) -> list[nn.Parameter]:
    named = dict(model.named_parameters())
    return [named[p] for p in params]


from compress.scores import grasp, magnitude, random_score, snip, synflow  # noqa: E402,F401  (registration)

__all__ = ["SCORES", "ScoreContext", "score", "Batch"]
