"""Scores: known answers, independent gradient checks, GraSP's Hessian, SynFlow's conservation."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compress.errors import UserError
from compress.init import initialise
from formats.models import build_model
from formats.rng import uniform
from compress.scores import SCORES, ScoreContext, score
from compress.scores.grasp import TEMPERATURE, hessian_gradient_product
from compress.selection import select


def tiny_mlp(seed=0) -> nn.Module:
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    return initialise(model, seed)


def tiny_cnn(seed=0) -> nn.Module:
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
    return initialise(model, seed)


def batch(shape=(5,), n=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn((n, *shape), generator=g), torch.randint(0, classes, (n,), generator=g))]


def test_snip_known_answer_on_identity_layer():
    model = nn.Sequential(nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2))
    # logits [1, 2], label 0: |theta * g| = [[p1 * 1, 0], [0, p1 * 2]], normalised -> 1/3 and 2/3.
    result = score(model, "snip", [(torch.tensor([[1.0, 2.0]]), torch.tensor([0]))])
    assert torch.allclose(result["0.weight"], torch.tensor([[1 / 3, 0.0], [0.0, 2 / 3]]), atol=1e-7)


def test_snip_matches_hand_derived_backprop():
    model = tiny_mlp()
    (x, y), = batch()
    w1, b1, w2, b2 = (p.detach().double() for p in model.parameters())
    x = x.double()
    h_pre = x @ w1.T + b1
    h = h_pre.clamp(min=0)
    logits = h @ w2.T + b2
    d_logits = (torch.softmax(logits, 1) - F.one_hot(y, 3).double()) / len(y)
    g2 = d_logits.T @ h
    g1 = ((d_logits @ w2) * (h_pre > 0)).T @ x
    raw = {"0.weight": (w1 * g1).abs(), "2.weight": (w2 * g2).abs()}
    total = sum(r.sum() for r in raw.values())
    result = score(model, "snip", batch())
    for name, value in raw.items():
        assert torch.allclose(result[name].double(), value / total, rtol=1e-5, atol=1e-8)


def test_grasp_hessian_gradient_product_matches_explicit_hessian():
    model = tiny_mlp().double()
    batches = [(x.double(), y) for x, y in batch()]
    params = ["0.weight", "2.weight"]
    shapes = [model.get_parameter(p).shape for p in params]
    sizes = [math.prod(s) for s in shapes]

    def loss_of(flat):
        w1, w2 = (t.reshape(s) for t, s in zip(flat.split(sizes), shapes))
        x, y = batches[0]
        h = (x @ w1.T + model[0].bias).clamp(min=0)
        return F.cross_entropy((h @ w2.T + model[2].bias) / TEMPERATURE, y)

    flat = torch.cat([model.get_parameter(p).detach().flatten() for p in params]).requires_grad_()
    gradient = torch.autograd.grad(loss_of(flat), flat)[0]
    hessian = torch.autograd.functional.hessian(loss_of, flat.detach())
    expected = (hessian @ gradient).split(sizes)
    product = hessian_gradient_product(model, batches, params)
    for got, want in zip(product, expected):
        assert torch.allclose(got.flatten(), want, rtol=1e-6, atol=1e-12)


def test_grasp_returns_theta_times_hg_so_top_k_is_what_reference_keeps():
    model = tiny_mlp()
    batches = batch()
    result = score(model, "grasp", batches)
    product = hessian_gradient_product(copy.deepcopy(model), batches, ["0.weight", "2.weight"])
    assert torch.allclose(result["0.weight"], model[0].weight.detach() * product[0], atol=1e-9)
    reference = -model[2].weight.detach() * product[1]  # the reference removes the highest of these
    assert torch.equal(result["2.weight"].argmax(), reference.argmin())


def test_synflow_known_answer_and_conservation():
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -2.0], [3.0, 4.0]]))
        model[2].weight.copy_(torch.tensor([[-1.0, 2.0]]))
    result = score(model, "synflow", [(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long))])
    assert torch.equal(result["0.weight"], torch.tensor([[1.0, 2.0], [6.0, 8.0]]))
    assert torch.equal(result["2.weight"], torch.tensor([[3.0, 14.0]]))


def test_synflow_layer_totals_are_conserved_on_bias_free_relu_network():
    model = initialise(nn.Sequential(nn.Linear(6, 5, bias=False), nn.ReLU(), nn.Linear(5, 4, bias=False),
                                     nn.ReLU(), nn.Linear(4, 3, bias=False)), 3)
    result = score(model, "synflow", batch(shape=(6,)))
    totals = torch.tensor([float(v.double().sum()) for v in result.values()])
    assert torch.allclose(totals, totals[0].expand(3), rtol=1e-5)


def test_synflow_iterative_prunes_to_the_exact_density_and_zeroes_pruned_scores():
    model = tiny_cnn()
    result = score(model, "synflow", batch(shape=(1, 6, 6)), density=0.3)
    plan = select(result, 0.3)
    kept = torch.cat([s[plan.masks[n]] for n, s in result.items()])
    dropped = torch.cat([s[~plan.masks[n]] for n, s in result.items()])
    assert plan.trained == round(0.3 * plan.total)
    assert bool((dropped == 0).all()) and bool((kept > 0).all())


def test_magnitude_known_answer():
    model = tiny_mlp()
    result = score(model, "magnitude", [])
    assert torch.equal(result["0.weight"], model[0].weight.detach().abs())


def test_random_known_answer_is_the_seeded_portable_stream():
    model = tiny_mlp()
    result = score(model, "random", [], seed=9)
    assert torch.equal(result["2.weight"], uniform(9, "score/random/2.weight", (3, 4), 0.5) + 0.5)
    assert not torch.equal(result["2.weight"], score(model, "random", [], seed=10)["2.weight"])


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name", SCORES.names())
def test_every_score_is_finite_deterministic_and_leaves_the_model_untouched(name, training, mode):
    """Scores run on the caller's model itself (no copy): its values, dtypes, flags and gradients stay as
    they were, BatchNorm's running statistics included, in both score modes."""
    model = tiny_cnn().train(training)
    before = copy.deepcopy(model.state_dict())
    batches = batch(shape=(1, 6, 6))
    first = score(model, name, batches, density=0.2, seed=1, mode=mode)
    second = score(model, name, batches, density=0.2, seed=1, mode=mode)
    assert set(first) == {"0.weight", "4.weight"}
    for param, value in first.items():
        assert value.dtype == torch.float32 and value.shape == model.get_parameter(param).shape
        assert torch.isfinite(value).all()
        assert torch.equal(value, second[param])
    assert all(module.training == training for module in model.modules())
    for key, value in model.state_dict().items():
        assert value.dtype == before[key].dtype and torch.equal(value, before[key]), key
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("name", ["snip", "grasp"])
def test_data_scores_need_a_batch(name):
    with pytest.raises(ValueError, match="needs at least one data batch"):
        score(tiny_mlp(), name, [])


