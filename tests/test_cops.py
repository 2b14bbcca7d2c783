"""COPS: the analytic LP solution against a general LP solver, edge cases, and the pipeline."""
import numpy as np
import pytest
import torch
from scipy.optimize import linprog

from cli.main import main
from compress.cops import combine, combine_many, constraint_target, cops_masks, normalise, solve_relaxed
from compress.errors import UserError
from compress.selection import SELECTORS, select_with


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def top_k(values: torch.Tensor, k: int) -> torch.Tensor:
    mask = torch.zeros(values.numel(), dtype=torch.bool)
    mask[torch.sort(values, descending=True, stable=True).indices[:k]] = True
    return mask


def lp_optimum(s1, s2, k, target) -> float:
    n = s1.numel()
    result = linprog(-s1.numpy(), A_ub=[-s2.numpy()], b_ub=[-target], A_eq=[np.ones(n)], b_eq=[k],
                     bounds=(0, 1), method="highs")
    assert result.status == 0, result.message
    return -result.fun


def random_problem(rng, n, kind):
    s1 = torch.tensor(rng.standard_normal(n))
    s2 = torch.tensor(rng.standard_normal(n))
    if kind == "ties":
        s1, s2 = s1.round(), s2.round()
    elif kind == "positive":
        s1, s2 = s1.abs(), s2.abs()
    elif kind == "grasp-like":  # mixed signs with a heavy tail, as GraSP gives
        s2 = s2 ** 3
    return s1, s2


@pytest.mark.parametrize("kind", ["normal", "ties", "positive", "grasp-like"])
def test_relaxed_optimum_equals_a_general_lp_solver(kind):
    rng = np.random.default_rng({"normal": 0, "ties": 1, "positive": 2, "grasp-like": 3}[kind])
    for _ in range(40):
        n = int(rng.integers(2, 2001))
        k = int(rng.integers(0, n + 1))
        gamma = float(rng.random())
        s1, s2 = random_problem(rng, n, kind)
        solution = solve_relaxed(s1, s2, k, gamma)
        expected = lp_optimum(s1, s2, k, solution.target)
        assert solution.objective == pytest.approx(expected, rel=1e-9, abs=1e-9)
        mask = combine(s1, s2, k, gamma)
        assert mask.dtype == torch.bool and int(mask.sum()) == k
        assert float(s2[mask].sum()) >= solution.target - 1e-9 * max(1.0, abs(solution.target))
        assert float(s1[mask].sum()) <= expected + 1e-9 * max(1.0, abs(expected))


def test_rounded_mask_is_within_one_swap_of_the_lp_bound():
    rng = np.random.default_rng(7)
    for _ in range(30):
        s1, s2 = random_problem(rng, 500, "normal")
        solution = solve_relaxed(s1, s2, 50, 0.8)
        loss = solution.objective - float(s1[solution.feasible_mask].sum())
        assert 0 <= loss <= float(s1.max() - s1.min()) + 1e-12
        assert int((solution.feasible_mask ^ solution.left_mask).sum()) in (0, 2)


def test_gamma_zero_is_the_top_k_of_the_first_score():
    s1, s2 = torch.randn(1000, dtype=torch.float64), torch.randn(1000, dtype=torch.float64)
    assert torch.equal(combine(s1, s2, 37, 0.0), top_k(s1, 37))


def test_gamma_one_keeps_the_second_scores_best_value():
    s1, s2 = torch.randn(1000, dtype=torch.float64), torch.rand(1000, dtype=torch.float64)
    mask = combine(s1, s2, 100, 1.0)
    assert float(s2[mask].sum()) == pytest.approx(float(s2[top_k(s2, 100)].sum()), rel=1e-12)


def test_gamma_one_with_ties_in_the_second_score_picks_the_best_for_the_first():
    s1 = torch.tensor([0.0, 5.0, 1.0, 4.0], dtype=torch.float64)
    s2 = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    assert combine(s1, s2, 2, 1.0).tolist() == [False, True, True, False]


@pytest.mark.parametrize("k", [0, 10])
def test_k_zero_and_k_n(k):
    s1, s2 = torch.randn(10), torch.randn(10)
    assert int(combine(s1, s2, k, 0.5).sum()) == k


