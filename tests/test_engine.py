"""The sparse engine: exact gradients at the trained entries, optimizer state over them, a plain model afterwards,
agreement with the dense engine, exact masks and frozen values, bit-exact resume, moving masks, checkpoints."""
import math

import pytest
import torch
from torch import nn

from compress.data import load_data
from compress.engine import SparseEngine, choose_kernels
from compress.engine.choice import SAMPLED_MIN_WEIGHTS
from compress.engine.kernels import EngineLayer, LayerKernels, SparseLayer
from compress.init import initial_values, initialise
from compress.scores import score
from compress.selection import Plan, select
from compress.training import MaskConstraint, TrainSettings, make_optimizer, train, training_step
from formats.errors import UserError
from formats.models import build_model

CPU = torch.device("cpu")
# Engines sum the same products in another order: after a few SGD steps the weights agree to this (relative to
# the largest weight), far below any effect on accuracy and far above float32 rounding of one step (1e-7).
ENGINE_TOLERANCE = 1e-4

LAYERS = {
    "linear": (lambda: nn.Linear(30, 20), (7, 30)),
    "linear-3d-input": (lambda: nn.Linear(12, 9), (2, 5, 12)),
    "conv2d": (lambda: nn.Conv2d(3, 8, 3, padding=1, stride=2), (4, 3, 9, 9)),
    "conv2d-dilated": (lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2), (2, 4, 8, 8)),
    "conv2d-groups": (lambda: nn.Conv2d(4, 6, 3, groups=2), (2, 4, 7, 7)),
    "conv1d": (lambda: nn.Conv1d(3, 5, 3), (2, 3, 10)),
    "conv3d": (lambda: nn.Conv3d(2, 3, 2), (2, 2, 4, 4, 4)),
}


def kernel_choices(module):
    choices = [LayerKernels("gather", "dense")]
    if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1):
        choices.append(LayerKernels("sampled", "dense"))
    if isinstance(module, nn.Linear):
        choices += [LayerKernels("sampled", "csr"), LayerKernels("gather", "csr")]
    return choices


@pytest.mark.parametrize("kind", list(LAYERS))
def test_every_kernel_gives_the_exact_gradients_at_the_trained_entries(kind):
    build, shape = LAYERS[kind]
    torch.manual_seed(0)
    module = build()
    for kernels in kernel_choices(module):
        mask = torch.rand(module.weight.shape) < 0.3
        if kernels.forward == "csr":  # prune mode: the untrained entries are exactly zero
            with torch.no_grad():
                module.weight.mul_(mask)
        inputs = torch.randn(*shape, requires_grad=True)
        reference = module(inputs)
        upstream = torch.randn_like(reference)
        reference.backward(upstream)
        expected = inputs.grad.clone(), module.weight.grad.clone(), module.bias.grad.clone()
        inputs.grad = module.weight.grad = module.bias.grad = None
        layer = SparseLayer("weight", module, mask, kernels)
        module.weight.requires_grad_(False)
        for capture in (False, True):
            layer.capture = capture
            output = EngineLayer(layer)(inputs)
            output.backward(upstream)
            torch.testing.assert_close(output, reference, msg=f"{kind} {kernels} forward")
            torch.testing.assert_close(inputs.grad, expected[0], msg=f"{kind} {kernels} input gradient")
            torch.testing.assert_close(layer.values.grad, expected[1][mask], msg=f"{kind} {kernels} weight gradient")
            torch.testing.assert_close(module.bias.grad, expected[2], msg=f"{kind} {kernels} bias gradient")
            assert layer.values.grad.shape == (int(mask.sum()),)
            if capture:
                torch.testing.assert_close(layer.dense_grad, expected[1], msg=f"{kind} {kernels} dense gradient")
            inputs.grad = layer.values.grad = module.bias.grad = None
        module.weight.requires_grad_(True)


def planned(model_name="lenet300", mode="freeze", density=0.05, seed=0, shape=(1, 28, 28)):
    model = initialise(build_model(model_name, shape, 10), seed)
    plan = select(score(model, "random", [], seed=seed, scope="layer"), density, "layer", mode)
    initial = initial_values(model, seed, list(plan.masks)) if mode == "freeze" else None
    return model, plan, initial