def test_unknown_score_lists_known_ones():
    with pytest.raises(ValueError, match="unknown score 'snp'; known: grasp, magnitude, random, snip, synflow"):
        score(tiny_mlp(), "snp", [])


def test_scoring_a_parameter_the_model_lacks_is_an_error():
    with pytest.raises(ValueError, match="not parameters of the model"):
        score(tiny_mlp(), "magnitude", [], ["nope.weight"])


def test_synflow_layer_scope_prunes_every_round_per_layer():
    # Before: rounds ranked globally and a per-layer re-selection kept 1038 zero-score entries in fc1.
    model = initialise(build_model("lenet300", (1, 28, 28), 10), 0)
    result = score(model, "synflow", batch(shape=(1, 28, 28)), density=0.01, scope="layer")
    plan = select(result, 0.01, "layer")
    for name, value in result.items():
        assert not bool((value[plan.masks[name]] == 0).any()), name
        assert torch.equal(plan.masks[name], value > 0), name  # the iterative mask
        assert int(plan.masks[name].sum()) == round(0.01 * value.numel())


@pytest.mark.parametrize("name", SCORES.names())
def test_every_score_gives_zero_outside_the_current_masks(name):
    model = tiny_cnn()
    g = torch.Generator().manual_seed(2)
    masks = {p: torch.rand(model.get_parameter(p).shape, generator=g) < 0.5 for p in ("0.weight", "4.weight")}
    with torch.no_grad():
        for p, mask in masks.items():
            model.get_parameter(p).mul_(mask)  # the caller has pruned them
    result = score(model, name, batch(shape=(1, 6, 6)), density=0.2, seed=1, masks=masks)
    for p, mask in masks.items():
        assert bool((result[p][~mask] == 0).all()), p


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_synflow_starts_from_the_masks_and_never_reselects_removed_entries(scope):
    model = tiny_cnn()
    masks = {"0.weight": torch.ones(3, 1, 3, 3, dtype=torch.bool), "4.weight": torch.rand(3, 48) < 0.4}
    result = score(model, "synflow", batch(shape=(1, 6, 6)), density=0.3, scope=scope, masks=masks)
    plan = select(result, 0.3, scope)
    assert not bool(plan.masks["4.weight"][~masks["4.weight"]].any())
    assert all(bool((result[p][plan.masks[p]] > 0).all()) for p in result)


