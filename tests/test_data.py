"""Tests of compress/data.py: IDX parsing and discovery, splits, batches, synthetic and imagefolder sets."""
from __future__ import annotations

import gzip
import pathlib
import struct

import numpy as np
import pytest
import torch

from compress import data as D
from compress.data import download, registry
from compress.data import Split, load_data, read_idx

FASHION_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")


# ----------------------------------------------------------------------------------------- helpers


def idx_bytes(arr: np.ndarray) -> bytes:
    code = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}
    dt = arr.dtype if arr.dtype.itemsize == 1 else arr.dtype.newbyteorder(">")
    header = bytes([0, 0, code[dt], arr.ndim]) + b"".join(struct.pack(">I", s) for s in arr.shape)
    return header + arr.astype(dt).tobytes()


def write_idx(path: pathlib.Path, arr: np.ndarray, gz: bool) -> pathlib.Path:
    raw = idx_bytes(arr)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    return path


def write_mnist_like(d: pathlib.Path, n_train=50, n_test=20, gz=True, fill=None, seed=0) -> None:
    """A tiny fake MNIST in IDX format; ``fill`` sets every pixel (to tell copies apart)."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) if fill is None else np.full((n, 28, 28), fill, np.uint8)
        y = (np.arange(n) % 10).astype(np.uint8)
        write_idx(d / f"{prefix}-images-idx3-ubyte", x, gz)
        write_idx(d / f"{prefix}-labels-idx1-ubyte", y, gz)


@pytest.fixture
def no_system(monkeypatch, tmp_path):
    """No /usr/share search and no download attempt (records the attempts instead)."""
    calls = []
    monkeypatch.setattr(registry, "SYSTEM_DATA_DIRS", [tmp_path / "no-system-dir"])
    monkeypatch.setattr(download, "_download_torchvision", lambda cls, root: calls.append((cls, root)) or False)
    return calls


def small_split(n=10, c=1, h=4, w=4, augment=False) -> Split:
    x = torch.arange(n * c * h * w, dtype=torch.int64).remainder(256).to(torch.uint8).view(n, c, h, w)
    return Split(x, torch.arange(n) % 3, (0.5,) * c, (0.25,) * c, augment=augment)


# --------------------------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_roundtrip(tmp_path, gz):
    imgs = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    labels = np.arange(7, dtype=np.uint8)
    ints = np.arange(-6, 6, dtype=np.int32).reshape(3, 4)
    for name, arr in (("i", imgs), ("l", labels), ("n", ints)):
        out = read_idx(write_idx(tmp_path / name, arr, gz))
        assert out.shape == arr.shape and out.flags.writeable
        np.testing.assert_array_equal(out, arr)


def test_read_idx_bad_magic(tmp_path):
    p = tmp_path / "bad-idx"
    raw = bytearray(idx_bytes(np.zeros((2, 3), np.uint8)))
    raw[2] = 0x42  # unknown type code
    p.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="bad-idx.*magic"):
        read_idx(p)
    p.write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(ValueError, match="magic"):
        read_idx(p)


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_truncated(tmp_path, gz):
    raw = idx_bytes(np.zeros((4, 28, 28), np.uint8))[:-10]
    p = tmp_path / ("short.gz" if gz else "short")
    p.write_bytes(gzip.compress(raw) if gz else raw)
    with pytest.raises(ValueError, match="short.*truncated"):
        read_idx(p)
    # a gzip stream cut short is an error naming the file too
    p2 = tmp_path / "cut.gz"
    p2.write_bytes(gzip.compress(idx_bytes(np.zeros((4, 28, 28), np.uint8)))[:-20])
    with pytest.raises(ValueError, match="cut.gz"):
        read_idx(p2)


def test_idx_labels_count_mismatch(tmp_path, no_system):
    write_mnist_like(tmp_path, n_train=12)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(11, np.uint8), gz=True)
    with pytest.raises(ValueError, match="train-labels"):
        load_data("mnist", tmp_path)


# ------------------------------------------------------------------------------------- discovery


def test_discovery_order(tmp_path, monkeypatch):
    root = tmp_path / "root"
    system = tmp_path / "system"
    write_mnist_like(system / "fashion-mnist", fill=9)
    monkeypatch.setattr(registry, "SYSTEM_DATA_DIRS", [system])
    monkeypatch.setattr(download, "_download_torchvision", lambda *a: pytest.fail("no download expected"))
    root.mkdir()
    assert int(load_data("fashion-mnist", root).train.x[0, 0, 0, 0]) == 9  # only the system copy

    write_mnist_like(root / "FashionMNIST" / "raw", fill=3, gz=False)  # torchvision layout beats system
    assert int(load_data("fashion-mnist", root).train.x[0, 0, 0, 0]) == 3
    write_mnist_like(root / "fashion-mnist", fill=2)  # root/<name> beats torchvision layout
    assert int(load_data("fashion-mnist", root).train.x[0, 0, 0, 0]) == 2
    write_mnist_like(root, fill=1)  # root itself first
    d = load_data("fashion-mnist", root)
    assert int(d.train.x[0, 0, 0, 0]) == 1
    assert (len(d.train), len(d.test), d.input_shape, d.num_classes) == (50, 20, (1, 28, 28), 10)
    assert d.train.mean == (0.2860,) and d.train.std == (0.3530,)
    assert load_data("mnist", root).train.mean == (0.1307,)


def test_missing_files_message(tmp_path, no_system):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError) as e:
        load_data("fashion-mnist", empty)
    msg = str(e.value)
    assert "\n" not in msg
    for f in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        assert f in msg
    for d in (empty, empty / "fashion-mnist", empty / "FashionMNIST" / "raw", tmp_path / "no-system-dir" / "fashion-mnist"):
        assert str(d) in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    assert no_system == [("FashionMNIST", empty)]  # one download attempt, into root
    assert list(empty.iterdir()) == []


def test_download_failure_leaves_nothing(tmp_path, monkeypatch):
    """The real download helper, with torchvision's dataset replaced by one that fails half-way."""
    import torchvision.datasets as tvd

    class Failing:
        def __init__(self, root, train=True, download=False):
            p = pathlib.Path(root) / "FashionMNIST" / "raw"
            p.mkdir(parents=True)
            (p / "train-images-idx3-ubyte.gz").write_bytes(b"partial")
            print("Downloading ... noise")
            raise OSError("network is unreachable")

    monkeypatch.setattr(tvd, "FashionMNIST", Failing)
    root = tmp_path / "new" / "root"
    assert download._download_torchvision("FashionMNIST", root) is False
    assert not (tmp_path / "new").exists()  # directories it created are gone too
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("x")
    assert download._download_torchvision("FashionMNIST", existing) is False
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]