def test_installing_and_removing_the_engine_leaves_a_plain_model_with_the_trained_values():
    model, plan, initial = planned("lenet5", "prune")
    constraint = MaskConstraint(model, plan)
    constraint.project()
    types = {name: type(module) for name, module in model.named_modules()}
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    engine = SparseEngine.build("sparse", model, constraint, CPU)
    assert sorted(engine.layers) == sorted(plan.masks)
    with engine.installed(model):
        assert all(isinstance(model.get_submodule(n.rsplit(".", 1)[0]), EngineLayer) for n in plan.masks)
        assert list(model.state_dict()) == keys
        assert not any(params[name].requires_grad for name in plan.masks)
        with torch.no_grad():
            for layer in engine.layers.values():
                layer.values.add_(1.0)  # as an optimizer step would
    assert {name: type(module) for name, module in model.named_modules()} == types
    assert all(after is params[name] for name, after in model.named_parameters())
    assert all(param.requires_grad for param in model.parameters())
    for name, mask in plan.masks.items():
        weight = params[name].detach()
        assert bool((weight[~mask] == 0).all())
        assert bool((weight[mask] != 0).all())  # the stepped values were written back


def test_the_engine_takes_plain_linear_and_conv_weights_only():
    from formats.interspace import to_interspace

    model, _, _ = planned("resnet20", "prune", shape=(3, 32, 32))
    to_interspace(model)
    params = [n for n, p in model.named_parameters() if n.endswith(("weight", "coefficients")) and p.dim() > 1]
    plan = Plan("prune", {n: torch.ones_like(model.get_parameter(n), dtype=torch.bool) for n in params}, 1.0,
                "global", "all")
    engine = SparseEngine.build("sparse", model, MaskConstraint(model, plan), CPU)
    assert engine.layers and all(name.endswith(".weight") for name in engine.layers)
    assert not any(name.endswith("coefficients") for name in engine.layers)
    assert not SparseEngine.build("dense", model, MaskConstraint(model, plan), CPU)


