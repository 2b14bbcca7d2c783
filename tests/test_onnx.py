"""ONNX export: every registered model in every mode agrees with formats.load in onnxruntime."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import safetensors.torch
import torch
from PIL import Image

import formats
import formats.onnx_export
from cli.main import main
from compress.init import init_rules, initial_values, initialise
from formats.models import MODELS, build_model
from formats.rng import GENERATOR_NAME, GENERATOR_VERSION
from compress.scores import score
from compress.selection import select
from formats.artifact import write_artifact
from formats.container import write_atomic

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SMALL_SHAPES = {"lenet300": (1, 8, 8), "lenet5": (1, 16, 16), "vgg16": (3, 8, 8), "resnet20": (3, 8, 8),
                "resnet18": (3, 8, 8), "tv:mobilenet_v3_small": (3, 16, 16)}


def make_artifact(path: Path, model_name: str, mode: str, density: float = 0.1, seed: int = 0) -> Path:
    """An artifact of an initialised model whose trained entries were perturbed (as training would)."""
    shape = SMALL_SHAPES[model_name]
    model = initialise(build_model(model_name, shape, 10), seed)
    masks = {}
    if mode != "dense":
        masks = select(score(model, "magnitude", []), density, mode=mode).masks
    state = model.state_dict()
    generator = torch.Generator().manual_seed(seed)
    init = initial_values(model, seed, list(masks))
    for name, tensor in state.items():
        if tensor.is_floating_point():
            tensor.add_(0.01 * torch.randn(tensor.shape, generator=generator))
        if name in masks:
            keep = masks[name]
            tensor.copy_(torch.where(keep, tensor, init[name] if mode == "freeze" else torch.zeros_like(tensor)))
    rules = {n: {"kind": r.kind, "bound": r.bound} for n, r in init_rules(model).items()}
    data = write_artifact(
        state, masks, mode=mode, seed=seed,
        architecture={"model": model_name, "input_shape": list(shape), "num_classes": 10}, init_rules=rules,
        manifest={"method": "test", "normalization": {"mean": [0.5] * shape[0], "std": [0.25] * shape[0]}},
        values="fp32", dense_fp32_bytes=len(safetensors.torch.save(state)),
        generator={"name": GENERATOR_NAME, "version": GENERATOR_VERSION},
    )
    write_atomic(path, data)
    return path


def onnxruntime_agrees(artifact: Path, onnx_path: Path) -> float:
    model = formats.load(artifact)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    shape = tuple(formats.read_info(artifact)["schema"]["architecture"]["input_shape"])
    worst = 0.0
    for batch in (1, 7):
        x = torch.randn((batch, *shape), generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = model(x).numpy()
        (got,) = session.run(None, {"input": x.numpy()})
        worst = max(worst, float(np.abs(got - expected).max()))
    return worst


CASES = [(name, mode) for name in ("lenet300", "lenet5", "resnet20") for mode in ("dense", "prune", "freeze")]
CASES += [("vgg16", "freeze"), ("resnet18", "prune"), ("tv:mobilenet_v3_small", "freeze")]


@pytest.mark.parametrize("model_name, mode", CASES)
def test_export_agrees_with_formats_load_for_every_model_and_mode(tmp_path, model_name, mode):
    artifact = make_artifact(tmp_path / "m.cpk", model_name, mode)
    report = formats.export_onnx(artifact, tmp_path / "m.onnx")
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-4
    assert onnxruntime_agrees(artifact, tmp_path / "m.onnx") <= 1e-4
    proto = onnx.load(str(tmp_path / "m.onnx"))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_every_registered_model_is_covered_by_the_export_tests():
    assert set(MODELS.names()) <= {name for name, _ in CASES}


def test_fp16_and_sparse_variants_shrink_the_file_and_still_verify(tmp_path):
    artifact = make_artifact(tmp_path / "p.cpk", "lenet5", "prune", density=0.05)
    sizes = {}
    for label, options in {"dense": {}, "fp16": {"fp16": True}, "sparse": {"sparse_initializers": True},
                           "both": {"fp16": True, "sparse_initializers": True}}.items():
        report = formats.export_onnx(artifact, tmp_path / f"{label}.onnx", **options)
        assert report.max_abs_diff <= 1e-4
        sizes[label] = report.onnx_bytes
        if "sparse_initializers" in options:
            assert report.sparse_initializers  # the mostly-zero weights were converted
    assert sizes["fp16"] < 0.55 * sizes["dense"]
    assert sizes["sparse"] < 0.3 * sizes["dense"] and sizes["both"] < sizes["sparse"]


def test_sparse_option_leaves_dense_weights_dense(tmp_path):
    artifact = make_artifact(tmp_path / "d.cpk", "lenet300", "dense")
    report = formats.export_onnx(artifact, tmp_path / "d.onnx", sparse_initializers=True)
    assert report.sparse_initializers == []


def test_a_failed_verification_removes_the_file_and_exits_1(tmp_path, monkeypatch, capsys):
    artifact = make_artifact(tmp_path / "f.cpk", "lenet300", "freeze")
    monkeypatch.setattr(formats.onnx_export, "_largest_difference", lambda *a, **k: 0.5)
    code = main(["export", str(artifact), "-o", str(tmp_path / "f.onnx")])
    err = capsys.readouterr().err
    assert code == 1 and "differ by 0.5" in err and err.count("\n") == 1
    assert not (tmp_path / "f.onnx").exists() and list(tmp_path.glob(".f.onnx*")) == []


def test_cli_export_prints_sizes_and_rejects_bad_input(tmp_path, capsys):
    artifact = make_artifact(tmp_path / "c.cpk", "lenet5", "freeze")
    assert main(["export", str(artifact), "-o", str(tmp_path / "c.onnx"), "--opset", "18"]) == 0
    out = capsys.readouterr().out
    assert "onnx file" in out and "packed artifact" in out and "dense fp32" in out and "largest" in out
    assert onnx.load(str(tmp_path / "c.onnx")).opset_import[0].version == 18
    for args, message in [
        (["--opset", "3"], "opset must be an integer"),
        ([], None),
    ]:
        target = tmp_path / "missing" / "x.onnx" if message is None else tmp_path / "x.onnx"
        code = main(["export", str(artifact), "-o", str(target), *args])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and (message or "does not exist") in err
    code = main(["export", str(tmp_path / "nope.cpk"), "-o", str(tmp_path / "y.onnx")])
    assert code == 2 and "does not exist" in capsys.readouterr().err


def write_pngs(directory: Path, count: int, shape) -> list[str]:
    generator = np.random.default_rng(0)
    paths = []
    for index in range(count):
        pixels = generator.integers(0, 256, size=(shape[1], shape[2]), dtype=np.uint8)
        path = directory / f"img{index}.png"
        Image.fromarray(pixels, mode="L").save(path)
        paths.append(str(path))
    return paths


def test_example_applications_agree_and_the_onnx_one_never_imports_torch(tmp_path):
    artifact = make_artifact(tmp_path / "e.cpk", "lenet5", "freeze")
    formats.export_onnx(artifact, tmp_path / "e.onnx")
    images = write_pngs(tmp_path, 4, (1, 16, 16))
    torch_run = subprocess.run([sys.executable, str(EXAMPLES / "classify_torch.py"), str(artifact), *images],
                               capture_output=True, text=True, check=True)
    block_torch = ("import sys, runpy; sys.modules['torch'] = None; sys.argv = sys.argv[1:]; "
                   "runpy.run_path(sys.argv[0], run_name='__main__')")
    onnx_run = subprocess.run([sys.executable, "-c", block_torch, str(EXAMPLES / "classify_onnx.py"),
                               str(tmp_path / "e.onnx"), *images], capture_output=True, text=True, check=True)
    torch_lines = torch_run.stdout.splitlines()
    assert len(torch_lines) == 4 and all(": class " in line for line in torch_lines)
    assert [line.split(" (p")[0] for line in torch_lines] == [line.split(" (p")[0] for line in onnx_run.stdout.splitlines()]


FASHION_TEST_IMAGES = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


@pytest.mark.skipif(not FASHION_TEST_IMAGES.is_file(), reason="Fashion-MNIST not installed")
def test_examples_read_idx_images(tmp_path, monkeypatch):
    monkeypatch.setitem(SMALL_SHAPES, "lenet300", (1, 28, 28))
    artifact = make_artifact(tmp_path / "i.cpk", "lenet300", "prune")
    formats.export_onnx(artifact, tmp_path / "i.onnx")
    outputs = []
    for script, model in (("classify_torch.py", artifact), ("classify_onnx.py", tmp_path / "i.onnx")):
        run = subprocess.run([sys.executable, str(EXAMPLES / script), str(model), "--idx", str(FASHION_TEST_IMAGES),
                              "--count", "3"], capture_output=True, text=True, check=True)
        outputs.append([line.split(" (p")[0] for line in run.stdout.splitlines()])
    assert outputs[0] == outputs[1] and [line.split(":")[0] for line in outputs[0]] == ["image 0", "image 1", "image 2"]