def test_download_success_moves_into_root(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    class Fake:
        def __init__(self, root, train=True, download=False):
            write_mnist_like(pathlib.Path(root) / "FashionMNIST" / "raw", fill=7)
            (pathlib.Path(root) / "archive.tar.gz").write_bytes(b"x")

    monkeypatch.setattr(tvd, "FashionMNIST", Fake)
    monkeypatch.setattr(registry, "SYSTEM_DATA_DIRS", [])
    d = load_data("fashion-mnist", tmp_path / "cache")
    assert int(d.train.x[0, 0, 0, 0]) == 7
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["FashionMNIST"]


def test_cifar_missing_message(tmp_path, no_system):
    with pytest.raises(FileNotFoundError, match=r"cifar10: need torchvision's cifar-10-batches-py/ .*offline"):
        load_data("cifar10", tmp_path)
    assert no_system == [("CIFAR10", tmp_path)]
    with pytest.raises(ValueError, match="fixed shape"):
        load_data("cifar10", tmp_path, shape=(1, 28, 28))


def test_cifar_loads_from_pickles(tmp_path, no_system, monkeypatch):
    """torchvision's CIFAR10 reader on a tiny fake folder (md5 check patched out)."""
    import pickle

    import torchvision.datasets as tvd

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, _ in tvd.CIFAR10.train_list + tvd.CIFAR10.test_list:
        entry = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 3]}
        (folder / name).write_bytes(pickle.dumps(entry))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(i) for i in range(10)]}))
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    d = load_data("cifar10", tmp_path)
    assert (len(d.train), len(d.test), d.input_shape, d.num_classes) == (20, 4, (3, 32, 32), 10)
    assert d.train.x.dtype == torch.uint8 and d.train.augment and not d.test.augment
    assert no_system == []


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason=f"{FASHION_DIR} missing (Debian package dataset-fashion-mnist)")
def test_real_fashion_mnist(tmp_path, monkeypatch):
    monkeypatch.setattr(download, "_download_torchvision", lambda *a: pytest.fail("no download expected"))
    d = load_data("fashion-mnist", tmp_path)  # empty root: found in /usr/share/datasets
    assert (len(d.train), len(d.test), d.num_classes, d.input_shape) == (60000, 10000, 10, (1, 28, 28))
    assert d.train.x.dtype == torch.uint8 and d.train.y.dtype == torch.int64
    assert d.train.y.bincount().tolist() == [6000] * 10
    x, y = next(d.train.batches(20000))
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1) < 0.05


