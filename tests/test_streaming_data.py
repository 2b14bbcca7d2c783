"""Image folders read lazily through a DataLoader: channels from the images, the same batches with any number of
workers as in memory, --augment for any data set, and class names printed, recorded and shown by the examples."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import formats
from cli_helpers import ROOT, run_cli
from compress.data import Split, load_data
from compress.data.folder import FolderSplit

GRAY = {"circle": 0, "cross": 1, "square": 2}


def write_folder(root: Path, mode: str = "L", per_class: int = 12, size: int = 20) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for k, name in enumerate(GRAY):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, (size, size), dtype=np.uint8)
            pixels[5:15, 5:15] += 60 * k  # the class is the brightness of the centre
            image = Image.fromarray(pixels, mode="L")
            (image if mode == "L" else image.convert("RGB")).save(root / name / f"{i}.png")
    return root


@pytest.mark.parametrize("mode, channels", [("L", 1), ("RGB", 3)])
def test_the_channels_follow_the_images_and_the_split_holds_no_image(tmp_path, mode, channels):
    data = load_data(f"imagefolder:{write_folder(tmp_path / 'pics', mode)}")
    assert data.input_shape == (channels, 32, 32) and len(data.train.mean) == channels
    assert isinstance(data.train, FolderSplit) and not hasattr(data.train, "x")  # file names only
    assert data.class_names() == ["circle", "cross", "square"]
    assert load_data(f"imagefolder:{tmp_path / 'pics'}", shape=(3, 16, 16)).input_shape == (3, 16, 16)


def test_batches_are_the_same_with_any_number_of_workers_and_as_in_memory(tmp_path):
    path = write_folder(tmp_path / "pics")
    streamed = {workers: load_data(f"imagefolder:{path}", workers=workers, augment="flip-crop").train
                for workers in (0, 2)}
    memory = Split(streamed[0].images(), streamed[0].y, streamed[0].mean, streamed[0].std, augment=True)

    def draw(split):
        return list(split.batches(7, shuffle=True, generator=torch.Generator().manual_seed(3), train=True))

    reference = draw(memory)
    for workers, split in streamed.items():
        batches = draw(split)
        assert len(batches) == len(reference) == 5  # 30 training images (80% of 36), batch 7
        for (x, y), (rx, ry) in zip(batches, reference):
            assert torch.equal(x, rx) and torch.equal(y, ry), workers


@pytest.mark.parametrize("augment", ["none", "flip-crop"])
def test_an_in_memory_set_gives_the_same_batches_through_dataloader_workers(augment):
    loaded = {workers: load_data("synthetic", subset=100, val_split=0.2, augment=augment, workers=workers)
              for workers in (0, 2)}
    assert all(split.workers == 2 for split in (loaded[2].train, loaded[2].val, loaded[2].test))
    for name in ("train", "val", "test"):
        drawn = [list(getattr(data, name).batches(16, shuffle=True, generator=torch.Generator().manual_seed(5),
                                                  train=True)) for data in loaded.values()]
        assert len(drawn[0]) == len(drawn[1]) > 1
        for (x, y), (rx, ry) in zip(*drawn):
            assert torch.equal(x, rx) and torch.equal(y, ry), name


def test_augment_applies_to_any_data_set_and_none_turns_it_off(tmp_path):
    plain = load_data("synthetic", subset=64)
    augmented = load_data("synthetic", subset=64, augment="flip-crop")
    assert not plain.train.augment and augmented.train.augment and not augmented.test.augment

    def first(data):
        return next(data.train.batches(64, shuffle=False, generator=torch.Generator().manual_seed(0), train=True))[0]

    assert not torch.equal(first(plain), first(augmented))
    assert torch.equal(first(plain), first(load_data("synthetic", subset=64, augment="none")))
    with pytest.raises(ValueError, match="unknown augmentation 'rotate'; known: none, flip-crop"):
        load_data("synthetic", augment="rotate")
    with pytest.raises(ValueError, match="workers must be a non-negative integer"):
        load_data("synthetic", workers=-1)


def test_the_built_in_sets_name_their_classes():
    data = load_data("fashion-mnist", subset=10)
    assert data.class_names()[:2] == ["T-shirt/top", "Trouser"] and len(data.class_names()) == 10
    assert load_data("synthetic", subset=10).class_names() == [str(i) for i in range(10)]


def test_a_folder_run_prints_its_data_records_class_names_and_the_examples_show_them(tmp_path, capsys):
    path = write_folder(tmp_path / "pics")
    out = tmp_path / "run"
    code, _, err = run_cli(["train", "--model", "lenet5", "--data", f"imagefolder:{path}", "--workers", "2",
                            "--augment", "flip-crop", "--method", "snip", "--density", "0.05", "--epochs", "1",
                            "--out", out], capsys)
    assert code == 0, err
    assert f"data imagefolder:{path}: 30 training and 6 test images of 1x32x32, 3 classes (circle, cross, square)" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["class_names"] == ["circle", "cross", "square"]
    assert summary["splits"] == {"train": 30, "val": 0, "test": 6}
    assert json.loads((out / "config.json").read_text())["augment"] == "flip-crop"
    assert run_cli(["pack", out, "-o", tmp_path / "r.cpk"], capsys)[0] == 0
    assert formats.read_info(tmp_path / "r.cpk")["schema"]["manifest"]["class_names"] == ["circle", "cross", "square"]
    shown = subprocess.run([sys.executable, ROOT / "examples" / "classify_torch.py", tmp_path / "r.cpk",
                            path / "cross" / "0.png"], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "0.png: class " in shown.stdout, shown.stderr
    assert any(f"({name})" in shown.stdout for name in GRAY), shown.stdout


def test_workers_are_a_runtime_option_not_part_of_the_runs_identity(tmp_path, capsys):
    path = write_folder(tmp_path / "pics", per_class=6)
    args = ["train", "--model", "lenet300", "--data", f"imagefolder:{path}", "--method", "snip", "--density", "0.1",
            "--epochs", "1", "--quiet", "--out", tmp_path / "run"]
    assert run_cli([*args, "--workers", "0"], capsys)[0] == 0
    code, _, err = run_cli([*args, "--workers", "2"], capsys)
    assert code == 0 and "nothing to do" in err


def test_a_bad_class_names_field_is_a_format_error(packed, resign_schema):
    data = packed("prune").read_bytes()
    for names in (["a"] * 3, [5] * 10, ["x" * 201] * 10, "abc"):
        changed = resign_schema(data, lambda schema: schema["manifest"].__setitem__("class_names", names))
        with pytest.raises(formats.FormatError, match="manifest class_names must be a list of one name"):
            formats.artifact.parse_artifact(changed)
