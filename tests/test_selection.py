"""Selection: exact counts, deterministic ties, global vs layer scope, collapse, bad input."""
import pytest
import torch

from compress.selection import Plan, select, top_k_masks


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