# ----------------------------------------------------------------------------------- subset / val


def test_subset_and_val_split():
    d = load_data("synthetic", subset=1000, val_split=0.2, seed=5)
    assert (len(d.train), len(d.val), len(d.test)) == (800, 200, 1024)
    again = load_data("synthetic", subset=1000, val_split=0.2, seed=5)
    assert torch.equal(d.train.x, again.train.x) and torch.equal(d.val.y, again.val.y)
    other = load_data("synthetic", subset=1000, val_split=0.2, seed=6)
    assert not torch.equal(d.train.y, other.train.y)
    assert d.val.augment is False

    full = load_data("synthetic")
    assert full.val is None and len(full.train) == 4096
    # subset is a subset of the train split, test untouched
    sub = load_data("synthetic", subset=100)
    rows = {tuple(r.flatten()[:8].tolist()) for r in full.train.x}
    assert all(tuple(r.flatten()[:8].tolist()) in rows for r in sub.train.x)
    assert torch.equal(sub.test.x, full.test.x)
    # train and val are disjoint
    v = load_data("synthetic", val_split=0.25)
    assert (len(v.train), len(v.val)) == (3072, 1024)
    tr = {tuple(r.flatten()[:8].tolist()) for r in v.train.x}
    assert not any(tuple(r.flatten()[:8].tolist()) in tr for r in v.val.x)


@pytest.mark.parametrize(
    "kwargs, exc",
    [
        (dict(subset=0), ValueError),
        (dict(subset=4097), ValueError),
        (dict(subset=2.5), TypeError),
        (dict(val_split=1.0), ValueError),
        (dict(val_split=-0.1), ValueError),
        (dict(subset=3, val_split=0.1), ValueError),
        (dict(shape=(1, 28)), TypeError),
        (dict(shape=(0, 28, 28)), ValueError),
        (dict(num_classes=1), ValueError),
    ],
)
def test_bad_arguments(kwargs, exc):
    with pytest.raises(exc):
        load_data("synthetic", **kwargs)


def test_fixed_shape_mismatch(tmp_path, no_system):
    write_mnist_like(tmp_path)
    with pytest.raises(ValueError, match="fixed shape"):
        load_data("mnist", tmp_path, shape=(3, 32, 32))
    with pytest.raises(ValueError, match="10 classes"):
        load_data("mnist", tmp_path, num_classes=5)
    assert load_data("mnist", tmp_path, shape=(1, 28, 28), num_classes=10).num_classes == 10


def test_unknown_name():
    with pytest.raises(ValueError) as e:
        load_data("imagenet-xxl")
    msg = str(e.value)
    for n in ("cifar10", "cifar100", "fashion-mnist", "mnist", "synthetic", "imagefolder:PATH"):
        assert n in msg
    with pytest.raises(ValueError, match="imagefolder:PATH"):
        load_data("imagefolder")
    with pytest.raises(TypeError):
        load_data(3)


