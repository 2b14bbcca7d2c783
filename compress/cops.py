"""COPS (Wimmer et al. 2021): combine two pruning scores by a linear program, solved analytically.

Formulation implemented (the paper's exact constraint form could not be confirmed from its text):

    maximise   <s1, m>
    subject to sum(m) = k,   <s2, m> >= c,   m in {0, 1}^n,
    with       c = gamma * C        if C >= 0,
               c = C / gamma        if C < 0,
               c = -inf             if gamma = 0,           where C = <s2, top_k(s2)>,

so ``gamma`` in [0, 1] is the fraction of s2's best achievable value that the mask must keep
(gamma = 0: no constraint, the top-k of s1; gamma = 1: a top-k set of s2, the best one for s1).
For a negative C the same relative slack is written C / gamma, as gamma * C would be infeasible.
For nonnegative s2 (SNIP, SynFlow, magnitude) every case is the literal ``gamma * C``.

Relaxed to m in [0, 1]^n this is a linear program with two constraints. Its Lagrangian
``<s1 + lam * s2, m>`` over {sum(m) = k, 0 <= m <= 1} is maximised by the top-k of ``s1 + lam * s2``,
and the LP optimum is reached at the smallest lam >= 0 whose top-k set satisfies the constraint:
there the sets just left and right of lam* are both Lagrangian-optimal, and a convex combination
of the two (at most two fractional entries, one swap) meets the constraint with equality. The
search for lam* bisects on lam while pruning every entry that is provably in (or out of) the top-k
over the whole remaining interval, so each step costs O(active entries) and the active set shrinks
geometrically: about O(n log n) in all, against a general LP solver's super-linear cost.

``combine`` rounds the relaxed optimum to the integral set right of lam* (the swap completed), so
the mask has exactly k entries and satisfies the constraint; its objective is at most one swap
below the LP bound, which ``solve_relaxed`` returns exactly.

More than two scores: not implemented; ``combine_many`` raises a clear error for them.
"""
from __future__ import annotations

from compress.errors import UserError, UserTypeError
from dataclasses import dataclass

import torch

from compress.allocation import layer_counts
from compress.selection import _top_k_flat, register_selector

MAX_BISECTIONS = 2000
SAMPLE = 100_000


@dataclass
class RelaxedSolution:
    """The LP relaxation's optimum: multiplier, objective, and the two integral sets around lam*."""

    lam: float
    objective: float  # the LP optimum <s1, m*> (m* possibly fractional)
    target: float  # c, the right-hand side of the constraint
    feasible_mask: torch.Tensor  # integral set right of lam*: exactly k entries, <s2, m> >= c
    fraction: float  # weight t of feasible_mask in m* = (1 - t) * left + t * right
    left_mask: torch.Tensor


