"""Interspace pruning: the parametrisation, its gradients, the spatial-basis equivalence, pack and export."""
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import formats
from cli.main import main
from compress.init import initial_values, initialise
from formats.interspace import (
    InterspaceConv2d,
    dct_basis,
    interspace_weight,
    spatial_basis,
    to_interspace,
    to_standard_state_dict,
)
from formats.models import build_model
from compress.scores import SCORES, score
from compress.selection import select
from compress.training import MaskConstraint, TrainSettings, train

TINY = ["--data", "synthetic", "--data-shape", "3x8x8", "--subset", "64", "--batch-size", "32", "--epochs", "1",
        "--quiet"]


def test_interspace_weight_matches_an_explicit_sum_over_the_basis():
    generator = torch.Generator().manual_seed(0)
    coefficients = torch.randn(4, 3, 9, generator=generator, dtype=torch.float64)
    basis = torch.randn(9, 3, 3, generator=generator, dtype=torch.float64)
    explicit = torch.zeros(4, 3, 3, 3, dtype=torch.float64)
    for o in range(4):
        for i in range(3):
            for n in range(9):
                explicit[o, i] += coefficients[o, i, n] * basis[n]
    assert torch.allclose(interspace_weight(coefficients, basis), explicit, rtol=1e-12, atol=1e-12)


def test_gradients_of_coefficients_and_basis_match_an_explicitly_built_filter():
    conv = nn.Conv2d(2, 3, 3, padding=1).double()
    layer = InterspaceConv2d(conv, dct_basis(3).double()).double()
    with torch.no_grad():
        layer.coefficients.copy_(torch.randn(3, 2, 9, dtype=torch.float64))
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    layer(x).square().sum().backward()

    coefficients = layer.coefficients.detach().clone().requires_grad_()
    basis = layer.basis.detach().clone().requires_grad_()
    filters = torch.stack([torch.stack([sum(coefficients[o, i, n] * basis[n] for n in range(9)) for i in range(2)])
                           for o in range(3)])
    torch.nn.functional.conv2d(x, filters, layer.bias.detach(), padding=1).square().sum().backward()
    assert torch.allclose(layer.coefficients.grad, coefficients.grad, rtol=1e-10)
    assert torch.allclose(layer.basis.grad, basis.grad, rtol=1e-10)


