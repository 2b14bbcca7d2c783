"""Selection: exact counts, deterministic ties, global vs layer scope, collapse, bad input."""
import pytest
import torch

from compress.errors import UserError
from compress.selection import CONCATENATE_BELOW, SELECTORS, Plan, select, select_with, top_k_masks


def scores():
    return {"a": torch.tensor([[0.9, 0.1], [0.5, 0.3]]), "b": torch.tensor([0.8, 0.2, 0.7, 0.05, 0.6, 0.4])}


def test_global_scope_keeps_the_top_k_over_all_layers():
    plan = select(scores(), density=0.4, scope="global")
    assert plan.trained == 4  # round(0.4 * 10)
    assert plan.masks["a"].tolist() == [[True, False], [False, False]]
    assert plan.masks["b"].tolist() == [True, False, True, False, True, False]


def test_layer_scope_keeps_the_density_in_every_layer():
    plan = select(scores(), density=0.5, scope="layer")
    assert int(plan.masks["a"].sum()) == 2 and int(plan.masks["b"].sum()) == 3
    assert plan.masks["a"].tolist() == [[True, False], [True, False]]


def test_ties_are_broken_by_position_deterministically():
    tied = {"x": torch.ones(5), "y": torch.ones(5)}
    masks = top_k_masks(tied, 0.3, "global")
    assert masks["x"].tolist() == [True, True, True, False, False] and not masks["y"].any()


@pytest.mark.parametrize("density", [5e-4, 0.01, 0.1, 0.5, 0.999, 1.0])
def test_selected_count_is_exact_for_random_scores(density):
    g = torch.Generator().manual_seed(0)
    s = {"w1": torch.rand(100, 30, generator=g), "w2": torch.randn(1000, generator=g)}
    plan = select(s, density)
    assert plan.trained == round(density * 4000)
    threshold = min(float(v[plan.masks[k]].min()) for k, v in s.items() if plan.masks[k].any())
    assert all(float(v[~plan.masks[k]].max()) <= threshold for k, v in s.items() if (~plan.masks[k]).any())


def test_negative_scores_are_ranked_like_any_other():
    plan = select({"w": torch.tensor([-3.0, -1.0, -2.0])}, 1 / 3)
    assert plan.masks["w"].tolist() == [False, True, False]


def test_collapsed_layers_are_reported():
    plan = select({"big": torch.ones(1000), "small": torch.zeros(10)}, 0.05)
    assert plan.collapsed_layers() == ["small"]


@pytest.mark.parametrize("density", [0, -0.1, 1.5, float("nan")])
def test_density_outside_0_1_is_rejected(density):
    with pytest.raises(ValueError, match="density must be in"):
        select(scores(), density)


def test_non_finite_scores_are_rejected():
    with pytest.raises(ValueError, match="non-finite"):
        select({"w": torch.tensor([1.0, float("nan")])}, 0.5)


def test_unknown_mode_and_scope_are_rejected():
    with pytest.raises(ValueError, match="unknown mode 'cut'; known: prune, freeze"):
        select(scores(), 0.5, mode="cut")
    with pytest.raises(ValueError, match="unknown scope"):
        select(scores(), 0.5, scope="row")


def test_plan_reports_actual_density():
    plan = Plan("prune", {"w": torch.tensor([True, False, False, False])}, 0.25, "global", "x")
    assert plan.actual_density == 0.25 and plan.total == 4 and plan.trained == 1


def selector_scores(count, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"w1": torch.rand(20, 30, generator=g), "w2": torch.rand(100, generator=g)} for _ in range(count)]


def test_unknown_selector_lists_the_known_ones():
    with pytest.raises(UserError, match="unknown selector 'best'; known: cops, topk"):
        select_with("best", selector_scores(1), 0.1, "global", "prune", {}, ["snip"])


