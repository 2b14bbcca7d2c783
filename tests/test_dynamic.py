"""Dynamic sparse training (SET, RigL): ERK counts, exact counts and disjoint drop/grow sets at every update,
RigL's grown set against a plain reference, grown weights and optimizer state, freeze and interspace modes,
resume (Ctrl-C and kill -9) bit-exact, pack and load, option errors."""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import compress.run.runner
import formats
from cli.main import main
from compress.allocation import erk_densities, layer_counts
from compress.config import config_from_dict
from compress.init import initial_values
from formats.models import build_model
from compress.params import compressible_parameters
from compress.run.pipeline import prepare
from compress.selection import Plan
from compress.strategies import STRATEGIES
from compress.strategies.dynamic import DynamicOptions, MaskSchedule, drop_fraction_at
from compress.training import MaskConstraint, make_optimizer, train, training_step
from cli_helpers import kill_9_when, one_line_error, run_cli

# 256 samples in batches of 64: 4 steps an epoch; an update after every step before 0.75 x 8 = 6 steps
QUICK = ["--model", "lenet5", "--data", "synthetic", "--subset", "256", "--batch-size", "64", "--quiet",
         "--density", "0.05", "--update-every", "1", "--epochs", "2"]
RUNS = {
    "rigl": [*QUICK, "--method", "rigl", "--allocation", "erk"],
    "set-freeze": [*QUICK, "--method", "set", "--mode", "freeze"],
    "rigl-adam": [*QUICK, "--method", "rigl", "--optimizer", "adam", "--lr", "0.001"],
    "rigl-interspace": ["--model", "resnet20", "--data", "synthetic", "--data-shape", "3x8x8", "--subset", "64",
                        "--batch-size", "16", "--quiet", "--density", "0.1", "--update-every", "1", "--epochs", "1",
                        "--interspace", "--method", "rigl"],
}
LENET5_SHAPES = {"conv1.weight": (20, 1, 5, 5), "conv2.weight": (50, 20, 5, 5), "fc1.weight": (500, 800),
                 "fc2.weight": (10, 500)}


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``trained(kind) -> run directory``: the finished run RUNS[kind], trained once per module."""
    cache = {}

    def get(kind: str):
        if kind not in cache:
            out = tmp_path_factory.mktemp("dynamic") / kind
            assert main(["train", *RUNS[kind], "--out", str(out)]) == 0, kind
            cache[kind] = out
        return cache[kind]

    return get


# ---------------------------------------------------------------------------------------------------------------
# ERK


def test_erk_densities_of_lenet5_match_the_hand_computed_values():
    # raw density (sum of dims)/(product): conv1 31/500, conv2 80/25000, fc1 1300/400000, fc2 510/5000. At 5% of
    # 430,500 = 21,525 weights, scale = 21525 / (31 + 80 + 1300 + 510) = 11.205 puts fc2 at 1.14 > 1: fc2 is dense,
    # and the scale becomes (21525 - 5000) / (31 + 80 + 1300) = 11.7116...
    densities = erk_densities(LENET5_SHAPES, 0.05)
    scale = 16525 / 1411
    assert densities["fc2.weight"] == 1.0
    assert densities["conv1.weight"] == pytest.approx(scale * 31 / 500) == pytest.approx(0.726116, abs=1e-6)
    assert densities["conv2.weight"] == pytest.approx(scale * 80 / 25000) == pytest.approx(0.0374770, abs=1e-7)
    assert densities["fc1.weight"] == pytest.approx(scale * 1300 / 400000) == pytest.approx(0.0380625, abs=1e-7)
    counts = layer_counts(LENET5_SHAPES, 0.05, "erk")
    assert counts == {"conv1.weight": 363, "conv2.weight": 937, "fc1.weight": 15225, "fc2.weight": 5000}
    assert sum(counts.values()) == 21525


def test_erk_densities_of_resnet20_keep_the_fc_and_first_shortcut_dense_at_10_percent():
    model = build_model("resnet20", (3, 32, 32), 10)
    shapes = {n: tuple(model.get_parameter(n).shape) for n in compressible_parameters(model)}
    total = sum(math.prod(s) for s in shapes.values())
    assert total == 270896
    densities = erk_densities(shapes, 0.1)
    # raw densities: fc 74/640 and layer2.0.shortcut 50/512 exceed 1 at the first scale 0.1 N / 1651 = 16.4;
    # without them the scale is (0.1 N - 640 - 512) / (1651 - 74 - 50), under which conv1 (25/432) stays at 0.98
    dense = {"fc.weight", "layer2.0.shortcut.0.weight"}
    scale = (0.1 * total - 640 - 512) / 1527
    assert sum(sum(s) for s in shapes.values()) == 1651
    for name, shape in shapes.items():
        expected = 1.0 if name in dense else scale * sum(shape) / math.prod(shape)
        assert densities[name] == pytest.approx(expected), name
    assert densities["conv1.weight"] == pytest.approx(0.982985, abs=1e-6)
    counts = layer_counts(shapes, 0.1, "erk")
    assert sum(counts.values()) == round(0.1 * total)
    assert all(abs(counts[n] - densities[n] * math.prod(shapes[n])) < 1 for n in shapes)


def test_erk_is_available_to_at_init_methods_through_plan(capsys):
    code, out, err = run_cli(["plan", "--model", "lenet5", "--data", "synthetic", "--method", "snip", "--allocation",
                              "erk", "--density", "0.05", "--json"], capsys)
    assert code == 0, err
    rows = {row["layer"]: row["trained"] for row in json.loads(out)}
    assert rows == layer_counts(LENET5_SHAPES, 0.05, "erk")


# ---------------------------------------------------------------------------------------------------------------
# one update, in isolation


def tiny_setup(mode: str, optimizer: str = "sgd"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = {"0.weight": torch.rand(5, 6, generator=torch.Generator().manual_seed(1)) < 0.4,
             "2.weight": torch.rand(3, 5, generator=torch.Generator().manual_seed(2)) < 0.5}
    plan = Plan(mode, masks, 0.4, "layer", "test")
    constraint = MaskConstraint(model, plan, initial)
    constraint.project()  # as training starts
    settings = compress.training.TrainSettings(epochs=1, lr=0.1, optimizer=optimizer)
    return model, initial, constraint, make_optimizer(model, settings, constraint.names)


def one_step(model, constraint, optimizer):
    inputs = torch.randn(8, 6, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    gradients = {}
    training_step(model, optimizer, constraint, inputs, labels, 5e-4, gradients)
    return gradients


def reference_update(weight, gradient, mask, k, rigl=True):
    """Plain RigL on one layer: drop the k trained entries of smallest |w| (ties: lower index), grow the k
    untrained entries of largest |g| (ties: lower index)."""
    w, g, m = weight.flatten().tolist(), gradient.flatten().tolist(), mask.flatten().tolist()
    active = sorted((abs(w[i]), i) for i in range(len(w)) if m[i])
    inactive = sorted((-abs(g[i]), i) for i in range(len(w)) if not m[i])
    return {i for _, i in active[:k]}, {i for _, i in inactive[:k]}


def schedule_for(strategy: str, every=1, until=1.0, fraction=0.5, total=10):
    return MaskSchedule(STRATEGIES.get(strategy), DynamicOptions(every, until, fraction), total, seed=7)


def test_rigl_grows_exactly_the_set_a_plain_reference_implementation_grows():
    model, _, constraint, optimizer = tiny_setup("prune")
    for step in range(3):
        before = {n: constraint.mask(n).clone() for n in constraint.names}
        weights = {n: constraint.parameter(n).detach().clone() for n in constraint.names}
        gradients = one_step(model, constraint, optimizer)
        weights = {n: constraint.parameter(n).detach().clone() for n in constraint.names}  # after the step
        schedule = schedule_for("rigl")
        fraction = drop_fraction_at(schedule.options, step + 1, schedule.until)
        record = schedule.update(step, constraint, optimizer, gradients)
        for name in constraint.names:
            k = min(round(fraction * int(before[name].sum())), before[name].numel() - int(before[name].sum()))
            drop, grow = reference_update(weights[name], gradients[name], before[name], k)
            after = constraint.mask(name).flatten()
            assert set(torch.nonzero(before[name].flatten() & ~after).flatten().tolist()) == drop, name
            assert set(torch.nonzero(~before[name].flatten() & after).flatten().tolist()) == grow, name
            assert record["dropped"][name] == record["grown"][name] == k > 0


@pytest.mark.parametrize("strategy", ["set", "rigl"])
@pytest.mark.parametrize("mode", ["prune", "freeze"])
def test_every_update_keeps_each_layers_count_and_drops_and_grows_disjoint_sets(strategy, mode):
    model, _, constraint, optimizer = tiny_setup(mode)
    counts = {n: int(constraint.mask(n).sum()) for n in constraint.names}
    schedule = schedule_for(strategy, fraction=0.6)
    moved_any = False
    for step in range(6):
        before = {n: constraint.mask(n).clone() for n in constraint.names}
        gradients = one_step(model, constraint, optimizer)
        record = schedule.update(step, constraint, optimizer, gradients)
        for name in constraint.names:
            after = constraint.mask(name)
            dropped, grown = before[name] & ~after, ~before[name] & after
            assert int(after.sum()) == counts[name]
            assert int(dropped.sum()) == int(grown.sum()) == record["dropped"][name] == record["grown"][name]
            moved_any |= bool(dropped.any())
        assert record["moved"] == pytest.approx(sum(record["dropped"].values()) / sum(counts.values()))
    assert moved_any and schedule.updates == 6


@pytest.mark.parametrize("optimizer_name", ["sgd", "adam"])
@pytest.mark.parametrize("mode", ["prune", "freeze"])
def test_grown_and_dropped_entries_restart_on_the_plan_with_zero_optimizer_state(mode, optimizer_name):
    model, initial, constraint, optimizer = tiny_setup(mode, optimizer_name)
    schedule = schedule_for("rigl", fraction=0.6)
    for step in range(2):  # two steps first, so that momentum / Adam moments are nonzero everywhere trained
        one_step(model, constraint, optimizer)
    before = {n: constraint.mask(n).clone() for n in constraint.names}
    gradients = one_step(model, constraint, optimizer)
    schedule.update(2, constraint, optimizer, gradients)
    for name in constraint.names:
        param, after = constraint.parameter(name), constraint.mask(name)
        changed = (before[name] & ~after) | (~before[name] & after)
        assert changed.any()
        untrained = ~after
        expected = initial[name] if mode == "freeze" else torch.zeros_like(param)
        assert torch.equal(param.detach()[untrained], expected[untrained])  # dropped entries are back on the plan
        grown = ~before[name] & after
        assert torch.equal(param.detach()[grown], expected[grown])  # grown entries start at zero / their init
        for key, value in optimizer.state[param].items():
            if torch.is_tensor(value) and value.shape == param.shape:
                assert not value[changed].any(), key
                assert value[before[name] & after].abs().sum() > 0, key  # kept entries keep their state


def test_set_grows_at_seeded_random_positions_the_same_every_time():
    results = []
    for _ in range(2):
        model, _, constraint, optimizer = tiny_setup("prune")
        schedule = schedule_for("set", fraction=0.6)
        gradients = one_step(model, constraint, optimizer)
        schedule.update(0, constraint, optimizer, gradients)
        results.append(constraint.masks())
    assert all(torch.equal(results[0][n], results[1][n]) for n in results[0])


def test_updates_are_due_every_t_steps_until_the_fraction_u_and_decay_as_a_cosine():
    schedule = schedule_for("rigl", every=3, until=0.75, fraction=0.3, total=20)
    assert schedule.until == 15
    assert [s + 1 for s in range(20) if schedule.due(s)] == [3, 6, 9, 12]  # at 15 the fraction is 0
    assert drop_fraction_at(schedule.options, 0, 15) == pytest.approx(0.3)
    assert drop_fraction_at(schedule.options, 15, 15) == pytest.approx(0.0)
    assert drop_fraction_at(schedule.options, 6, 15) == pytest.approx(0.15 * (1 + math.cos(math.pi * 6 / 15)))
    assert [schedule.updates_before(s) for s in (0, 3, 4, 15, 20)] == [0, 1, 1, 4, 4]


# ---------------------------------------------------------------------------------------------------------------
# whole runs


def test_a_rigl_run_moves_the_mask_with_exact_counts_and_records_every_update(trained):
    run = trained("rigl")
    start, final = load_file(str(run / "masks.safetensors")), load_file(str(run / "final_masks.safetensors"))
    assert {n: int(m.sum()) for n, m in start.items()} == layer_counts(LENET5_SHAPES, 0.05, "erk")
    assert {n: int(m.sum()) for n, m in final.items()} == {n: int(m.sum()) for n, m in start.items()}
    assert any(not torch.equal(start[n], final[n]) for n in start)
    updates = [u for epoch in metrics(run) for u in epoch["mask_updates"]]
    assert [u["step"] for u in updates] == [1, 2, 3, 4, 5]  # before 0.75 x 8 steps
    assert all(u["dropped"] == u["grown"] for u in updates)
    assert updates[0]["dropped"]["fc2.weight"] == 0  # ERK keeps fc2 dense: nothing to move
    assert updates[0]["moved"] > updates[-1]["moved"] > 0  # the cosine decay
    summary = json.loads((run / "summary.json").read_text())
    assert summary["scope"] == "erk" and summary["trained_compressible_params"] == 21525


@pytest.mark.parametrize("kind", ["rigl", "set-freeze", "rigl-interspace"])
def test_untrained_entries_are_on_the_plan_after_training_and_the_artifact_loads_bit_exactly(kind, trained, tmp_path,
                                                                                            capsys):
    run = trained(kind)
    config = json.loads((run / "config.json").read_text())
    state, final = load_file(str(run / "model.safetensors")), load_file(str(run / "final_masks.safetensors"))
    if config["mode"] == "freeze":
        prepared = prepare(config_from_dict(config), quiet=True, masks=final)
        initial = initial_values(prepared.model, config["seed"], list(final))
        for name, mask in final.items():
            assert torch.equal(state[name][~mask], initial[name][~mask]), name
    else:
        for name, mask in final.items():
            assert not state[name][~mask].any(), name
    code, _, err = run_cli(["pack", run, "-o", tmp_path / "a.cpk", "--values", "fp32"], capsys)  # consistency check
    assert code == 0, err
    info = formats.read_info(tmp_path / "a.cpk")
    assert info["totals"]["masked_trained"] == sum(int(m.sum()) for m in final.values())
    model = formats.load(tmp_path / "a.cpk")
    reference = prepare(config_from_dict(config), quiet=True, masks=final).model
    reference.load_state_dict(state)
    reference.eval()
    shape = (3, 8, 8) if "interspace" in kind else (1, 28, 28)
    inputs = torch.randn(4, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(inputs), reference(inputs), atol=1e-5)


def test_masks_are_enforced_after_every_step_while_they_move():
    config = config_from_dict({"model": "lenet5", "data": "synthetic", "subset": 128, "batch_size": 32, "epochs": 1,
                               "method": "set", "mode": "freeze", "density": 0.05, "update_every": 1,
                               "device": "cpu"}).resolved()
    prepared = prepare(config, quiet=True)
    initial = initial_values(prepared.model, config.seed, list(prepared.plan.masks))
    constraint = MaskConstraint(prepared.model, prepared.plan, initial)
    strategy = STRATEGIES.get("set")
    updater = strategy.mask_updater(config, config.strategy_settings(), 4, 0, None)
    checked = []

    def check(step):
        for name in constraint.names:
            untrained = ~constraint.mask(name)
            assert torch.equal(constraint.parameter(name).detach()[untrained], initial[name][untrained])
        checked.append(step)

    history = train(prepared.model, prepared.data, config.train_settings(), constraint, seed=0,
                    device=torch.device("cpu"), on_step_end=check, progress=False, mask_updater=updater)
    assert checked == [0, 1, 2, 3] and len(history[0]["mask_updates"]) == 2  # after steps 1 and 2 of 3


def test_an_interruption_in_epoch_2_resumes_bit_identically(trained, tmp_path, capsys):
    reference = trained("rigl")
    run = interrupted_after_epoch_1(tmp_path / "run", capsys)
    code, _, err = run_cli(["train", "--resume", run, "--quiet"], capsys)
    assert code == 0, err
    assert_same_run(run, reference)


def interrupted_after_epoch_1(run: Path, capsys) -> Path:
    """The run RUNS["rigl"] in ``run``, stopped by Ctrl-C right after the checkpoint of epoch 1."""
    real = compress.run.runner.write_metrics

    def write_metrics(directory, history):
        real(directory, history)
        if len(history) == 1:
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(compress.run.runner, "write_metrics", write_metrics)
        code, _, err = run_cli(["train", *RUNS["rigl"], "--out", run], capsys)
    assert code == 130, err
    return run


def assert_same_run(run: Path, reference: Path):
    for name in ("model.safetensors", "final_masks.safetensors"):
        a, b = load_file(str(run / name)), load_file(str(reference / name))
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), name
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(metrics(run)) == strip(metrics(reference))


@pytest.mark.slow  # starts a process: .ci/run runs it (pytest -m slow)
def test_a_kill_9_during_epoch_2_resumes_bit_identically(trained, tmp_path, capsys):
    reference = trained("rigl")
    run = tmp_path / "run"
    args = [*RUNS["rigl"], "--epochs", "3"]
    assert main(["train", *args, "--out", str(tmp_path / "whole")]) == 0
    kill_9_when(["train", *args, "--out", run], run / "checkpoint.safetensors", tmp_path / "child.log")
    assert not (run / "summary.json").exists()
    code, _, err = run_cli(["train", "--resume", run, "--quiet"], capsys)
    assert code == 0, err
    assert_same_run(run, tmp_path / "whole")
    assert reference.exists()


def test_a_checkpoint_whose_masks_lost_their_count_is_refused_on_resume(trained, tmp_path, capsys):
    run = interrupted_after_epoch_1(tmp_path / "run", capsys)
    from compress.run.checkpoint import pack_mask, unpack_mask
    from compress.run.rundir import write_tensors
    from safetensors import safe_open

    path = run / "checkpoint.safetensors"
    with safe_open(str(path), "pt") as handle:
        metadata, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}
    mask = unpack_mask(tensors["mask/fc1.weight"], torch.Size([500, 800]))
    mask.view(-1)[torch.nonzero(~mask.view(-1))[0]] = True  # one more trained entry
    tensors["mask/fc1.weight"] = pack_mask(mask)
    write_tensors(path, tensors, metadata)
    code, _, err = run_cli(["train", "--resume", run, "--quiet"], capsys)
    one_line_error(code, err, "fc1.weight", "training 15226 entries")


@pytest.mark.parametrize("args, phrases", [
    (["--method", "rigl", "--density", "0.05", "--update-every", "0"], ["--update-every"]),
    (["--method", "set", "--density", "0.05", "--drop-fraction", "1.5"], ["--drop-fraction", "(0, 1]"]),
    (["--method", "rigl", "--density", "0.05", "--update-until", "0"], ["--update-until"]),
    (["--method", "rigl"], ["--density"]),
    (["--method", "imp", "--levels", "2", "--allocation", "erk"], ["ERK", "--allocation"]),
    (["--method", "rigl", "--density", "0.05", "--allocation", "erk", "--scope", "layer"], ["disagree"]),
    (["--method", "snip", "--density", "0.05", "--levels", "2"], ["--levels"]),
    (["--method", "imp", "--levels", "2", "--update-every", "5"], ["--update-every", "rigl"]),
])
def test_a_bad_dynamic_option_is_a_one_line_error_before_anything_is_written(args, phrases, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(["train", "--model", "lenet5", "--data", "synthetic", *args, "--out", out], capsys)
    one_line_error(code, err, *phrases)
    assert not out.exists()


def test_an_update_interval_longer_than_the_training_warns_that_the_mask_never_moves(tmp_path, capsys):
    code, _, err = run_cli(["train", "--model", "lenet5", "--data", "synthetic", "--subset", "128", "--quiet",
                            "--epochs", "1", "--method", "rigl", "--density", "0.05", "--out", tmp_path / "r"], capsys)
    assert code == 0, err
    assert "the mask never moves" in err


def test_train_help_documents_the_dynamic_options(capsys):
    code, out, _ = run_cli(["train", "--help"], capsys)
    assert code == 0
    flat = " ".join(out.split())
    for phrase in ("--update-every", "--update-until", "--drop-fraction", "--allocation [global|uniform|erk]",
                   "--method rigl", "--method set"):
        assert phrase in flat, phrase