@pytest.mark.parametrize("size", [2, 3, 5, 7])
def test_dct_basis_is_orthonormal_and_starts_with_the_constant_filter(size):
    matrix = dct_basis(size).double().reshape(size * size, -1)
    assert torch.allclose(matrix @ matrix.T, torch.eye(size * size, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(dct_basis(size)[0], torch.full((size, size), 1.0 / size), atol=1e-7)


def test_initial_filters_have_the_variance_of_the_usual_init():
    standard = initialise(build_model("vgg16", (3, 8, 8), 10), 0)
    interspace = build_model("vgg16", (3, 8, 8), 10)
    to_interspace(interspace, "dct")
    initialise(interspace, 0)
    layer = "features.10"
    w_standard = standard.get_submodule(layer).weight.detach()
    module = interspace.get_submodule(layer)
    w_interspace = interspace_weight(module.coefficients.detach(), module.basis.detach())
    assert float(w_interspace.var()) == pytest.approx(float(w_standard.var()), rel=0.02)


def test_spatial_basis_coefficients_are_exactly_the_standard_initial_weights():
    standard = initialise(build_model("lenet5", (1, 28, 28), 10), 3)
    interspace = build_model("lenet5", (1, 28, 28), 10)
    assert to_interspace(interspace, "spatial", trainable_basis=False) == ["conv1", "conv2"]
    initialise(interspace, 3)
    plain = to_standard_state_dict(interspace.state_dict(), ["conv1", "conv2"])
    assert all(torch.equal(plain[k], v) for k, v in standard.state_dict().items())


@pytest.mark.parametrize("mode", ["prune", "freeze"])
def test_masks_on_coefficients_hold_after_every_step(mode):
    from compress.data import load_data

    data = load_data("synthetic", subset=128, shape=(3, 8, 8), seed=0)
    model = build_model("resnet20", (3, 8, 8), 10)
    to_interspace(model, "dct")
    initialise(model, 0)
    plan = select(score(model, "magnitude", []), 0.1, mode=mode)
    assert all(name.endswith(".coefficients") for name in plan.masks if name.startswith("layer") and "shortcut" not in name)
    initial = initial_values(model, 0, list(plan.masks))
    params = dict(model.named_parameters())
    basis_before = params["layer1.0.conv1.basis"].detach().clone()

    def check(step):
        for name, mask in plan.masks.items():
            held = params[name].detach()[~mask]
            expected = torch.zeros_like(held) if mode == "prune" else initial[name][~mask]
            assert torch.equal(held, expected), f"{name} at step {step}"

    train(model, data, TrainSettings(epochs=1, batch_size=32, lr=0.1, weight_decay=1e-3),
          MaskConstraint(model, plan, initial if mode == "freeze" else None), seed=0, device=torch.device("cpu"),
          on_step_end=check, progress=False)
    assert not torch.equal(params["layer1.0.conv1.basis"].detach(), basis_before)  # the basis is trained


def test_spatial_fixed_basis_interspace_equals_standard_pruning_bit_for_bit(tmp_path, capsys):
    common = ["train", "--model", "resnet20", *TINY, "--method", "snip", "--density", "0.1", "--seed", "4"]
    assert main([*common, "--out", str(tmp_path / "standard")]) == 0
    assert main([*common, "--interspace", "--basis", "spatial", "--fixed-basis", "--out", str(tmp_path / "ip")]) == 0
    capsys.readouterr()
    standard_masks = load_file(str(tmp_path / "standard" / "masks.safetensors"))
    ip_masks = load_file(str(tmp_path / "ip" / "masks.safetensors"))
    layers = json.loads((tmp_path / "ip" / "summary.json").read_text())["interspace"]["layers"]
    assert len(layers) == 19
    for name, mask in standard_masks.items():
        layer = name.rsplit(".", 1)[0]
        twin = ip_masks[f"{layer}.coefficients"] if layer in layers else ip_masks[name]
        assert torch.equal(twin.reshape(mask.shape), mask), name
    standard = load_file(str(tmp_path / "standard" / "model.safetensors"))
    plain = to_standard_state_dict(load_file(str(tmp_path / "ip" / "model.safetensors")), layers)
    assert set(plain) == set(standard)
    for name, value in standard.items():
        assert torch.equal(plain[name], value), name
    standard_summary = json.loads((tmp_path / "standard" / "summary.json").read_text())
    ip_summary = json.loads((tmp_path / "ip" / "summary.json").read_text())
    assert standard_summary["test_acc"] == ip_summary["test_acc"]


@pytest.mark.parametrize("mode", ["prune", "freeze"])
def test_interspace_pack_load_is_bit_exact_and_exports_to_onnx(tmp_path, capsys, mode):
    run = tmp_path / "run"
    method = "freezenet" if mode == "freeze" else "snip"
    assert main(["train", "--model", "resnet20", *TINY, "--interspace", "--method", method, "--density", "0.05",
                 "--out", str(run)]) == 0
    assert main(["pack", str(run), "-o", str(tmp_path / "ip.cpk"), "--values", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "filter bases" in out
    stored = load_file(str(run / "model.safetensors"))
    factored = formats.load_state_dict(tmp_path / "ip.cpk", factored=True)
    assert set(factored) == set(stored) and all(torch.equal(factored[k], v) for k, v in stored.items())
    model = formats.load(tmp_path / "ip.cpk")
    assert not any(isinstance(m, InterspaceConv2d) for m in model.modules())
    trained = build_model("resnet20", (3, 8, 8), 10)
    to_interspace(trained, "dct")
    trained.load_state_dict(stored)
    trained.eval()
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), trained(x))
    report = formats.export_onnx(tmp_path / "ip.cpk", tmp_path / "ip.onnx")
    assert report.max_abs_diff <= 1e-4
    info = formats.read_info(tmp_path / "ip.cpk")
    assert info["totals"]["basis_raw_bytes"] == 19 * 81 * 4 and info["schema"]["version"] == 5
    assert 0 < info["totals"]["basis_bytes"] < info["totals"]["basis_raw_bytes"]  # the bases are entropy-coded too


@pytest.mark.parametrize("name", SCORES.names() + ["cops"])
def test_every_score_works_on_coefficients(capsys, name):
    extra = ["--method", "cops", "--scores", "snip,grasp"] if name == "cops" else ["--score", name]
    code = main(["plan", "--model", "resnet20", "--data", "synthetic", "--data-shape", "3x8x8", "--interspace",
                 "--density", "0.05", *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "layer1.0.conv1.coefficients" in captured.out and "interspace coefficients" in captured.out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "lenet300", "--interspace"], "no convolution larger than 1x1"),
        (["--model", "lenet5", "--basis", "spatial"], "add --interspace"),
        (["--model", "lenet5", "--fixed-basis"], "add --interspace"),
    ],
)
def test_interspace_options_are_checked(capsys, args, message):
    code = main(["plan", "--data", "synthetic", "--method", "snip", "--density", "0.1", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err


def test_a_run_without_interspace_layers_packs_without_them_and_no_basis_section(tmp_path, capsys):
    assert main(["train", "--model", "lenet300", *TINY[:2], "--subset", "64", "--epochs", "1", "--quiet",
                 "--method", "snip", "--density", "0.1", "--out", str(tmp_path / "r")]) == 0
    assert main(["pack", str(tmp_path / "r"), "-o", str(tmp_path / "r.cpk")]) == 0
    info = formats.read_info(tmp_path / "r.cpk")
    assert "interspace" not in info["schema"]["architecture"] and info["totals"]["basis_bytes"] == 0


# ---------------------------------------------------------------------------------------------------------------
# --basis-in-budget: interspace at equal trained parameters

_BUDGET_RUN = ["--model", "resnet20", "--data", "synthetic", "--data-shape", "3x8x8", "--subset", "64", "--batch-size",
               "32", "--score-batch-size", "32", "--epochs", "1", "--quiet", "--interspace", "--method", "snip"]


def test_basis_in_budget_trains_as_many_parameters_as_standard_pruning_at_the_same_density(tmp_path):
    assert main(["train", *_BUDGET_RUN, "--density", "0.05", "--basis-in-budget", "--out", str(tmp_path / "b")]) == 0
    assert main(["train", *_BUDGET_RUN, "--density", "0.05", "--out", str(tmp_path / "p")]) == 0
    budget = json.loads((tmp_path / "b" / "summary.json").read_text())
    plain = json.loads((tmp_path / "p" / "summary.json").read_text())
    bases = 19 * 81  # resnet20: 19 interspace layers, each a 9 x 9 basis
    assert budget["trained_compressible_params"] + bases == round(0.05 * budget["compressible_params"])
    assert plain["trained_compressible_params"] == round(0.05 * plain["compressible_params"])
    assert budget["trained_params"] == plain["trained_params"] - bases


@pytest.mark.parametrize("args, fragment", [
    (["--density", "0.005", "--basis-in-budget"], "fill the whole budget"),
    (["--density", "0.05", "--basis-in-budget", "--fixed-basis"], "drop one of them"),
])
def test_basis_in_budget_errors_name_the_fix(tmp_path, capsys, args, fragment):
    from cli_helpers import one_line_error, run_cli

    code, _, err = run_cli(["train", *_BUDGET_RUN, *args, "--out", tmp_path / "r"], capsys)
    one_line_error(code, err, fragment)
    code, _, err = run_cli(["train", *_BUDGET_RUN[:-3], "--method", "snip", "--density", "0.05", "--basis-in-budget",
                            "--out", tmp_path / "s"], capsys)
    one_line_error(code, err, "add --interspace")


# ---------------------------------------------------------------------------------------------------------------
# SynFlow through the absolute composed filter


def _resnet(basis: str | None, seed: int = 0):
    model = initialise(build_model("resnet20", (3, 8, 8), 10), seed)
    if basis is not None:
        to_interspace(model, basis)
        initialise(model, seed)
    return model


_ONE_BATCH = [(torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long))]


def test_composed_synflow_equals_synflow_with_the_spatial_basis_and_differs_with_the_dct():
    import copy

    spatial = _resnet("spatial")
    plain, composed = (score(copy.deepcopy(spatial), name, _ONE_BATCH, density=0.05)
                       for name in ("synflow", "synflow-composed"))
    assert all(torch.equal(plain[k], composed[k]) for k in plain)
    dct = _resnet("dct")
    plain, composed = (score(copy.deepcopy(dct), name, _ONE_BATCH, density=0.05)
                       for name in ("synflow", "synflow-composed"))
    moved = sum(int(((plain[k] > 0) != (composed[k] > 0)).sum()) for k in plain)
    assert moved > 1000  # |lam| |F| is not |lam F| for the DCT's signed basis


def test_composed_synflow_scores_the_coefficients_through_the_absolute_composed_filter():
    """Against a hand-built reference: the standard model with weights W = lam F, linearised as |W|, gives
    G = dR/d|W|; the chain rule through |W| = |lam F| gives dR/dlam = (G * sign(W)) F^T."""
    import copy

    from formats.interspace import interspace_weight, to_standard_state_dict

    model = _resnet("dct")
    state = {k: v.double() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    layers = [n.rpartition(".")[0] for n in state if n.endswith(".coefficients")]
    standard = build_model("resnet20", (3, 8, 8), 10).double().eval()
    standard.load_state_dict(to_standard_state_dict(state, layers))
    signed = {n: p.detach().clone() for n, p in standard.named_parameters()}
    with torch.no_grad():
        for tensor in [*standard.parameters(), *[b for b in standard.buffers() if b.is_floating_point()]]:
            tensor.abs_()
    weights = [standard.get_parameter(f"{layer}.weight") for layer in layers]
    output = standard(torch.ones(1, 3, 8, 8, dtype=torch.float64)).sum()
    grads = torch.autograd.grad(output, weights)
    composed = score(copy.deepcopy(model), "synflow-composed", _ONE_BATCH, density=1.0)
    for layer, g in zip(layers, grads):
        lam, basis = state[f"{layer}.coefficients"], state[f"{layer}.basis"]
        w = signed[f"{layer}.weight"]
        assert torch.allclose(interspace_weight(lam, basis), w)
        chained = (g * torch.sign(w)).reshape(lam.shape[0], lam.shape[1], -1) @ basis.reshape(lam.shape[2], -1).T
        expected = (lam * chained).abs().float()
        assert torch.allclose(composed[f"{layer}.coefficients"], expected, rtol=1e-4, atol=1e-30), layer