def _check_inputs(s1: torch.Tensor, s2: torch.Tensor, k: int, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    if not torch.is_tensor(s1) or not torch.is_tensor(s2):
        raise UserTypeError("scores must be torch tensors")
    if s1.dim() != 1 or s2.dim() != 1 or s1.numel() != s2.numel():
        raise UserError(f"scores must be flat tensors of equal length, got shapes {tuple(s1.shape)} and {tuple(s2.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= s1.numel():
        raise UserError(f"k must be an integer in [0, {s1.numel()}], got {k!r}")
    check_gamma(gamma)
    a, b = s1.detach().double().cpu(), s2.detach().double().cpu()
    for name, value in (("s1", a), ("s2", b)):
        if not torch.isfinite(value).all():
            raise UserError(f"score {name} has non-finite entries (nan or inf); COPS needs finite scores")
    return a, b


def check_gamma(gamma: object) -> float:
    """gamma is the fraction of the second score's best value that the mask must keep, in [0, 1]."""
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 <= gamma <= 1.0:
        raise UserError(f"gamma must be in [0, 1], got {gamma!r}")
    return float(gamma)


def constraint_target(s2: torch.Tensor, k: int, gamma: float) -> float:
    """c: the value <s2, m> must reach (see the module docstring)."""
    if gamma == 0:
        return float("-inf")
    best = float(s2[_top_k_flat(s2, k)].sum())
    if best >= 0:
        return gamma * best
    return best / gamma if gamma > 0 else float("-inf")


def solve_relaxed(s1: torch.Tensor, s2: torch.Tensor, k: int, gamma: float) -> RelaxedSolution:
    """Exact optimum of the LP relaxation by the Lagrangian search over lam (see the module docstring)."""
    a, b = _check_inputs(s1, s2, k, gamma)
    n = a.numel()
    target = constraint_target(b, k, gamma)
    start = _best_at_zero(a, b, k)  # the top-k of s1, ties at the k-th value broken by s2
    if k in (0, n) or float(b[start].sum()) >= target:
        return RelaxedSolution(0.0, float(a[start].sum()), target, start, 1.0, start)
    lo, hi, search = _bracket(a, b, k, gamma, target)
    for _ in range(MAX_BISECTIONS):
        mid = 0.5 * (lo + hi)
        if not lo < mid < hi:
            break
        if search.constraint_value(mid) >= target:
            hi = mid
        else:
            lo = mid
        search.prune(lo, hi)
    left, right = search.mask(lo), search.mask(hi)
    g_left, g_right = float(b[left].sum()), float(b[right].sum())
    f_left, f_right = float(a[left].sum()), float(a[right].sum())
    t = 1.0 if g_right == g_left else min(1.0, max(0.0, (target - g_left) / (g_right - g_left)))
    objective = f_left + t * (f_right - f_left)
    return RelaxedSolution(hi, objective, target, right, t, left)


def _bracket(a: torch.Tensor, b: torch.Tensor, k: int, gamma: float, target: float):
    """An interval [lo, hi] with lo infeasible (lam = 0 is) and hi feasible, and the search pruned to it.

    Large problems first solve a random sample of SAMPLE entries: its lam* is a good guess, so the
    first bracket is narrow and its pruning leaves only a few thousand undecided entries. Pruning is
    valid for any interval, so feasibility is then checked on the undecided entries alone; a wrong
    guess only widens the interval.
    """
    n = a.numel()
    lo, hi = 0.0, float(a.abs().max()) / max(float(b.abs().max()), 1e-300) + 1.0
    if n > 4 * SAMPLE:
        picks = torch.randint(0, n, (SAMPLE,), generator=torch.Generator().manual_seed(0))
        sample_k = max(1, min(SAMPLE - 1, round(k * SAMPLE / n)))
        guess = solve_relaxed(a[picks], b[picks], sample_k, gamma).lam
        if guess > 0:
            lo, hi = guess / 1.1, guess * 1.1
    while True:
        search = _Search(a, b, k)
        search.prune(lo, hi)
        if search.constraint_value(hi) < target:
            lo, hi = hi, hi * 4.0
            if hi > 1e300:
                raise ValueError("COPS: the constraint cannot be met (check the scores)")
        elif lo > 0 and search.constraint_value(lo) >= target:
            lo, hi = 0.0, lo
        else:
            return lo, hi, search


def _threshold(values: torch.Tensor, rank: int, at_least: bool) -> torch.Tensor:
    """A valid pruning threshold.

    at_least=True: some T with at least ``rank`` values >= T (at most the rank-th largest value).
    at_least=False: some T with at most ``rank`` values > T (at least the (rank+1)-th largest value).
    """
    m = values.numel()
    if m > 4 * SAMPLE:
        sample = values[torch.randint(0, m, (SAMPLE,), generator=torch.Generator().manual_seed(m))]
        slack = 0.02 * rank + 4.0 * (rank + 1) ** 0.5 + 8
        wanted = rank + slack if at_least else rank - slack
        position = round(wanted * SAMPLE / m)
        if 1 <= position <= SAMPLE:
            guess = torch.kthvalue(sample, SAMPLE - position + 1).values
            count = int((values >= guess).sum()) if at_least else int((values > guess).sum())
            if (count >= rank) if at_least else (count <= rank):
                return guess
    return torch.kthvalue(values, m - rank + 1).values if at_least else torch.kthvalue(values, m - rank).values


class _Search:
    """The entries still undecided over the current lam interval, with running sums of the decided ones.

    An entry is fixed in (out) once it is provably in (out of) the top-k for every lam of the interval,
    so each step costs O(undecided entries), which shrink geometrically as the interval does.
    """

    def __init__(self, a: torch.Tensor, b: torch.Tensor, k: int):
        self.a, self.b, self.k = a, b, k
        self.undecided = torch.arange(a.numel())
        self.fixed_in: list[torch.Tensor] = []
        self.in_count, self.in_b = 0, 0.0

    def _top(self, lam: float) -> torch.Tensor:
        remaining = self.k - self.in_count
        index = self.undecided
        if remaining <= 0 or not index.numel():
            return index[:0]
        return index[_top_k_flat(self.a[index] + lam * self.b[index], remaining)]

    def constraint_value(self, lam: float) -> float:
        return self.in_b + float(self.b[self._top(lam)].sum())

    def mask(self, lam: float) -> torch.Tensor:
        mask = torch.zeros(self.a.numel(), dtype=torch.bool)
        for chunk in self.fixed_in:
            mask[chunk] = True
        mask[self._top(lam)] = True
        return mask

    def prune(self, lo: float, hi: float) -> None:
        index = self.undecided
        remaining, m = self.k - self.in_count, index.numel()
        if m <= 2 or remaining <= 0 or remaining >= m:
            return
        a, b = (self.a, self.b) if m == self.a.numel() else (self.a[index], self.b[index])
        at_lo, at_hi = a + lo * b, a + hi * b
        low, high = torch.minimum(at_lo, at_hi), torch.maximum(at_lo, at_hi)
        # Out: high below some T1 <= the remaining-th largest minimum; in: low above some T2 >= the
        # (remaining + 1)-th largest maximum. Exact order statistics are valid thresholds; on large
        # sets cheaper sampled ones are used when an exact count confirms they are valid.
        out = high < _threshold(low, remaining, at_least=True)
        sure_in = low > _threshold(high, remaining, at_least=False)
        if bool(sure_in.any()):
            chosen = index[sure_in]
            self.fixed_in.append(chosen)
            self.in_count += chosen.numel()
            self.in_b += float(b[sure_in].sum())
        self.undecided = index[~(sure_in | out)]


def _best_at_zero(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k of s1; entries tied with the k-th value are taken in order of s2 (best for the constraint)."""
    n = a.numel()
    if k in (0, n):
        return torch.full((n,), k == n, dtype=torch.bool)
    threshold = torch.kthvalue(a, n - k + 1).values
    above = a > threshold
    tied = torch.nonzero(a == threshold).flatten()
    needed = k - int(above.sum())
    order = torch.sort(b[tied], descending=True, stable=True).indices[:needed]
    above[tied[order]] = True
    return above


def combine(s1: torch.Tensor, s2: torch.Tensor, k: int, gamma: float) -> torch.Tensor:
    """Boolean mask with exactly ``k`` entries maximising <s1, m> subject to the s2 constraint.

    gamma = 0 gives the top-k of s1; the rounding keeps the constraint satisfied.
    """
    return solve_relaxed(s1, s2, k, gamma).feasible_mask


def combine_many(scores: list[torch.Tensor], k: int, gamma: float) -> torch.Tensor:
    """COPS for a list of scores: two are supported; more raise a clear error."""
    if len(scores) != 2:
        raise UserError(f"COPS combines exactly two scores (got {len(scores)}); more than two is not implemented yet")
    return combine(scores[0], scores[1], k, gamma)


def normalise(score: torch.Tensor) -> torch.Tensor:
    """Divide a score by the sum of its absolute values, so that its scale does not decide the result."""
    total = float(score.double().abs().sum())
    return score.double() / total if total > 0 else score.double()


def cops_masks(
    first: dict[str, torch.Tensor], second: dict[str, torch.Tensor], density: float, scope: str, gamma: float
) -> dict[str, torch.Tensor]:
    """COPS masks for the pipeline: both scores L1-normalised (over all layers for global scope, per
    layer for layer and erk scope), then ``combine`` with k = round(density * entries) (per layer: the
    scope's count of the layer)."""
    names = list(first)
    counts = layer_counts({name: tuple(first[name].shape) for name in names}, density, scope)
    if counts is not None:
        return {
            name: combine(normalise(first[name].flatten()), normalise(second[name].flatten()),
                          counts[name], gamma).reshape(first[name].shape)
            for name in names
        }
    flat_first = normalise(torch.cat([first[name].flatten() for name in names]))
    flat_second = normalise(torch.cat([second[name].flatten() for name in names]))
    keep = combine(flat_first, flat_second, round(density * flat_first.numel()), gamma)
    masks, offset = {}, 0
    for name in names:
        count = first[name].numel()
        masks[name] = keep[offset : offset + count].reshape(first[name].shape)
        offset += count
    return masks


@register_selector(
    "cops", 2, label=lambda names, options: f"cops({','.join(names)};gamma={options['gamma']:g})",
    defaults={"gamma": 0.5}, check=lambda options: {"gamma": check_gamma(options["gamma"])},
)
def cops_selector(scores, density, scope, options):
    """COPS of the two scores (see ``cops_masks``)."""
    return cops_masks(scores[0], scores[1], density, scope, options["gamma"])