def test_all_negative_second_score_uses_the_relative_slack():
    s1 = torch.tensor([3.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    s2 = torch.tensor([-4.0, -3.0, -2.0, -1.0], dtype=torch.float64)
    assert constraint_target(s2, 2, 0.5) == pytest.approx(-3.0 / 0.5)
    mask = combine(s1, s2, 2, 0.5)
    assert float(s2[mask].sum()) >= -6.0 and int(mask.sum()) == 2


def test_monotone_in_gamma():
    s1, s2 = torch.randn(3000, dtype=torch.float64), torch.rand(3000, dtype=torch.float64)
    values = [float(s2[combine(s1, s2, 300, g)].sum()) for g in (0.0, 0.5, 0.8, 0.95, 1.0)]
    assert values == sorted(values)


@pytest.mark.parametrize(
    "s1, s2, k, gamma, error, message",
    [
        (torch.tensor([1.0, float("nan")]), torch.ones(2), 1, 0.5, ValueError, "non-finite"),
        (torch.ones(2), torch.tensor([1.0, float("inf")]), 1, 0.5, ValueError, "non-finite"),
        (torch.ones(3), torch.ones(2), 1, 0.5, ValueError, "equal length"),
        (torch.ones(2, 2), torch.ones(2, 2), 1, 0.5, ValueError, "flat tensors"),
        (torch.ones(3), torch.ones(3), 4, 0.5, ValueError, "k must be an integer in"),
        (torch.ones(3), torch.ones(3), -1, 0.5, ValueError, "k must be an integer in"),
        (torch.ones(3), torch.ones(3), 1, 1.5, ValueError, "gamma must be in"),
        ([1.0], [1.0], 1, 0.5, TypeError, "torch tensors"),
    ],
)
def test_bad_input_is_rejected(s1, s2, k, gamma, error, message):
    with pytest.raises(error, match=message):
        combine(s1, s2, k, gamma)


def test_more_than_two_scores_is_a_clear_error():
    with pytest.raises(ValueError, match="exactly two scores"):
        combine_many([torch.ones(3)] * 3, 1, 0.5)


def test_large_problem_takes_the_sampled_bracket_and_stays_exact():
    generator = torch.Generator().manual_seed(0)
    s1 = torch.randn(600_000, generator=generator, dtype=torch.float64)
    s2 = torch.randn(600_000, generator=generator, dtype=torch.float64)
    solution = solve_relaxed(s1, s2, 6000, 0.7)
    assert int(solution.feasible_mask.sum()) == 6000
    assert float(s2[solution.feasible_mask].sum()) >= solution.target
    assert float(s2[solution.left_mask].sum()) < solution.target  # lam* is bracketed by one swap


def test_normalise_divides_by_the_l1_norm():
    assert torch.allclose(normalise(torch.tensor([1.0, -3.0])), torch.tensor([0.25, -0.75], dtype=torch.float64))


def test_cops_masks_have_the_density_globally_and_per_layer():
    generator = torch.Generator().manual_seed(1)
    first = {"a": torch.rand(20, 30, generator=generator), "b": torch.rand(100, generator=generator)}
    second = {"a": torch.rand(20, 30, generator=generator), "b": torch.rand(100, generator=generator) * 100}
    global_masks = cops_masks(first, second, 0.1, "global", 0.5)
    assert sum(int(m.sum()) for m in global_masks.values()) == 70
    layer_masks = cops_masks(first, second, 0.1, "layer", 0.5)
    assert int(layer_masks["a"].sum()) == 60 and int(layer_masks["b"].sum()) == 10
    assert layer_masks["a"].shape == (20, 30)


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_cops_selector_equals_cops_masks(scope):
    generator = torch.Generator().manual_seed(3)
    first = {"a": torch.randn(20, 30, generator=generator), "b": torch.randn(100, generator=generator)}
    second = {"a": torch.rand(20, 30, generator=generator), "b": torch.rand(100, generator=generator)}
    for gamma in (0.0, 0.5, 0.9):
        plan = select_with("cops", [first, second], 0.1, scope, "prune", {"gamma": gamma}, ["snip", "grasp"])
        expected = cops_masks(first, second, 0.1, scope, gamma)
        assert all(torch.equal(plan.masks[name], expected[name]) for name in first)
        assert plan.score == f"cops(snip,grasp;gamma={gamma:g})"
    default = select_with("cops", [first, second], 0.1, scope, "prune", {}, ["snip", "grasp"])
    assert default.score == "cops(snip,grasp;gamma=0.5)"
    assert SELECTORS.get("cops").describe(["snip", "grasp"], {}) == "cops(snip,grasp;gamma=0.5)"


@pytest.mark.parametrize("gamma", [1.5, -0.1, "0.5", True])
def test_cops_selector_checks_gamma_before_solving(gamma):
    scores = [{"w": torch.rand(10)}, {"w": torch.rand(10)}]
    with pytest.raises(UserError, match="gamma must be in \\[0, 1\\]"):
        select_with("cops", scores, 0.5, "global", "prune", {"gamma": gamma}, ["a", "b"])


@pytest.mark.parametrize("extra", [[], ["--scope", "layer", "--mode", "freeze"]])
def test_pipeline_plan_with_cops(capsys, extra):
    code = main(["plan", "--model", "lenet5", "--data", "synthetic", "--method", "cops", "--scores", "snip,grasp",
                 "--gamma", "0.5", "--density", "0.01", *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "4,305" in captured.out and "cops(snip,grasp;gamma=0.5)" in captured.out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "cops", "--scores", "snip,grasp,synflow"], "exactly two scores"),
        (["--method", "cops", "--scores", "snip,foo"], "unknown score 'foo'"),
        (["--method", "cops", "--gamma", "2"], "gamma must be in [0, 1]"),
        (["--method", "snip", "--scores", "snip,grasp"], "use it with --method cops"),
    ],
)
def test_pipeline_rejects_bad_cops_options(capsys, args, message):
    code = main(["plan", "--model", "lenet300", "--data", "synthetic", "--density", "0.1", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1


def test_train_with_cops_in_freeze_mode(tmp_path, capsys):
    code = main(["train", "--model", "lenet300", "--data", "synthetic", "--subset", "256", "--epochs", "1",
                 "--method", "cops", "--scores", "snip,magnitude", "--mode", "freeze", "--density", "0.05",
                 "--out", str(tmp_path / "c"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    import json

    summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert summary["score"] == "cops(snip,magnitude;gamma=0.5)" and summary["mode"] == "freeze"