def test_auto_uses_sparse_kernels_only_on_large_sparse_linear_layers_on_the_cpu():
    big, small, conv = nn.Linear(1000, SAMPLED_MIN_WEIGHTS // 1000 + 1), nn.Linear(10, 10), nn.Conv2d(16, 16, 3)
    def sparse_mask(module, density):  # exactly round(density x size) trained entries, at seeded places
        mask = torch.zeros(module.weight.numel(), dtype=torch.bool)
        order = torch.randperm(mask.numel(), generator=torch.Generator().manual_seed(0))
        mask[order[:round(density * mask.numel())]] = True
        return mask.reshape(module.weight.shape)

    assert choose_kernels("auto", big, sparse_mask(big, 0.01), "prune", CPU) == LayerKernels("sampled", "csr")
    assert choose_kernels("auto", big, sparse_mask(big, 0.015), "prune", CPU) == LayerKernels("sampled", "dense")
    assert choose_kernels("auto", big, sparse_mask(big, 0.03), "prune", CPU) == LayerKernels("gather", "dense")
    assert choose_kernels("auto", big, sparse_mask(big, 0.01), "freeze", CPU) == LayerKernels("sampled", "dense")
    assert choose_kernels("auto", big, sparse_mask(big, 0.5), "prune", CPU) == LayerKernels("gather", "dense")
    assert choose_kernels("auto", small, sparse_mask(small, 0.01), "prune", CPU) == LayerKernels("gather", "dense")
    assert choose_kernels("auto", conv, sparse_mask(conv, 0.01), "prune", CPU) == LayerKernels("gather", "dense")
    assert choose_kernels("auto", big, sparse_mask(big, 0.01), "prune", torch.device("cuda")) == LayerKernels()
    assert choose_kernels("sparse", conv, sparse_mask(conv, 0.01), "prune", CPU) == LayerKernels("sampled", "dense")
    assert choose_kernels("sparse", small, sparse_mask(small, 0.5), "freeze", CPU) == LayerKernels("sampled", "dense")


@pytest.fixture(scope="module")
def data():
    return load_data("synthetic", subset=256, seed=0)


def train_with(engine, model_name, mode, data, optimizer="sgd", epochs=1, density=0.05, **extra):
    shape = (1, 28, 28)
    model, plan, initial = planned(model_name, mode, density, shape=shape)
    constraint = MaskConstraint(model, plan, initial)
    settings = TrainSettings(epochs=epochs, batch_size=64, lr=0.02 if optimizer == "sgd" else 0.003,
                             optimizer=optimizer, weight_decay=5e-3, engine=engine)
    states = []
    history = train(model, data, settings, constraint, seed=0, device=CPU, progress=False,
                    on_epoch_end=lambda epoch, metrics, tensors: states.append(tensors), **extra)
    return model, plan, initial, history, states[-1]


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("mode", ["prune", "freeze"])
@pytest.mark.parametrize("model_name", ["lenet300", "lenet5"])
def test_the_sparse_engine_agrees_with_the_dense_one_and_keeps_the_plan_exact(data, model_name, mode, optimizer):
    dense, plan, initial, dense_history, _ = train_with("dense", model_name, mode, data, optimizer)
    sparse, _, _, sparse_history, state = train_with("sparse", model_name, mode, data, optimizer)
    scale = max(float(p.detach().abs().max()) for p in dense.parameters())
    for name, value in dense.state_dict().items():
        difference = float((sparse.state_dict()[name] - value).abs().max()) if value.is_floating_point() else 0
        assert difference <= ENGINE_TOLERANCE * scale, f"{name} differs by {difference:.3g}"
    assert sparse_history[-1]["train_loss"] == pytest.approx(dense_history[-1]["train_loss"], rel=1e-4)
    for name, mask in plan.masks.items():
        held = sparse.get_parameter(name).detach()[~mask]
        if mode == "prune":
            assert bool((held == 0).all()), name
        else:
            assert torch.equal(held, initial[name][~mask]), name
        for key in [k for k in state if k.startswith(f"optimizer/{name}/") and not k.endswith("/step")]:
            assert state[key].shape == (int(mask.sum()),), key  # vectors over the trained entries
        assert torch.equal(state[f"optimizer-index/{name}"].long(), mask.reshape(-1).nonzero().reshape(-1))


def test_the_sparse_engines_optimizer_state_is_a_few_percent_of_the_dense_one(data):
    *_, dense_state = train_with("dense", "lenet300", "freeze", data, "adam", density=0.01)
    *_, sparse_state = train_with("sparse", "lenet300", "freeze", data, "adam", density=0.01)
    size = lambda state: sum(t.numel() * t.element_size() for t in state.values())  # noqa: E731
    assert size(sparse_state) < 0.03 * size(dense_state)


def test_checkpoint_indices_take_the_narrowest_integer_type_of_their_weight():
    from compress.engine.session import index_dtype

    assert [index_dtype(n) for n in (1, 2**16, 2**16 + 1, 2**31 - 1, 2**31)] == [
        torch.uint16, torch.uint16, torch.int32, torch.int32, torch.int64]
    model = initialise(build_model("lenet300", (1, 28, 28), 10), 0)  # fc1 235,200 entries, fc2 30,000, fc3 1,000
    masks = {name: torch.rand(model.get_parameter(name).shape, generator=torch.Generator().manual_seed(1)) < 0.05
             for name in ("fc1.weight", "fc2.weight", "fc3.weight")}
    plan = Plan("prune", masks, 0.05, "global", "test")
    engine = SparseEngine.build("sparse", model, MaskConstraint(model, plan), CPU)
    stored = engine.index_tensors()
    assert {name: t.dtype for name, t in stored.items()} == {"optimizer-index/fc1.weight": torch.int32,
                                                           "optimizer-index/fc2.weight": torch.uint16,
                                                           "optimizer-index/fc3.weight": torch.uint16}
    for name, mask in masks.items():
        assert torch.equal(stored[f"optimizer-index/{name}"].long(), mask.reshape(-1).nonzero().reshape(-1))


def test_adamw_decays_only_the_trained_entries_under_both_engines(data):
    for engine in ("dense", "sparse"):
        model, plan, initial, _, _ = train_with(engine, "lenet300", "freeze", data, "adamw")
        for name, mask in plan.masks.items():
            assert torch.equal(model.get_parameter(name).detach()[~mask], initial[name][~mask]), (engine, name)


@pytest.mark.parametrize("engine", ["sparse", "auto", "dense"])
def test_a_resume_is_bit_exact_within_an_engine_with_moving_masks(data, engine):
    from compress.methods import METHODS
    from compress.strategies import STRATEGIES
    from types import SimpleNamespace

    strategy = STRATEGIES.get(METHODS.get("rigl").strategy)
    options = strategy.Options(update_every=2, update_until=0.9, drop_fraction=0.5)
    steps = math.ceil(256 / 64)

    def run(start_state=None):
        model, plan, initial = planned("lenet300", "freeze", 0.05)
        constraint = MaskConstraint(model, plan, initial)
        settings = TrainSettings(epochs=2, batch_size=64, lr=0.05, weight_decay=5e-3, engine=engine)
        saved = {}
        start_epoch = 0
        if start_state is not None:
            model.load_state_dict(start_state["model"])
            for name, mask in start_state["masks"].items():
                constraint.set_mask(name, mask)
            start_epoch = 1
        updater = strategy.mask_updater(SimpleNamespace(epochs=2, seed=0), options, steps, start_epoch * steps,
                                        start_state["updater"] if start_state else None)

        def keep(epoch, metrics, tensors):
            if epoch == 0:
                saved.update(model={k: v.clone() for k, v in model.state_dict().items()},
                             optimizer={k: v.clone() for k, v in tensors.items()},
                             masks=constraint.masks(), updater=updater.state())

        history = train(model, data, settings, constraint, seed=0, device=CPU, progress=False, on_epoch_end=keep,
                        mask_updater=updater, start_epoch=start_epoch,
                        optimizer_state=start_state["optimizer"] if start_state else None)
        return model, constraint, history, saved

    whole, whole_constraint, history, saved = run()
    updates = [u for epoch in history for u in epoch["mask_updates"]]
    assert updates and all(sum(u["grown"].values()) > 0 for u in updates)
    resumed, resumed_constraint, _, _ = run(saved)
    for key, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert all(torch.equal(whole_constraint.masks()[n], resumed_constraint.masks()[n]) for n in whole_constraint.names)


def test_a_mask_update_moves_the_optimizer_state_of_kept_entries_and_zeroes_the_grown_ones():
    model = nn.Sequential(nn.Linear(4, 3))
    mask = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=torch.bool)
    plan = Plan("prune", {"0.weight": mask}, 4 / 12, "layer", "test")
    constraint = MaskConstraint(model, plan)
    constraint.project()
    engine = SparseEngine.build("sparse", model, constraint, CPU)
    with engine.installed(model):
        optimizer = make_optimizer(model, TrainSettings(lr=0.1, momentum=0.9), constraint.names, engine)
        training_step(model, optimizer, constraint, torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]), 0.0,
                      engine=engine)
        values = engine.layers["0.weight"].values
        before = optimizer.state[values]["momentum_buffer"].clone()  # at flat entries 0, 2, 5, 11
        moved = mask.clone()
        moved[0, 0], moved[1, 2] = False, True  # drop entry 0, grow entry 6
        constraint.set_mask("0.weight", moved)
        engine.follow_masks(constraint, optimizer)
        values = engine.layers["0.weight"].values
        after = optimizer.state[values]["momentum_buffer"]  # at flat entries 2, 5, 6, 11
        assert torch.equal(engine.layers["0.weight"].index, torch.tensor([2, 5, 6, 11]))
        assert torch.equal(after, torch.stack([before[1], before[2], torch.tensor(0.0), before[3]]))
        assert float(values.detach()[2]) == 0.0  # a grown entry starts from the plan: zero in prune mode
        assert [p for g in optimizer.param_groups for p in g["params"] if p.dim() == 1 and len(p) == 4] == [values]


