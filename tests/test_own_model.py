"""Your own model in your own loop: sparsify, keep the masks with any optimizer, save, load into a fresh
instance; torch.nn.utils.prune models; custom-architecture malformations; formats imports no training stack."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as torch_prune
from torch import nn

import compress
import formats
from compress.init import initial_values
from formats.artifact import encode_artifact, parse_artifact, rebuild_state_dict, split_artifact
from formats.errors import FormatError, UserError

ROOT = Path(__file__).resolve().parents[1]


class OwnNet(nn.Module):
    """Not in any registry: conv, BatchNorm, linear."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3)
        self.bn = nn.BatchNorm2d(width)
        self.head = nn.Linear(width * 14 * 14, 4)

    def forward(self, x):
        return self.head(F.relu(self.bn(self.conv(x))).flatten(1))


def data(count=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 1, 16, 16, generator=generator), torch.randint(0, 4, (count,), generator=generator)


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-4),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),  # decoupled decay moves every entry
}


def train_ten_steps(model, sparse, optimizer, attach=True):
    x, y = data()
    if attach:
        sparse.attach(optimizer)
    for _ in range(10):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        if not attach:
            sparse.before_step()
        optimizer.step()
        if not attach:
            sparse.after_step()


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("mode", ["prune", "freeze"])
def test_own_model_in_own_loop_keeps_untrained_entries_exact_and_reloads_bit_identically(mode, optimizer, tmp_path):
    model = OwnNet()
    sparse = compress.sparsify(model, method="snip", mode=mode, density=0.1, batches=[data()], seed=3)
    initial = initial_values(model, 3, list(sparse.masks))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_ten_steps(model, sparse, OPTIMIZERS[optimizer](model.parameters()))
    for name, mask in sparse.masks.items():
        weight = model.get_parameter(name).detach()
        expected = initial[name] if mode == "freeze" else torch.zeros_like(weight)
        assert torch.equal(weight[~mask], expected[~mask]), name
        assert not torch.equal(weight[mask], before[name][mask]), name  # the trained entries did train
    info = compress.save(model, tmp_path / "own.cpk", sparse, values="fp32")
    assert info["totals"]["file_bytes"] * 3 < info["totals"]["dense_fp32_bytes"]
    fresh = formats.load(tmp_path / "own.cpk", model=OwnNet())
    a, b = model.state_dict(), fresh.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not fresh.training


def test_before_and_after_step_work_without_attach(tmp_path):
    model = OwnNet()
    sparse = compress.sparsify(model, method="freezenet", density=0.1, batches=[data()], seed=1)
    train_ten_steps(model, sparse, torch.optim.AdamW(model.parameters(), lr=1e-2), attach=False)
    assert sparse.steps == 10
    compress.save(model, tmp_path / "a.cpk", sparse)  # its consistency check: untrained entries at the init


def test_sparsify_initialises_from_the_seed_and_refuses_other_weights_in_freeze_mode_without_init():
    model = OwnNet()
    with pytest.raises(UserError, match="differ from the init of seed 0"):
        compress.sparsify(model, method="freezenet", density=0.1, batches=[data()], init=False)
    kept = {n: p.detach().clone() for n, p in model.named_parameters()}
    compress.sparsify(model, method="snip", density=0.1, batches=[data()], init=False)  # prune mode keeps them
    assert all(torch.equal(kept[n], p.detach()) or n in ("conv.weight", "head.weight")
               for n, p in model.named_parameters())
    compress.sparsify(model, method="freezenet", density=0.1, batches=[data()], seed=5)
    compress.sparsify(model, method="freezenet", density=0.1, batches=[data()], seed=5, init=False)  # now at init


@pytest.mark.parametrize("call, fragment", [
    (lambda: compress.sparsify(nn.Sequential(nn.ReLU(), nn.Embedding(3, 2)), density=0.1), "Conv1d, Conv2d, Conv3d"),
    (lambda: compress.sparsify(OwnNet(), method="snip", density=0.1), "need data"),
    (lambda: compress.sparsify(OwnNet(), method="snip"), "density=D"),
    (lambda: compress.sparsify(OwnNet(), method="snip", density=1.5, batches=[data()]), "density must be in (0, 1]"),
    (lambda: compress.sparsify(OwnNet(), method="nope", density=0.1), "unknown method 'nope'"),
    (lambda: compress.sparsify(OwnNet(), method="rigl", density=0.1), "total_steps"),
    (lambda: compress.sparsify(OwnNet(), method="dense", density=1.0), "nothing to sparsify"),
    (lambda: compress.sparsify("model", density=0.1), "torch.nn.Module"),
])
def test_a_wrong_call_is_a_user_error_naming_the_fix(call, fragment):
    with pytest.raises(UserError) as caught:
        call()
    assert fragment in str(caught.value)


