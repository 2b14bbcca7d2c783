"""The portable generator: Philox known answers, golden stream hashes, exact float conversion."""
import math

import numpy as np
import pytest
import torch

from compress.init import init_rules, initial_values, initialise
from formats.models import build_model
from formats.rng import check_seed, philox4x32_10, random_uint32, stream_key, tensor_sha256, uniform

# Random123's published known-answer vectors for Philox4x32-10 (tests/kat_vectors).
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter, key, expected", KNOWN_ANSWERS)
def test_philox_matches_random123_known_answers(counter, key, expected):
    out = philox4x32_10(np.array(counter, dtype=np.uint32).reshape(4, 1), key)
    assert tuple(int(w) for w in out[:, 0]) == expected


def scalar_philox(counter, key):
    """An independent, scalar, pure-Python Philox4x32-10 (Salmon et al. 2011)."""
    c = list(counter)
    k0, k1 = key
    for r in range(10):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k0, p1 & 0xFFFFFFFF, (p0 >> 32) ^ c[3] ^ k1, p0 & 0xFFFFFFFF]
    return c


def test_stream_layout_matches_scalar_reference_across_chunks():
    seed, name = 7, "layer.weight"
    key = stream_key(seed, name)
    words = random_uint32(seed, name, 4 * 70_000)  # crosses the internal chunk boundary (65,536 blocks)
    for block in (0, 1, 65_535, 65_536, 69_999):
        expected = scalar_philox((block & 0xFFFFFFFF, block >> 32, 0, 0), key)
        assert words[4 * block : 4 * block + 4].tolist() == expected


def test_golden_stream_is_pinned_forever():
    assert random_uint32(0, "fc1.weight", 8).tolist() == [
        3495711951, 2071884389, 160316425, 4112024857, 95002553, 4199208725, 916109819, 393011729]
    assert tensor_sha256(uniform(0, "fc1.weight", (300, 784), 1 / 28)) == (
        "04a6388b54391bd7d8d41af746e2ddf2b4f8714cfb655f011f9d5ad5bbc8b8f3")
    assert tensor_sha256(uniform(123456789, "conv1.weight", (20, 1, 5, 5), 0.2)) == (
        "6e418c9c025f793f4ab79a40ac1352e76d47002d18c5b9e889b483e4f1e57a24")


def test_uniform_values_are_exact_multiples_of_the_bound_grid():
    bound = 0.1
    values = uniform(3, "w", (10_000,), bound).numpy()
    words = random_uint32(3, "w", 10_000)
    unit = ((words >> 8).astype(np.int64) - (1 << 23)) / float(1 << 23)  # exact in float64
    expected = (unit.astype(np.float32) * np.float32(bound)).astype(np.float32)
    assert values.dtype == np.float32 and np.array_equal(values, expected)
    assert values.min() >= -bound and values.max() < bound


def test_uniform_has_the_moments_of_u_minus_bound_bound():
    values = uniform(11, "w", (200_000,), 1.0).double()
    assert abs(float(values.mean())) < 0.01
    assert abs(float(values.var()) - 1 / 3) < 0.01


def test_streams_differ_by_seed_and_name_and_prefixes_agree():
    a = uniform(1, "a", (1000,), 1.0)
    assert not torch.equal(a, uniform(2, "a", (1000,), 1.0))
    assert not torch.equal(a, uniform(1, "b", (1000,), 1.0))
    assert torch.equal(uniform(1, "a", (10,), 1.0), a[:10])


@pytest.mark.parametrize("bad", [-1, 2**32, 1.5, "3", True, None])
def test_seed_outside_32_bits_is_rejected(bad):
    with pytest.raises((ValueError, TypeError), match="seed"):
        check_seed(bad)


LENET5_SEED0 = {
    "conv1.weight": "b16d060168f6252690d854a7e7619308a3e5c440474b25dd0bb33e3cb316f035",
    "conv1.bias": "ad87f236b7e0f3c33d8a2ea97170393ad264825e3e1c6fdbb728616260661a49",
    "conv2.weight": "9b2f4cd851723823e2d2dce11debd59de74f8d8a2e34be0ee38fc6f631b6500e",
    "conv2.bias": "05bd7a5a2471d035f9065bd8e874517aee9335ddeb6411d329a31d1fc820ff55",
    "fc1.weight": "d1efee3a14424168791f06e3580846dc294532599f6d10ef31686cdf30862d47",
    "fc1.bias": "1efaa322d32578d115d00435fc16949d308dc68ebbaffe61dedb57a89bf4aaef",
    "fc2.weight": "2c7a80f9ad73082ca987181f67c2b1259b57a3e529115ae012c427bb2ae9cf68",
    "fc2.bias": "68d1f8f0365b9ae73db8f99533c079292efbfcc377bfb95b847ef4eaa2a0990f",
}


def test_lenet5_initialisation_matches_golden_hashes():
    model = initialise(build_model("lenet5", (1, 28, 28), 10), 0)
    assert {n: tensor_sha256(p) for n, p in model.named_parameters()} == LENET5_SEED0


def test_init_rule_is_pytorch_default_bound():
    model = build_model("lenet5", (1, 28, 28), 10)
    rules = init_rules(model)
    assert rules["conv1.weight"].bound == 1 / math.sqrt(25)
    assert rules["conv2.weight"].bound == 1 / math.sqrt(20 * 25)
    assert rules["fc1.bias"].bound == 1 / math.sqrt(800)


def test_initial_values_regenerate_the_initialised_model_bit_exactly():
    model = initialise(build_model("resnet20", (3, 32, 32), 10), 5)
    names = ["conv1.weight", "layer2.0.shortcut.0.weight", "fc.weight"]
    regenerated = initial_values(build_model("resnet20", (3, 32, 32), 10), 5, names)
    params = dict(model.named_parameters())
    for name in names:
        assert torch.equal(regenerated[name], params[name].detach())


def test_initialise_resets_batchnorm_to_identity():
    model = initialise(build_model("resnet20", (3, 32, 32), 10), 0)
    assert torch.equal(model.bn1.weight.detach(), torch.ones(16))
    assert torch.equal(model.bn1.bias.detach(), torch.zeros(16))