def test_the_csr_weights_follow_every_optimizer_step_and_mask_update():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    mask = torch.rand(5, 6) < 0.4
    constraint = MaskConstraint(model, Plan("prune", {"0.weight": mask}, 0.4, "layer", "test"))
    constraint.project()
    engine = SparseEngine.build("sparse", model, constraint, CPU)
    layer = engine.layers["0.weight"]
    assert layer.kernels == LayerKernels("sampled", "csr")

    def assert_csr_is_the_weight():
        engine.write_back()
        weight = model[0].weight.detach()
        assert torch.equal(layer.csr_weight().to_dense(), weight)
        assert torch.equal(layer.csr_weight_transposed().to_dense(), weight.t())

    with engine.installed(model):
        optimizer = make_optimizer(model, TrainSettings(lr=0.1, momentum=0.9), constraint.names, engine)
        for _ in range(3):
            training_step(model, optimizer, constraint, torch.randn(4, 6), torch.tensor([0, 1, 2, 3]), 5e-4,
                          engine=engine)
            assert_csr_is_the_weight()
        moved = mask.clone().reshape(-1)
        moved[moved.nonzero()[0]], moved[(~moved).nonzero()[0]] = False, True
        for grown in (moved.reshape(5, 6), mask | (torch.rand(5, 6) < 0.3)):  # one moved (the count kept), then more
            constraint.set_mask("0.weight", grown)
            engine.follow_masks(constraint, optimizer)
            training_step(model, optimizer, constraint, torch.randn(4, 6), torch.tensor([0, 1, 2, 3]), 5e-4,
                          engine=engine)
            assert_csr_is_the_weight()
            assert torch.equal(layer.csr_weight().to_dense() != 0, grown & (model[0].weight.detach() != 0))


