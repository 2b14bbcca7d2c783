"""Training under a plan: masks hold after every step, weight decay never leaks, resume is exact."""
import copy
import math

import pytest
import torch

from compress.data import load_data
from compress.init import initial_values, initialise
from formats.models import build_model
from compress.scores import score
from compress.selection import select
from compress.training import MaskConstraint, TrainSettings, train

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data():
    return load_data("synthetic", subset=384, seed=0)


def planned_model(mode, density=0.05, seed=0):
    model = initialise(build_model("lenet5", (1, 28, 28), 10), seed)
    plan = select(score(model, "random", [], seed=seed), density, "global", mode)
    initial = initial_values(model, seed, list(plan.masks))
    return model, plan, initial


SETTINGS = [
    TrainSettings(epochs=1, batch_size=64, lr=0.05, optimizer="sgd", momentum=0.9, weight_decay=5e-3),
    TrainSettings(epochs=1, batch_size=64, lr=0.05, optimizer="sgd", momentum=0.9, nesterov=True, weight_decay=1e-2),
    TrainSettings(epochs=1, batch_size=64, lr=0.01, optimizer="adam", weight_decay=5e-3, schedule="constant"),
]


@pytest.mark.parametrize("mode", ["prune", "freeze"])
@pytest.mark.parametrize("settings", SETTINGS, ids=["sgd-momentum", "sgd-nesterov", "adam"])
def test_untrained_entries_hold_after_every_optimizer_step(data, mode, settings):
    model, plan, initial = planned_model(mode)
    constraint = MaskConstraint(model, plan, initial if mode == "freeze" else None)
    params = dict(model.named_parameters())
    start = {n: p.detach().clone() for n, p in params.items()}
    steps = []

    def check(step):
        steps.append(step)
        for name, mask in plan.masks.items():
            value = params[name].detach()
            held = value[~mask]
            if mode == "prune":
                assert bool((held == 0).all()), f"{name} re-densified at step {step}"
            else:
                assert torch.equal(held, initial[name][~mask]), f"{name} frozen entries moved at step {step}"

    train(model, data, settings, constraint, seed=0, device=CPU, on_step_end=check, progress=False)
    assert steps == list(range(math.ceil(384 / 64)))
    changed = [n for n, m in plan.masks.items() if not torch.equal(params[n].detach()[m], start[n][m])]
    assert changed, "the trained entries did not move at all"


def test_frozen_weights_stay_bitwise_equal_to_regenerated_init_in_training_model(data):
    model, plan, initial = planned_model("freeze", density=0.02)
    train(model, data, SETTINGS[0], MaskConstraint(model, plan, initial), seed=0, device=CPU, progress=False)
    regenerated = initial_values(build_model("lenet5", (1, 28, 28), 10), 0, list(plan.masks))
    for name, mask in plan.masks.items():
        assert torch.equal(model.get_parameter(name).detach()[~mask], regenerated[name][~mask])


def test_freeze_mode_without_initial_values_is_an_error():
    model, plan, _ = planned_model("freeze")
    with pytest.raises(ValueError, match="needs the initial value"):
        MaskConstraint(model, plan, None)


def test_training_is_deterministic_and_learns(data):
    results = []
    for _ in range(2):
        model, plan, initial = planned_model("prune", density=0.2)
        history = train(model, data, TrainSettings(epochs=2, batch_size=64, lr=0.05),
                        MaskConstraint(model, plan), seed=3, device=CPU, progress=False)
        results.append((history, model.state_dict()))
    (h1, s1), (h2, s2) = results
    assert [m["train_loss"] for m in h1] == [m["train_loss"] for m in h2]
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert h1[-1]["train_loss"] < h1[0]["train_loss"]