def test_dropout_during_scoring_is_seeded_and_the_caller_rng_is_untouched():
    model = initialise(nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3)), 0)
    batches = batch()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = score(model, "snip", batches, seed=4, mode="train")
    assert torch.equal(torch.get_rng_state(), state)
    second = score(model, "snip", batches, seed=4, mode="train")
    other = score(model, "snip", batches, seed=5, mode="train")
    assert all(torch.equal(first[p], second[p]) for p in first)
    assert any(not torch.equal(first[p], other[p]) for p in first)  # dropout did act, with another seed
    evaluated = [score(model, "snip", batches, seed=seed) for seed in (4, 5)]  # eval mode: no dropout
    assert all(torch.equal(evaluated[0][p], evaluated[1][p]) for p in first)


def _reference_snip(model, batches, params, training: bool):
    """SNIP as its reference computes it: the network in the given mode, |theta * dL/dtheta| over the sum."""
    model = copy.deepcopy(model).train(training)
    weights = [model.get_parameter(p) for p in params]
    grads = [torch.zeros_like(w) for w in weights]
    for inputs, labels in batches:
        for acc, g in zip(grads, torch.autograd.grad(F.cross_entropy(model(inputs), labels), weights)):
            acc += g
    raw = [(w.detach() * g).abs() for w, g in zip(weights, grads)]
    total = sum(r.sum() for r in raw)
    return {p: r / total for p, r in zip(params, raw)}


def _reference_grasp(model, batches, params, training: bool):
    """theta * (H g) with the logits over GraSP's temperature, the network in the given mode."""
    model = copy.deepcopy(model).train(training)
    weights = [model.get_parameter(p) for p in params]
    inputs, labels = batches[0]
    g = torch.autograd.grad(F.cross_entropy(model(inputs) / TEMPERATURE, labels), weights)
    first = torch.autograd.grad(F.cross_entropy(model(inputs) / TEMPERATURE, labels), weights, create_graph=True)
    hg = torch.autograd.grad(sum((f * gi).sum() for f, gi in zip(first, g)), weights)
    return {p: w.detach() * h for p, w, h in zip(params, weights, hg)}


@pytest.mark.parametrize("name, reference", [("snip", _reference_snip), ("grasp", _reference_grasp)])
def test_snip_and_grasp_score_a_batchnorm_network_in_eval_mode_by_default_as_the_references(name, reference):
    model = tiny_cnn()
    with torch.no_grad():  # running statistics unlike any batch's, so that the two modes differ
        model[1].running_mean.fill_(0.3)
        model[1].running_var.fill_(2.0)
    batches = batch(shape=(1, 6, 6), n=8)
    params = ["0.weight", "4.weight"]
    default = score(model, name, batches, params)
    trained = score(model, name, batches, params, mode="train")
    for mode_scores, training in ((default, False), (trained, True)):
        expected = reference(model, batches, params, training)
        for p in params:
            assert torch.allclose(mode_scores[p], expected[p], rtol=1e-5, atol=1e-9), (name, training, p)
    assert not torch.allclose(default["0.weight"], trained["0.weight"], rtol=1e-3)  # BatchNorm: the modes differ
    assert torch.equal(model[1].running_mean, torch.full((3,), 0.3))  # the caller's model is untouched


def test_an_unknown_score_mode_is_a_user_error():
    with pytest.raises(UserError, match="unknown score mode 'test'"):
        score(tiny_mlp(), "snip", batch(), mode="test")


def test_context_generator_is_seeded_by_seed_and_score_name():
    draw = lambda context: torch.rand(4, generator=context.generator())  # noqa: E731
    assert torch.equal(draw(ScoreContext(None, seed=1, name="a")), draw(ScoreContext(None, seed=1, name="a")))
    assert not torch.equal(draw(ScoreContext(None, seed=1, name="a")), draw(ScoreContext(None, seed=1, name="b")))
    assert not torch.equal(draw(ScoreContext(None, seed=1, name="a")), draw(ScoreContext(None, seed=2, name="a")))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"scope": "row"}, "unknown scope 'row'"),
        ({"masks": {"2.weight": torch.ones(3, 4)}}, "must be a bool tensor of shape"),
        ({"masks": {"0.weight": torch.ones(3, 5, dtype=torch.bool)}}, "must be a bool tensor of shape"),
        ({"masks": {"0.bias": torch.ones(4, dtype=torch.bool)}}, "not scored"),
    ],
)
def test_bad_scope_or_masks_are_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        score(tiny_mlp(), "magnitude", [], **kwargs)