def test_a_failing_call_leaves_the_model_untouched():
    model = OwnNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for call in (lambda: compress.sparsify(model, method="rigl", density=0.1),  # no total_steps
                 lambda: compress.sparsify(model, method="snip", density=0.1),  # no batches
                 lambda: compress.sparsify(model, method="rigl", density=0.1, total_steps=5, update_every=0)):
        with pytest.raises(UserError):
            call()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_tied_weights_are_refused_with_a_user_error():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight
    with pytest.raises(UserError, match="tied weights"):
        compress.sparsify(model, method="magnitude", density=0.5)


def test_a_diverged_dynamic_run_is_a_user_error_not_a_bug():
    model = OwnNet()
    sparse = compress.sparsify(model, method="set", density=0.2, total_steps=4, update_every=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparse.attach(optimizer)
    x, y = data()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    with torch.no_grad():
        model.head.weight.fill_(float("nan"))
    with pytest.raises(UserError, match="not finite"):
        optimizer.step()


def test_a_channels_last_model_saves_and_a_bad_rewind_is_a_user_error(tmp_path):
    model = OwnNet().to(memory_format=torch.channels_last)
    sparse = compress.sparsify(model, method="imp")
    compress.save(model, tmp_path / "cl.cpk", sparse)
    assert formats.load(tmp_path / "cl.cpk", model=OwnNet())
    with pytest.raises(UserError, match="rewind= is not a state dict"):
        sparse.next_level(0.5, rewind={"nope": torch.zeros(1)})


def test_a_manifest_the_reader_would_refuse_is_refused_before_writing(tmp_path):
    model = OwnNet()
    with pytest.raises(UserError, match="cannot save OwnNet"):
        compress.save(model, tmp_path / "bad.cpk", manifest={"test_acc": 95})
    assert not (tmp_path / "bad.cpk").exists()


def test_rigl_moves_the_masks_in_your_loop_with_exact_counts(tmp_path):
    model = OwnNet()
    sparse = compress.sparsify(model, method="rigl", density=0.2, seed=0, total_steps=10, update_every=2)
    start = sparse.masks
    train_ten_steps(model, sparse, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    assert [u["step"] for u in sparse.updates] == [2, 4, 6]  # before 0.75 x 10 steps
    final = sparse.masks
    assert {n: int(m.sum()) for n, m in final.items()} == {n: int(m.sum()) for n, m in start.items()}
    assert any(not torch.equal(start[n], final[n]) for n in start)
    compress.save(model, tmp_path / "rigl.cpk", sparse)


def test_imp_levels_in_your_loop_prune_the_smallest_and_rewind(tmp_path):
    model = OwnNet()
    sparse = compress.sparsify(model, method="imp", mode="freeze", seed=2)
    assert sparse.density == 1.0
    rewind = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    train_ten_steps(model, sparse, optimizer)
    trained = {n: model.get_parameter(n).detach().abs().clone() for n in sparse.masks}
    following = sparse.next_level(0.5, rewind=rewind)
    total = sum(m.numel() for m in sparse.masks.values())
    assert following.trained == total - round(0.5 * total)
    kept = torch.cat([trained[n][m] for n, m in following.masks.items()])
    dropped = torch.cat([trained[n][~m] for n, m in following.masks.items()])
    assert kept.min() >= dropped.max()
    for name, mask in following.masks.items():  # rewound, and removed weights at their seeded init
        assert torch.equal(model.get_parameter(name).detach(), rewind[name])
    train_ten_steps(model, following, optimizer, attach=False)  # next_level attached it already
    compress.save(model, tmp_path / "imp.cpk", following)


def test_a_model_pruned_with_torch_nn_utils_prune_packs_and_reloads(tmp_path):
    model = OwnNet()
    torch_prune.l1_unstructured(model.conv, "weight", amount=0.5)
    torch_prune.l1_unstructured(model.head, "weight", amount=0.9)
    info = compress.save(model, tmp_path / "pruned.cpk", values="fp32")
    assert info["schema"]["mode"] == "prune"
    assert info["totals"]["masked_trained"] == int(model.conv.weight_mask.sum() + model.head.weight_mask.sum())
    fresh = formats.load(tmp_path / "pruned.cpk", model=OwnNet())
    model.eval()
    x, _ = data(4)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    assert "conv.weight_orig" not in fresh.state_dict()


def test_a_skeleton_that_differs_gets_one_error_listing_every_difference(tmp_path):
    model = OwnNet()
    compress.save(model, tmp_path / "dense.cpk")
    with pytest.raises(UserError) as caught:
        formats.load(tmp_path / "dense.cpk", model=OwnNet(width=5))
    message = str(caught.value)
    assert "difference(s)" in message and "conv.weight: the model has float32 [5, 1, 3, 3]" in message
    assert "bn.running_mean" in message and "head.weight" in message
    with pytest.raises(UserError, match="class 'OwnNet'"):
        formats.load(tmp_path / "dense.cpk")  # a custom model needs its skeleton
    state = formats.load_state_dict(tmp_path / "dense.cpk")  # a state dict needs none
    assert sorted(state) == sorted(model.state_dict())


def test_a_registry_artifact_loads_into_a_skeleton_too(packed):
    from formats.models import build_model

    path = packed("prune")
    skeleton = build_model("lenet300", (1, 28, 28), 10)
    loaded = formats.load(path, model=skeleton)
    reference = formats.load(path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in reference.state_dict().items())


def test_save_refuses_an_existing_file_and_a_foreign_sparse(tmp_path):
    model = OwnNet()
    sparse = compress.sparsify(model, method="snip", density=0.1, batches=[data()])
    compress.save(model, tmp_path / "a.cpk", sparse)
    with pytest.raises(UserError, match="--force|force"):
        compress.save(model, tmp_path / "a.cpk", sparse)
    compress.save(model, tmp_path / "a.cpk", sparse, force=True)
    with pytest.raises(UserError, match="another model"):
        compress.save(OwnNet(), tmp_path / "b.cpk", sparse)
    assert not (tmp_path / "b.cpk").exists()


# ---------------------------------------------------------------------------------------------------------------
# the custom architecture in the file


@pytest.fixture(scope="module")
def custom_bytes(tmp_path_factory):
    model = OwnNet()
    sparse = compress.sparsify(model, method="freezenet", density=0.1, batches=[data()], seed=4)
    path = tmp_path_factory.mktemp("custom") / "c.cpk"
    compress.save(model, path, sparse)
    return path.read_bytes()


def test_a_custom_artifact_records_every_tensor(custom_bytes):
    artifact = parse_artifact(custom_bytes)
    architecture = artifact.schema["architecture"]
    assert artifact.schema["version"] == 5 and architecture["model"] == "custom" and architecture["class"] == "OwnNet"
    assert [item[0] for item in architecture["state"]] == list(OwnNet().state_dict())
    assert ["conv.weight", [8, 1, 3, 3], "F32"] in architecture["state"]
    assert ["bn.num_batches_tracked", [], "I64"] in architecture["state"]
    assert sorted(rebuild_state_dict(artifact)) == sorted(OwnNet().state_dict())


@pytest.mark.parametrize("change, fragment", [
    (lambda a: a.__setitem__("input_shape", [1, 8, 8]), "exactly the fields"),
    (lambda a: a.__setitem__("class", ""), "class must be a name"),
    (lambda a: a.__setitem__("class", 5), "class must be a name"),
    (lambda a: a.__setitem__("state", []), "must list 1 to"),
    (lambda a: a.__setitem__("state", "x"), "must list 1 to"),
    (lambda a: a["state"].append(list(a["state"][0])), "lists a tensor twice"),
    (lambda a: a["state"].__setitem__(0, ["conv.weight", [8, 1, 3], "F32"]), "n = 72 but the architecture has 24"),
    (lambda a: a["state"].__setitem__(0, ["conv.weight", [8, -1, 3, 3], "F32"]), "is not [name, shape"),
    (lambda a: a["state"].__setitem__(0, ["conv.weight", [1] * 9, "F32"]), "is not [name, shape"),
    (lambda a: a["state"].__setitem__(0, ["conv.weight", [8, 1, 3, 3], "F8"]), "is not [name, shape"),
    (lambda a: a["state"].__setitem__(0, ["conv.weight", [8, 1, 3, 3]]), "is not [name, shape"),
    (lambda a: a["state"].__setitem__(0, ["other", [8, 1, 3, 3], "F32"]), "name different tensors"),
    (lambda a: a["state"].__setitem__(0, ["conv.weight", [2**40, 2**40], "F32"]), "at most 2^48 entries"),
    (lambda a: [item.__setitem__(1, [2**40, 2**7]) for item in a["state"][:3]] and None, "more elements"),
    (lambda a: a["state"].__setitem__(1, ["conv.bias", [8], "I64"]), "must be stored as I64"),
    (lambda a: a["state"].__setitem__(0, ["conv.weight", [8, 1, 3, 3], ["F32"]]), "is not [name, shape"),
    (lambda a: a["state"].__setitem__(0, ["conv.weight", [8, 1, 3, 3], {"a": 1}]), "is not [name, shape"),
    (lambda a: a["state"].__setitem__(0, ["conv.weight", [0, 2**40, 2**40, 2**40], "F32"]), "is not [name, shape"),
])
def test_every_malformed_custom_architecture_is_a_format_error(custom_bytes, resign_schema, change, fragment):
    data = resign_schema(custom_bytes, lambda s: change(s["architecture"]))
    with pytest.raises(FormatError) as caught:
        rebuild_state_dict(parse_artifact(data))
    assert fragment in str(caught.value), str(caught.value)


def test_a_custom_architecture_in_a_version_2_file_is_a_format_error(custom_bytes):
    schema, tensors, _ = split_artifact(custom_bytes)
    for entry in schema["tensors"]:  # the plain layout (versions 1 to 4) has no layout fields
        for field in ("code", "dtype", "shape"):
            entry.pop(field, None)
    with pytest.raises(FormatError, match="needs format version 3"):
        parse_artifact(encode_artifact({**schema, "version": 2}, tensors, compact=False))


def test_a_custom_artifact_with_a_normalization_is_a_format_error(custom_bytes, resign_schema):
    def change(schema):
        schema["manifest"]["normalization"] = {"mean": [0.5], "std": [0.2]}

    with pytest.raises(FormatError, match="normalization"):
        parse_artifact(resign_schema(custom_bytes, change))


# ---------------------------------------------------------------------------------------------------------------
# layering


def test_formats_loads_a_lenet5_artifact_without_torchvision_click_onnx_or_the_training_stack(tmp_path):
    from cli.main import main

    run, path = tmp_path / "run", tmp_path / "lenet5.cpk"
    assert main(["train", "--model", "lenet5", "--data", "synthetic", "--subset", "128", "--epochs", "1", "--quiet",
                 "--method", "freezenet", "--density", "0.05", "--out", str(run)]) == 0
    assert main(["pack", str(run), "-o", str(path)]) == 0
    script = textwrap.dedent(f"""
        import sys

        BLOCKED = ("torchvision", "click", "onnx", "onnxruntime", "compress")
        for name in BLOCKED:  # "import NAME" now raises ImportError; importlib.util.find_spec(NAME) says absent
            sys.modules[name] = None
        for name in BLOCKED:
            try:
                __import__(name)
            except ImportError:
                pass
            else:
                raise SystemExit(f"{{name}} was not blocked")
        import torch, formats
        model = formats.load({str(path)!r})
        out = model(torch.zeros(2, 1, 28, 28))
        assert out.shape == (2, 10)
        assert not [m for m, module in sys.modules.items() if m.split(".")[0] in BLOCKED and module is not None]
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_the_formats_package_imports_nothing_of_compress_or_click_and_torchvision_only_for_tv_models():
    for path in (ROOT / "formats").glob("*.py"):
        imports = [line.strip() for line in path.read_text().splitlines()
                   if line.strip().startswith(("import ", "from "))]
        for module in ("compress", "click", "torchvision"):
            found = [line for line in imports if line.split()[1].split(".")[0] == module]
            allowed = module == "torchvision" and path.name == "models.py"  # only to build a tv: architecture
            assert not found or allowed, (path.name, found)


# ---------------------------------------------------------------------------------------------------------------
# the examples


def run_example(name: str, *args: str) -> str:
    result = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_own_model_example_trains_saves_and_reloads_identically(tmp_path):
    out = run_example("own_model.py", "--data", "synthetic", "--subset", "512", "--epochs", "1",
                      "--out", str(tmp_path / "own.cpk"))
    assert "outputs identical" in out and "density 1.00%" in out


@pytest.mark.slow  # a torchvision MobileNet: half a minute on two cores
def test_the_torchvision_example_saves_and_reloads_identically(tmp_path):
    out = run_example("own_torchvision.py", "--steps", "2", "--out", str(tmp_path / "tv.cpk"))
    assert "outputs identical" in out