@pytest.mark.parametrize("engine", ["dense", "sparse"])
def test_resuming_from_an_epoch_checkpoint_equals_uninterrupted_training(data, engine):
    settings = TrainSettings(epochs=3, batch_size=64, lr=0.05, nesterov=True, momentum=0.9, engine=engine)
    model, plan, initial = planned_model("freeze")
    train(model, data, settings, MaskConstraint(model, plan, initial), seed=1, device=CPU, progress=False)

    saved = {}

    def keep(epoch, metrics, optimizer_tensors):
        if epoch == 0:
            saved["model"] = copy.deepcopy(interrupted.state_dict())
            saved["optimizer"] = {k: v.clone() for k, v in optimizer_tensors.items()}

    interrupted, plan2, initial2 = planned_model("freeze")
    train(interrupted, data, settings, MaskConstraint(interrupted, plan2, initial2), seed=1, device=CPU,
          on_epoch_end=keep, progress=False)
    resumed, plan3, initial3 = planned_model("freeze")
    resumed.load_state_dict(saved["model"])
    train(resumed, data, settings, MaskConstraint(resumed, plan3, initial3), seed=1, device=CPU,
          start_epoch=1, optimizer_state=saved["optimizer"], progress=False)
    for key, value in model.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


@pytest.mark.parametrize(
    "settings, expected",
    [
        # cosine is per step, here 1 step an epoch: 0.5 (1 + cos(pi s / 4)) at s = 0..3, worked out by hand
        (TrainSettings(epochs=4, lr=1.0, schedule="cosine"), [1.0, 0.8535533905932737, 0.5, 0.14644660940672627]),
        (TrainSettings(epochs=4, lr=1.0, schedule="step", step_size=2, lr_decay=0.5), [1.0, 1.0, 0.5, 0.5]),
        (TrainSettings(epochs=4, lr=1.0, schedule="multistep", milestones=[1, 3], lr_decay=0.1), [1.0, 0.1, 0.1, 0.01]),
        (TrainSettings(epochs=4, lr=1.0, schedule="constant"), [1.0] * 4),
    ],
)
def test_learning_rate_schedules(settings, expected):
    got = [settings.lr_at(step, 1) for step in range(4)]
    assert got == pytest.approx(expected)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"epochs": 0}, "epochs must be a positive integer"),
        ({"lr": -1.0}, "lr must be a positive number"),
        ({"optimizer": "lion"}, "unknown optimizer 'lion'; known: sgd, adam"),
        ({"schedule": "poly"}, "unknown schedule"),
        ({"weight_decay": 2.0}, "weight-decay must be in"),
        ({"optimizer": "adam", "nesterov": True}, "nesterov needs"),
        ({"eval_every": 0}, "eval-every must be a positive integer"),
    ],
)
def test_bad_settings_are_rejected(change, message):
    with pytest.raises(ValueError, match=message):
        TrainSettings(**change).validate()


def test_eval_every_evaluates_every_nth_and_always_the_last_epoch(data):
    model, plan, initial = planned_model("prune")
    settings = TrainSettings(epochs=5, batch_size=128, eval_every=2)
    history = train(model, data, settings, MaskConstraint(model, plan, initial), seed=0, device=CPU, progress=False)
    assert [("test_acc" in m) for m in history] == [False, True, False, True, True]
    assert all("train_loss" in m for m in history)


def test_training_hands_back_the_same_contiguous_parameters(data):
    model, plan, initial = planned_model("freeze")
    before = {name: param for name, param in model.named_parameters()}
    train(model, data, TrainSettings(epochs=1, batch_size=128), MaskConstraint(model, plan, initial), seed=0,
          device=CPU, progress=False)
    after = dict(model.named_parameters())
    assert all(after[name] is before[name] for name in before)  # optimizer and constraint kept valid references
    assert all(param.is_contiguous() for param in after.values())


@pytest.mark.parametrize("channels_last", [True, False])
def test_conv_nets_train_on_the_cpu_in_the_layout_asked_for(data, channels_last):
    model, plan, initial = planned_model("freeze")
    second_conv = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][1]  # 20 input channels: unambiguous
    seen = []
    second_conv.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)
                                         and module.weight.is_contiguous(memory_format=torch.channels_last)))
    train(model, data, TrainSettings(epochs=1, batch_size=128, eval_every=1), MaskConstraint(model, plan, initial),
          seed=0, device=CPU, progress=False, channels_last=channels_last)
    training_steps = math.ceil(len(data.train) / 128)
    assert seen[:training_steps] == [channels_last] * training_steps