def test_default_data_root(monkeypatch, tmp_path):
    monkeypatch.setenv("COMPRESS_DATA", str(tmp_path / "c"))
    assert D.default_data_root() == tmp_path / "c"
    monkeypatch.delenv("COMPRESS_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert D.default_data_root() == tmp_path / "x" / "compress" / "data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert D.default_data_root() == pathlib.Path.home() / ".cache" / "compress" / "data"


# ---------------------------------------------------------------------------------------- batches


def test_batches_shapes_dtypes_normalisation():
    s = small_split(10)
    out = list(s.batches(4))
    assert [len(y) for _, y in out] == [4, 4, 2]  # last partial batch kept
    x0, y0 = out[0]
    assert x0.dtype == torch.float32 and y0.dtype == torch.int64 and x0.shape == (4, 1, 4, 4)
    expected = (s.x[:4].float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(x0, expected)
    assert torch.equal(torch.cat([y for _, y in out]), s.y)  # no shuffle: in order
    assert len(s) == 10


def test_batches_float_data_used_as_is():
    x = torch.randn(6, 2, 3, 3)
    s = Split(x, torch.zeros(6, dtype=torch.int64), (1.0, -1.0), (2.0, 0.5))
    xb, _ = next(s.batches(6))
    torch.testing.assert_close(xb[:, 0], (x[:, 0] - 1) / 2)
    torch.testing.assert_close(xb[:, 1], (x[:, 1] + 1) / 0.5)


def test_batches_shuffle_deterministic():
    s = small_split(50)

    def order(seed):
        g = torch.Generator().manual_seed(seed)
        return torch.cat([y for _, y in s.batches(8, shuffle=True, generator=g)]), torch.cat(
            [x for x, _ in s.batches(8, shuffle=True, generator=torch.Generator().manual_seed(seed))]
        )

    a, b, c = order(1), order(1), order(2)
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])
    assert not torch.equal(a[1], c[1])
    # same multiset of samples
    assert torch.equal(a[0].sort().values, s.y.sort().values)
    # the global RNG is neither used nor advanced
    torch.manual_seed(123)
    before = torch.get_rng_state()
    list(s.batches(8, shuffle=True, generator=torch.Generator().manual_seed(3)))
    list(small_split(8, augment=True).batches(4, shuffle=True, train=True))
    assert torch.equal(before, torch.get_rng_state())


def test_augmentation_only_when_training():
    n, c, h, w = 64, 3, 8, 8
    x = torch.randint(1, 256, (n, c, h, w), dtype=torch.uint8)  # no zeros: padding is visible
    s = Split(x, torch.zeros(n, dtype=torch.int64), (0.0,) * c, (1.0,) * c, augment=True)
    plain = next(s.batches(n))[0]
    assert torch.equal(plain, x.float() / 255)
    evaluated = next(s.batches(n, generator=torch.Generator().manual_seed(0)))[0]
    assert torch.equal(evaluated, plain)
    aug = next(s.batches(n, train=True, generator=torch.Generator().manual_seed(0)))[0]
    again = next(s.batches(n, train=True, generator=torch.Generator().manual_seed(0)))[0]
    assert aug.shape == plain.shape and torch.equal(aug, again)
    assert not torch.equal(aug, plain)
    # every augmented image is a (possibly flipped) shifted crop of its zero-padded source
    padded = torch.nn.functional.pad(plain, (4, 4, 4, 4))
    flips = 0
    for i in range(n):
        found = None
        for flip in (False, True):
            src = padded[i].flip(-1) if flip else padded[i]
            for oy in range(9):
                for ox in range(9):
                    if torch.equal(src[:, oy : oy + h, ox : ox + w], aug[i]):
                        found = flip
        assert found is not None
        flips += found
    assert 0 < flips < n
    # a split without augment is never augmented
    s2 = Split(x, s.y, s.mean, s.std, augment=False)
    assert torch.equal(next(s2.batches(n, train=True, generator=torch.Generator().manual_seed(0)))[0], plain)


def test_batches_bad_arguments():
    s = small_split()
    with pytest.raises(ValueError):
        s.batches(0)
    with pytest.raises(TypeError):
        s.batches(2.0)
    with pytest.raises(TypeError):
        s.batches(2, shuffle=True, generator=3)


# -------------------------------------------------------------------------------------- synthetic