@pytest.mark.parametrize("name", SELECTORS.names())
def test_every_selector_checks_its_score_count_and_keeps_exact_counts(name):
    arity = SELECTORS.get(name).arity
    for wrong in (arity - 1, arity + 1):
        with pytest.raises(UserError, match=f"takes exactly {arity} score"):
            select_with(name, selector_scores(wrong), 0.1, "global", "prune", {}, [f"s{i}" for i in range(wrong)])
    for density in (0.013, 0.1, 0.5):
        plan = select_with(name, selector_scores(arity), density, "global", "freeze", {},
                           [f"s{i}" for i in range(arity)])
        assert {k: v.shape for k, v in plan.masks.items()} == {"w1": (20, 30), "w2": (100,)}
        assert all(m.dtype == torch.bool for m in plan.masks.values())
        assert plan.trained == round(density * 700) and plan.mode == "freeze" and plan.score


@pytest.mark.parametrize("name", SELECTORS.names())
def test_every_selector_rejects_unknown_options_and_mismatched_scores(name):
    selector = SELECTORS.get(name)
    names = [f"s{i}" for i in range(selector.arity)]
    known = ", ".join(sorted(selector.defaults)) or "none"
    with pytest.raises(UserError, match=f"unknown option\\(s\\) 'nope'; known: {known}"):
        select_with(name, selector_scores(selector.arity), 0.1, "global", "prune", {"nope": 1}, names)
    if selector.arity > 1:
        scores = selector_scores(selector.arity)
        scores[1] = {"w1": scores[1]["w1"]}
        with pytest.raises(UserError, match="other parameters or shapes"):
            select_with(name, scores, 0.1, "global", "prune", {}, names)


def test_topk_selector_is_select_and_is_labelled_by_the_score_name():
    scores = selector_scores(1)[0]
    plan = select_with("topk", [scores], 0.1, "layer", "prune", {}, ["snip"])
    assert plan.score == "snip" and SELECTORS.get("topk").describe(["snip"], {}) == "snip"
    reference = select(scores, 0.1, "layer")
    assert all(torch.equal(plan.masks[k], reference.masks[k]) for k in scores)


def _random_score_tensors(generator, trial):
    """A few flat tensors of scores with many ties, signed zeros, infinities and mixed dtypes."""
    parts = []
    for _ in range(int(torch.randint(1, 5, (1,), generator=generator))):
        n = int(torch.randint(0, 40, (1,), generator=generator))
        value = torch.randint(-3, 4, (n,), generator=generator).float() * 0.5
        if trial % 3 == 0:
            value = torch.randn(n, generator=generator)
        if trial % 4 == 0:
            value[value == 0] = -0.0
        if trial % 5 == 0 and n:
            value[0] = float("-inf") if trial % 10 else float("inf")
        if trial % 7 == 0:
            value = value.double()
        if trial % 11 == 0:
            value = value.half()
        parts.append(value)
    return parts


def test_top_k_over_tensors_is_the_top_k_of_their_concatenation_for_any_k():
    from compress.selection import _top_k_flat, top_k_over

    generator = torch.Generator().manual_seed(0)
    for trial in range(44):
        parts = _random_score_tensors(generator, trial)
        together = torch.cat([part.double() for part in parts])
        n = together.numel()
        for k in [-1, 0, 1, 2, *range(3, n - 1, 5), n - 1, n, n + 1]:
            for concatenate_below in (0, 10**9):  # the bisection and the concatenation
                chosen = top_k_over(parts, k, concatenate_below)
                assert [mask.numel() for mask in chosen] == [part.numel() for part in parts]
                assert torch.equal(torch.cat(chosen), _top_k_flat(together, k)), (trial, k, concatenate_below)


def test_global_selection_of_a_large_model_makes_no_copy_of_its_scores():
    import resource

    scores = {f"w{i}": torch.rand(6_000_000) for i in range(4)}  # 92 MiB of float32 scores: bisected
    assert 24_000_000 >= CONCATENATE_BELOW
    current_kib = int(open("/proc/self/statm").read().split()[1]) * 4096 // 1024
    before = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, current_kib)
    masks = top_k_masks(scores, 0.01, "global")
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert sum(int(m.sum()) for m in masks.values()) == 240_000
    # the masks are a quarter of the scores; concatenating them as float64 for kthvalue grew it by 6.5x
    assert grown < 0.75 * 92 * 1024, f"selection grew the peak by {grown / 1024:.0f} MiB for 92 MiB of scores"