def test_rigl_sees_the_same_dense_gradient_under_both_engines(data):
    inputs, labels = next(iter(data.train.batches(64)))
    gradients = {}
    for engine_name in ("dense", "sparse"):
        model, plan, initial = planned("lenet5", "prune", 0.05)
        constraint = MaskConstraint(model, plan)
        constraint.project()
        engine = SparseEngine.build(engine_name, model, constraint, CPU)
        with engine.installed(model):
            optimizer = make_optimizer(model, TrainSettings(engine=engine_name), constraint.names, engine)
            captured = {}
            training_step(model, optimizer, constraint, inputs, labels, 5e-4, captured, engine=engine)
        gradients[engine_name] = captured
    assert sorted(gradients["dense"]) == sorted(gradients["sparse"])
    for name, dense in gradients["dense"].items():
        torch.testing.assert_close(gradients["sparse"][name], dense, rtol=1e-4, atol=1e-6)
        assert bool((dense != 0).sum() > (plan.masks[name].sum())), "the dense gradient covers untrained entries"


@pytest.mark.parametrize("written_by, resumed_by, fragment", [("dense", "sparse", "not over its trained entries"),
                                                              ("sparse", "dense", "which this engine does not train")])
def test_optimizer_state_of_another_engine_is_refused_on_resume(data, written_by, resumed_by, fragment):
    *_, state = train_with(written_by, "lenet300", "freeze", data)
    model, plan, initial = planned("lenet300", "freeze")
    with pytest.raises(UserError, match=fragment):
        train(model, data, TrainSettings(epochs=2, batch_size=64, engine=resumed_by),
              MaskConstraint(model, plan, initial), seed=0, device=CPU, progress=False, start_epoch=1,
              optimizer_state=state)


def test_a_run_records_its_engine_and_runs_written_before_the_option_read_as_dense(tmp_path, capsys):
    import json

    from cli_helpers import run_cli
    from compress.config import stored_run_config

    code, _, err = run_cli(["train", "--model", "lenet300", "--data", "synthetic", "--subset", "256", "--method",
                            "freezenet", "--density", "0.01", "--engine", "sparse", "--epochs", "1", "--out",
                            str(tmp_path / "s")], capsys)
    assert code == 0, err
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    assert config["engine"] == "sparse"
    assert stored_run_config({k: v for k, v in config.items() if k != "engine"}).resolved().engine == "dense"
    assert build_config_engine({}) == "auto"


def build_config_engine(overrides):
    from compress.config import build_config

    return build_config(None, {"model": "lenet300", "method": "snip", "density": 0.1, **overrides}).resolved().engine


def test_an_unknown_engine_is_a_user_error():
    with pytest.raises(UserError, match="unknown engine 'fast'; known: dense, sparse, auto"):
        build_config_engine({"engine": "fast"})


@pytest.mark.parametrize("damage, fragment", [
    (lambda t: t.update({"optimizer-index/fc1.weight": t["optimizer-index/fc1.weight"].flip(0)}), "not a sorted index"),
    (lambda t: t.update({"optimizer-index/fc1.weight": t["optimizer-index/fc1.weight"].float()}), "not a sorted index"),
    (lambda t: t.update({"optimizer-index/fc1.weight": t["optimizer-index/fc1.weight"] + 10**7}), "not a sorted index"),
    (lambda t: t.update({"optimizer-index/nope.weight": t["optimizer-index/fc1.weight"].clone()}),
     "not a sorted index"),
    (lambda t: t["optimizer-index/fc2.weight"].__setitem__(-1, 40_000), "not a sorted index"),  # uint16, > 30,000
    (lambda t: t.update({"optimizer-index/fc2.weight": t["optimizer-index/fc2.weight"].to(torch.int16)}),
     "not a sorted index"),
    (lambda t: t.pop("optimizer/fc1.weight/momentum_buffer"), "no state of fc1.weight"),
    (lambda t: t.update({"optimizer/fc1.weight/momentum_buffer": t["optimizer/fc1.weight/momentum_buffer"][:-1]}),
     "of shape"),
])
def test_a_damaged_vector_optimizer_state_in_a_checkpoint_is_a_user_error(data, tmp_path, damage, fragment):
    from compress.run.checkpoint import read_checkpoint, save_checkpoint

    model, plan, initial, history, state = train_with("sparse", "lenet300", "freeze", data)
    tensors = {k: v.clone() for k, v in state.items()}
    settings = TrainSettings(epochs=2, batch_size=64, lr=0.02, weight_decay=5e-3, engine="sparse")
    save_checkpoint(tmp_path, model, tensors, history, plan.masks)
    assert read_checkpoint(tmp_path, model, settings, tmp_path, plan.masks).optimizer_state.keys() == tensors.keys()
    damage(tensors)
    save_checkpoint(tmp_path, model, tensors, history, plan.masks)
    with pytest.raises(UserError, match=fragment):
        read_checkpoint(tmp_path, model, settings, tmp_path, plan.masks)