def test_synthetic_deterministic_and_configurable():
    a, b, c = load_data("synthetic", seed=1), load_data("synthetic", seed=1), load_data("synthetic", seed=2)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    assert not torch.equal(a.train.x, c.train.x)
    assert a.input_shape == (1, 28, 28) and a.num_classes == 10
    assert (len(a.train), len(a.test)) == (4096, 1024)
    assert a.train.x.dtype == torch.float32 and a.train.mean == (0.0,) and a.train.std == (1.0,)
    assert abs(a.train.x.mean().item()) < 1e-3 and abs(a.train.x.std().item() - 1) < 1e-3
    assert sorted(a.train.y.unique().tolist()) == list(range(10))

    torch.manual_seed(0)
    state = torch.get_rng_state()
    d = load_data("synthetic", shape=(3, 16, 12), num_classes=4)
    assert torch.equal(state, torch.get_rng_state())
    assert d.input_shape == (3, 16, 12) and d.num_classes == 4 and d.train.x.shape[1:] == (3, 16, 12)
    assert d.train.mean == (0.0,) * 3 and sorted(d.test.y.unique().tolist()) == [0, 1, 2, 3]


def test_synthetic_is_learnable():
    d = load_data("synthetic", seed=0)
    torch.manual_seed(0)
    model = torch.nn.Linear(28 * 28, 10)  # logistic regression
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    steps = 0
    while steps < 300:
        for x, y in d.train.batches(128, shuffle=True, generator=g, train=True):
            loss = torch.nn.functional.cross_entropy(model(x.flatten(1)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
    with torch.no_grad():
        acc = sum((model(x.flatten(1)).argmax(1) == y).sum().item() for x, y in d.test.batches(512)) / len(d.test)
    assert 0.5 < acc < 0.99, acc


# ------------------------------------------------------------------------------------ imagefolder


def write_images(d: pathlib.Path, classes: dict[str, int], size=(10, 6), seed=0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for k, (name, n) in enumerate(classes.items()):
        (d / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            arr[..., 0] = 40 * k  # red channel tells the class
            Image.fromarray(arr).save(d / name / f"img{i}.png")


def test_imagefolder_carved_split(tmp_path):
    write_images(tmp_path / "pics", {"cat": 5, "dog": 5, "eel": 10})
    d = load_data(f"imagefolder:{tmp_path / 'pics'}")
    assert d.num_classes == 3 and d.input_shape == (3, 32, 32)
    assert (len(d.train), len(d.test)) == (16, 4)  # 20% of every class
    assert d.train.images().dtype == torch.uint8 and d.train.images().shape[1:] == (3, 32, 32)
    assert d.test.y.bincount(minlength=3).tolist() == [1, 1, 2]
    # labels follow the red channel (40 * class)
    assert torch.equal((d.train.images()[:, 0].float().mean((1, 2)) / 40).round().long(), d.train.y)
    # normalisation computed from the training images
    xf = d.train.images().double() / 255
    torch.testing.assert_close(torch.tensor(d.train.mean, dtype=torch.float64), xf.mean((0, 2, 3)))
    torch.testing.assert_close(
        torch.tensor(d.train.std, dtype=torch.float64), xf.permute(1, 0, 2, 3).flatten(1).std(1, unbiased=False)
    )
    # the carve does not depend on seed; subsets do
    d2 = load_data(f"imagefolder:{tmp_path / 'pics'}", seed=9)
    assert torch.equal(d.test.images(), d2.test.images())
    g = load_data(f"imagefolder:{tmp_path / 'pics'}", shape=(1, 8, 12), num_classes=3)
    assert g.input_shape == (1, 8, 12) and g.train.images().shape[1:] == (1, 8, 12) and len(g.train.mean) == 1
    with pytest.raises(ValueError, match="num_classes"):
        load_data(f"imagefolder:{tmp_path / 'pics'}", num_classes=4)


def test_imagefolder_train_test_layout(tmp_path):
    root = tmp_path / "set"
    write_images(root / "train", {"a": 3, "b": 4})
    write_images(root / "val", {"b": 2}, seed=1)
    d = load_data(f"imagefolder:{root}", shape=(3, 5, 7))
    assert (len(d.train), len(d.test), d.num_classes) == (7, 2, 2)
    assert d.test.y.tolist() == [1, 1]  # "b" keeps train's index
    assert d.input_shape == (3, 5, 7) and d.test.images().shape == (2, 3, 5, 7)
    x, y = next(d.train.batches(7))
    assert x.dtype == torch.float32 and x.shape == (7, 3, 5, 7)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_data(f"imagefolder:{tmp_path / 'nope'}")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        load_data(f"imagefolder:{tmp_path / 'empty'}")
