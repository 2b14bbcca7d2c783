"""Tests of formats/mask_codec.py: round trips, golden bytes, size target, malformed input, fuzzing.

A small pure-Python reference decoder, written from the module docstring alone, checks that the
vectorised implementation follows the documented byte layout for every codec.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from formats import mask_codec as mc  # noqa: E402
from formats.mask_codec import (  # noqa: E402
    MaskCodecError,
    decode_mask,
    encode_mask,
    mask_information_bits,
)

# ------------------------------------------------------------------------------------------------
# helpers


def random_mask(n: int, k: int, seed: int = 0) -> np.ndarray:
    mask = np.zeros(n, bool)
    mask[np.random.default_rng(seed).choice(n, k, replace=False)] = True
    return mask


def all_codec_streams(mask: np.ndarray) -> dict[int, bytes]:
    """The stream of every codec the encoder can build for this mask (not only the shortest)."""
    k = int(mask.sum())
    if k in (0, mask.size):
        return {mc.EMPTY: encode_mask(mask)}
    out = {}
    for size, codec, build in mc._candidates(mask, exhaustive=True):
        data = build()
        assert len(data) == size, (codec, len(data), size)
        out[codec] = data
    return out


def structured_masks() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    rows = np.zeros((40, 50), bool)
    rows[[1, 5, 6, 30]] = True  # whole rows kept (structured pruning)
    cols = np.zeros((40, 50), bool)
    cols[:, [0, 7, 49]] = True  # whole columns kept
    runs = np.zeros(3000, bool)
    for start in rng.choice(2900, 20, replace=False):
        runs[start : start + rng.integers(1, 100)] = True
    row_density = rng.random((64, 1)) ** 3  # rows of very different density
    varying = (rng.random((64, 300)) < row_density).ravel()
    return {
        "rows": rows.ravel(),
        "cols": cols.ravel(),
        "rows_complement": ~rows.ravel(),
        "runs": runs,
        "varying_rows": varying,
        "varying_rows_complement": ~varying,
        "alternating": np.arange(1000) % 2 == 0,
        "pairs": (np.arange(1000) // 2) % 2 == 0,
        "first_half": np.arange(1000) < 500,
        "last_one": np.arange(1000) == 999,
        "first_one": np.arange(1000) == 0,
        "one_zero_at_end": np.arange(1000) != 999,
        "periodic_784": (np.arange(784 * 20) % 784 < 28) | (np.arange(784 * 20) % 784 > 755),
    }


# ------------------------------------------------------------------------------------------------
# reference decoder, from the docstring


class _Bits:
    def __init__(self, payload: bytes):
        self.bits = [(byte >> (7 - i)) & 1 for byte in payload for i in range(8)]
        self.pos = 0

    def read(self, width: int) -> int:
        value = 0
        for _ in range(width):
            if self.pos >= len(self.bits):
                raise MaskCodecError("ref: out of bits")
            value = (value << 1) | self.bits[self.pos]
            self.pos += 1
        return value

    def finish(self) -> None:
        if (self.pos + 7) // 8 != len(self.bits) // 8 or any(self.bits[self.pos :]):
            raise MaskCodecError("ref: bad end of stream")


def _ref_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = 0
    for i in range(5):
        byte = data[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            assert not (byte == 0 and i > 0) and value <= 2**32
            return value, pos + i + 1
    raise MaskCodecError("ref: varint too long")


def _ref_table() -> list[int]:
    table = list(range(1, 17))
    for e in range(1, 40):
        for f in range(8):
            m = (8 + f) << e
            if 16 < m <= 2**32:
                table.append(m)
    return sorted(set(table))


def _ref_gs(reader: _Bits, ms: list[int]) -> list[int]:
    params = []
    for m in ms:
        if m == 1:
            params.append((0, 1))
        else:
            b = math.ceil(math.log2(m)) if m & (m - 1) else m.bit_length() - 1
            params.append((b - 1, 2**b - m))
    vs = [reader.read(width) for width, _ in params]
    rs = [v if v < u else 2 * v + reader.read(1) - u for v, (_, u) in zip(vs, params)]
    qs = []
    for _ in ms:
        q = 0
        while reader.read(1) == 0:
            q += 1
        qs.append(q)
    return [q * m + r for q, r, m in zip(qs, rs, ms)]


def ref_decode(data: bytes, n: int, k: int) -> np.ndarray:
    codec = data[0]
    if codec == 0:
        assert len(data) == 1
        return np.full(n, k == n and n > 0)
    if codec == 1:
        reader = _Bits(data[1:])
        mask = np.array([reader.read(1) for _ in range(n)], bool)
        reader.finish()
        return mask
    if codec in (2, 3, 4, 5):
        count = k if codec in (2, 4) else n - k
        if codec in (2, 3):
            m, pos = _ref_varint(data, 1)
            reader = _Bits(data[pos:])
            ms = [m] * count
        else:
            s, j0, w = data[1], data[2], data[3]
            reader = _Bits(data[4:])
            groups = -(-count // 2**s)
            table = _ref_table()
            js = [j0 + reader.read(w) for _ in range(groups)]
            ms = [table[js[i // 2**s]] for i in range(count)]
        gaps = _ref_gs(reader, ms)
        reader.finish()
        mask = np.zeros(n, bool)
        p = -1
        for g in gaps:
            p += g + 1
            mask[p] = True
        return ~mask if codec in (3, 5) else mask
    if codec == 6:
        r, pos = _ref_varint(data, 1)
        mz, pos = _ref_varint(data, pos)
        mo, pos = _ref_varint(data, pos)
        reader = _Bits(data[pos:])
        z = _ref_gs(reader, [mz] * r)
        o = _ref_gs(reader, [mo] * r)
        reader.finish()
        mask = np.zeros(n, bool)
        p = 0
        for i in range(r):
            p += z[i] + (1 if i else 0)
            mask[p : p + o[i] + 1] = True
            p += o[i] + 1
        return mask
    raise MaskCodecError("ref: unknown codec")


# ------------------------------------------------------------------------------------------------
# information limit


def test_information_bits_matches_exact_binomial():
    for n in range(0, 70):
        for k in range(0, n + 1):
            exact = math.log2(math.comb(n, k))
            assert mask_information_bits(n, k) == pytest.approx(exact, rel=1e-9, abs=1e-9)
    assert mask_information_bits(10**6, 0) == 0.0
    assert mask_information_bits(10**6, 10**6) == 0.0
    big = mask_information_bits(10**7, 10**5)
    assert big == pytest.approx(math.log2(math.comb(10**7, 10**5)), rel=1e-9)


@pytest.mark.parametrize("n, k", [(-1, 0), (3, 4), (3, -1)])
def test_information_bits_rejects_bad_counts(n, k):
    with pytest.raises(ValueError):
        mask_information_bits(n, k)


# ------------------------------------------------------------------------------------------------
# round trips


ROUND_TRIP_CASES = [(0, 0), (1, 0), (1, 1), (2, 1), (7, 3), (8, 4), (9, 8), (100, 1), (100, 99)]
ROUND_TRIP_CASES += [(1000, k) for k in (0, 1, 2, 5, 50, 123, 250, 499, 500, 501, 750, 998, 999)]
ROUND_TRIP_CASES += [(1000, 1000)]
ROUND_TRIP_CASES += [(10007, int(10007 * d)) for d in (0.001, 0.005, 0.03, 0.2, 0.4, 0.6, 0.97)]
ROUND_TRIP_CASES += [(10007, 9997)]
ROUND_TRIP_CASES += [(200_000, int(200_000 * d)) for d in (0.005, 0.1, 0.3, 0.5, 0.85)]


@pytest.mark.parametrize("n, k", ROUND_TRIP_CASES)
def test_round_trip_random(n, k):
    mask = random_mask(n, k, seed=n + k)
    data = encode_mask(mask)
    out = decode_mask(data, n, k)
    assert out.dtype == np.bool_ and out.shape == (n,)
    np.testing.assert_array_equal(out, mask)


@pytest.mark.parametrize("name, mask", list(structured_masks().items()))
def test_round_trip_structured(name, mask):
    n, k = mask.size, int(mask.sum())
    np.testing.assert_array_equal(decode_mask(encode_mask(mask), n, k), mask)


@pytest.mark.parametrize(
    "mask",
    [random_mask(n, k, seed=3) for n, k in [(2, 1), (3, 2), (50, 7), (300, 60), (300, 250)]]
    + [random_mask(2000, 30, seed=3)]
    + [m for name, m in structured_masks().items() if m.size <= 4000],
)
def test_every_codec_round_trips_and_matches_reference(mask):
    """Every codec (not only the winner) decodes exactly, in numpy and in the reference decoder."""
    n, k = mask.size, int(mask.sum())
    streams = all_codec_streams(mask)
    assert mc.BITMAP in streams and mc.RUNS in streams
    for codec, data in streams.items():
        assert data[0] == codec
        np.testing.assert_array_equal(decode_mask(data, n, k), mask, err_msg=mc.CODEC_NAMES[codec])
        np.testing.assert_array_equal(ref_decode(data, n, k), mask, err_msg=mc.CODEC_NAMES[codec])
    assert len(encode_mask(mask)) == min(len(d) for d in streams.values())


def test_all_codecs_are_exercised_by_the_encoder():
    chosen = {encode_mask(m)[0] for m in structured_masks().values()}
    chosen |= {encode_mask(random_mask(10**4, k))[0] for k in (0, 50, 5000, 9950)}
    chosen |= {encode_mask(random_mask(10**5, k))[0] for k in (25_000, 75_000)}
    assert chosen == set(mc.CODEC_NAMES), sorted(mc.CODEC_NAMES[c] for c in chosen)


def test_structured_masks_are_small():
    masks = structured_masks()
    assert len(encode_mask(masks["rows"])) <= 16  # 4 whole rows (3 runs) of 2000 entries
    assert len(encode_mask(masks["first_half"])) <= 8
    varying = masks["varying_rows"]
    # rows of different density: the adaptive codec beats the information limit of a uniform mask
    bound_bytes = mask_information_bits(varying.size, int(varying.sum())) / 8
    assert len(encode_mask(varying)) < 0.9 * bound_bytes


def test_deterministic_and_layout_independent():
    mask = random_mask(50_000, 2_000, seed=11)
    a = encode_mask(mask)
    assert encode_mask(mask.copy()) == a
    strided = np.zeros(100_000, bool)
    strided[::2] = mask
    assert encode_mask(strided[::2]) == a  # non-contiguous view
    assert encode_mask(mask) == a


# ------------------------------------------------------------------------------------------------
# golden bytes: pin the format (the values are worked out by hand in the comments)


def test_golden_golomb():
    # n=64, ones at 3, 20, 40: gaps 3, 16, 19; m = 8 (ties with 9, 10 at 16 bits; smallest m wins)
    # Rice: W=2, u=0: A = 01 00 01 (r>>1 of r=3,0,3), B = 1 0 1, U = 1 001 001
    mask = np.zeros(64, bool)
    mask[[3, 20, 40]] = True
    assert encode_mask(mask) == bytes([2, 8, 0b01000110, 0b11001001])


def test_golden_runs():
    # n=128, ones at 40..103: one run, z = 40 with m_z = 27 (W=4, u=5: q=1, r=13 -> v=9, extra 0),
    # o = 63 with m_o = 43 (W=5, u=21: q=1, r=20 -> v=20); bits 1001 0 01 10100 01 + 2 padding bits
    mask = np.zeros(128, bool)
    mask[40:104] = True
    assert encode_mask(mask) == bytes([6, 1, 27, 43, 0b10010011, 0b01000100])


def test_golden_bitmap_and_empty():
    mask = np.zeros(16, bool)
    mask[[1, 5, 6, 12]] = True
    assert encode_mask(mask) == bytes([1, 0b01000110, 0b00001000])  # MSB first
    assert encode_mask(np.zeros(5, bool)) == b"\x00"
    assert encode_mask(np.ones(5, bool)) == b"\x00"
    assert encode_mask(np.zeros(0, bool)) == b"\x00"
    np.testing.assert_array_equal(decode_mask(b"\x00", 5, 5), np.ones(5, bool))
    np.testing.assert_array_equal(decode_mask(b"\x00", 5, 0), np.zeros(5, bool))
    assert decode_mask(b"\x00", 0, 0).shape == (0,)


def test_golden_adaptive_table():
    assert mc.M_TABLE.size == 240
    assert mc.M_TABLE[:20].tolist() == list(range(1, 17)) + [18, 20, 22, 24]
    assert mc.M_TABLE[-1] == 2**32 and mc.M_TABLE.tolist() == _ref_table()


# ------------------------------------------------------------------------------------------------
# the size target


@pytest.mark.parametrize("density", [0.005, 0.01, 0.1, 0.25])
def test_size_within_two_percent_of_the_limit(density):
    n = 10**6
    k = int(n * density)
    mask = random_mask(n, k, seed=int(density * 1000))
    bound_bytes = mask_information_bits(n, k) / 8
    assert len(encode_mask(mask)) <= 1.02 * bound_bytes + 4


@pytest.mark.parametrize("density", [0.3, 0.4, 0.5, 0.6, 0.75, 0.9, 0.99])
def test_size_sensible_above_25_percent(density):
    n = 10**5
    k = int(n * density)
    mask = random_mask(n, k, seed=5)
    bound_bytes = mask_information_bits(n, k) / 8
    assert len(encode_mask(mask)) <= min(1.04 * bound_bytes + 4, 1 + n / 8)


# ------------------------------------------------------------------------------------------------
# input validation of the encoder


@pytest.mark.parametrize(
    "bad, error",
    [
        ([True, False], TypeError),
        (np.array([1, 0, 1], np.uint8), TypeError),
        (np.array([1.0, 0.0]), TypeError),
        (np.zeros((2, 3), bool), ValueError),
        (np.array(True), ValueError),
        (np.bool_(True), TypeError),
    ],
)
def test_encode_rejects_bad_input(bad, error):
    with pytest.raises(error):
        encode_mask(bad)


# ------------------------------------------------------------------------------------------------
# malformed streams


def _golomb_stream() -> tuple[bytes, int, int]:
    mask = random_mask(1000, 20, seed=1)
    data = encode_mask(mask)
    assert data[0] == mc.GOLOMB and data[1] < 0x80  # one-byte varint m
    return data, 1000, 20


def _adaptive_stream() -> tuple[bytes, int, int]:
    mask = structured_masks()["varying_rows"]
    data = all_codec_streams(mask)[mc.ADAPTIVE]
    return data, mask.size, int(mask.sum())


def _runs_stream() -> tuple[bytes, int, int]:
    mask = np.zeros(128, bool)
    mask[40:104] = True
    return encode_mask(mask), 128, 64


def _bad_cases():
    g, n, k = _golomb_stream()
    a, an, ak = _adaptive_stream()
    r, rn, rk = _runs_stream()
    yield "no data", b"", 10, 2, "empty data"
    yield "unknown codec", b"\x07", 10, 2, "unknown codec id 7"
    yield "unknown codec 255", b"\xff\x00", 10, 2, "unknown codec id 255"
    yield "empty + trailing byte", b"\x00\x00", 10, 0, "trailing byte"
    yield "empty with 0<k<n", b"\x00", 10, 3, "needs k == 0 or k == n"
    yield "bitmap for k == 0", b"\x01\x00\x00", 10, 0, "must use codec 0"
    yield "golomb for k == n", g, 20, 20, "must use codec 0"
    yield "bitmap too short", b"\x01\x80", 10, 1, "expected 2 bytes"
    yield "bitmap too long", b"\x01\x80\x00\x00", 10, 1, "expected 2 bytes"
    yield "bitmap padding", b"\x01\x80\x01", 10, 1, "padding"
    yield "bitmap popcount", b"\x01\xc0\x00", 10, 1, "2 ones, but k=1"
    yield "golomb truncated varint", bytes([2, 0x80]), n, k, "varint runs past the end"
    yield "golomb m = 0", bytes([2, 0]) + g[2:], n, k, "outside 1..n"
    yield "golomb m > n", bytes([2]) + mc._varint(1001) + g[2:], n, k, "outside 1..n"
    yield "golomb m > 2**32", bytes([2, 0x81, 0x80, 0x80, 0x80, 0x10]), n, k, "exceeds 2**32"
    too_long = bytes([2, 0x81, 0x80, 0x80, 0x80, 0x80, 0x01])
    yield "golomb varint too long", too_long, n, k, "longer than 5"
    yield "golomb varint not minimal", bytes([2, 0x85, 0x00]) + g[2:], n, k, "not minimal"
    yield "golomb truncated", g[:-1], n, k, "terminators"
    yield "golomb cut after header", g[:3], n, k, "truncated"
    yield "golomb trailing byte", g + b"\x00", n, k, "trailing byte"
    yield "golomb trailing garbage", g + b"\xff" * 2, n, k, "trailing byte"
    yield "golomb huge trailing garbage", g + b"\x00" * 10**6, n, k, "longest valid stream"
    yield "golomb wrong k (more)", g, n, k + 1, "terminators"
    yield "golomb wrong k (fewer)", g, n, k - 1, None
    yield "golomb longer than any valid stream", g, 300, k, "longest valid stream"
    # m = 2 (Rice, W=0, u=0): B = 1 0, U = 001 001: gaps 5, 4, so the second one lands at 10
    yield "golomb runs past n", bytes([2, 2, 0b10001001]), 10, 2, "runs past n = 10"
    yield "golomb m = 1 runs past n", bytes([2, 1, 0b00001000, 0b00100000]), 10, 2, "terminators"
    # m = 3 (W=1, u=1): A = 0 0, U = 00001 1: the first quotient 4 exceeds (12 - 2) // 3
    yield "golomb value beyond n", bytes([2, 3, 0b00000011]), 12, 2, "a value exceeds 10"
    yield "golomb-compl no terminators", bytes([3, 1, 0x00]), 6, 4, "0 of 2 terminators"
    yield "adaptive truncated header", a[:3], an, ak, "3 parameter bytes"
    yield "adaptive group size", a[:1] + bytes([31]) + a[2:], an, ak, "exceeds 2**30"
    yield "adaptive width", a[:3] + bytes([9]) + a[4:], an, ak, "field width 9"
    yield "adaptive j0", a[:2] + bytes([240]) + a[3:], an, ak, "j0=240"
    yield "adaptive large j0, stream too short", a[:2] + bytes([239]) + a[3:], an, ak, "cannot hold 4502 coded values"
    # one gap (k = 1), groups of 1, 3-bit fields: j0 = 235 plus the field 7 is beyond the 240-entry table
    yield "adaptive j beyond table", bytes([4, 0, 235, 3, 0xE0, 0, 0, 0, 0]), 100, 1, "group table index 242"
    yield "adaptive m > n", bytes([4, 0, 0, 8, 200, 0]), 100, 1, "> n=100"
    yield "adaptive truncated", a[:-1], an, ak, "terminators"
    yield "adaptive trailing", a + b"\x00", an, ak, "trailing byte"
    yield "runs R = 0", bytes([6, 0, 27, 43]) + r[4:], rn, rk, "R=0"
    yield "runs R too large", bytes([6, 65, 27, 43]) + r[4:], rn, rk, "R=65"
    yield "runs m_z = 0", bytes([6, 1, 0, 43]) + r[4:], rn, rk, "m_z=0"
    yield "runs wrong k", r, rn, rk - 1, "run lengths sum to 64, but k=63"
    yield "runs past n", r, 100, rk, "past n = 100"
    yield "runs nonzero padding", r[:-1] + bytes([r[-1] | 1]), rn, rk, "padding"
    yield "runs trailing", r + b"\x00", rn, rk, "trailing byte"
    yield "runs truncated", r[:-1], rn, rk, "truncated"


@pytest.mark.parametrize(
    "name, data, n, k, message", list(_bad_cases()), ids=[case[0] for case in _bad_cases()]
)
def test_malformed_streams_raise_mask_codec_error(name, data, n, k, message):
    with pytest.raises(MaskCodecError, match=re.escape(message) if message else None):
        decode_mask(data, n, k)


def test_every_changed_last_byte_is_rejected_or_another_mask():
    """Streams are canonical: another byte string never decodes to the same mask (padding too)."""
    for mask in (random_mask(1001, 17, seed=2), random_mask(1001, 990, seed=2),
                 structured_masks()["varying_rows"], structured_masks()["runs"]):
        n, k = mask.size, int(mask.sum())
        for codec, data in all_codec_streams(mask).items():
            for bit in range(8):
                bad = data[:-1] + bytes([data[-1] ^ (1 << bit)])
                try:
                    out = decode_mask(bad, n, k)
                except MaskCodecError:
                    continue
                assert not np.array_equal(out, mask), (mc.CODEC_NAMES[codec], bit)


@pytest.mark.parametrize("n, k", [(-1, 0), (5, 6), (5, -1)])
def test_decode_rejects_bad_counts(n, k):
    with pytest.raises(MaskCodecError):
        decode_mask(b"\x00", n, k)


def test_decode_rejects_non_bytes():
    with pytest.raises(TypeError):
        decode_mask("\x00", 1, 0)


def test_decode_accepts_bytes_like():
    mask = random_mask(500, 40)
    data = encode_mask(mask)
    for view in (bytearray(data), memoryview(data)):
        np.testing.assert_array_equal(decode_mask(view, 500, 40), mask)


# ------------------------------------------------------------------------------------------------
# fuzzing: only MaskCodecError or a correct decode


def _decode_or_error(data: bytes, n: int, k: int) -> np.ndarray | None:
    try:
        out = decode_mask(data, n, k)
    except MaskCodecError:
        return None
    assert out.dtype == np.bool_ and out.shape == (n,)
    assert int(out.sum()) == k
    return out


_FUZZ_MASKS = [
    random_mask(300, 12, seed=1),
    random_mask(300, 290, seed=2),
    random_mask(64, 32, seed=3),
    structured_masks()["varying_rows"][:3000],
    structured_masks()["runs"],
    random_mask(1, 1),
    np.zeros(40, bool),
]
_FUZZ_STREAMS = [
    (data, m.size, int(m.sum())) for m in _FUZZ_MASKS for data in all_codec_streams(m).values()
]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    case=st.sampled_from(_FUZZ_STREAMS),
    edits=st.lists(
        st.tuples(st.sampled_from(["flip", "set", "cut", "append", "insert", "delete"]),
                  st.integers(0, 10**6), st.integers(0, 255)),
        min_size=1,
        max_size=4,
    ),
    dk=st.sampled_from([0, 0, 0, -1, 1]),
)
def test_fuzz_mutated_streams(case, edits, dk):
    data, n, k = case
    buf = bytearray(data)
    for op, where, value in edits:
        i = where % (len(buf) + 1)
        if op == "flip" and buf:
            buf[i % len(buf)] ^= 1 << (value % 8)
        elif op == "set" and buf:
            buf[i % len(buf)] = value
        elif op == "cut":
            del buf[i:]
        elif op == "append":
            buf.append(value)
        elif op == "insert":
            buf.insert(i, value)
        elif op == "delete" and buf:
            del buf[i % len(buf)]
    k2 = k + dk
    if not 0 <= k2 <= n:
        return
    out = _decode_or_error(bytes(buf), n, k2)
    if bytes(buf) == data and k2 == k:
        assert out is not None and np.array_equal(out, mc.decode_mask(data, n, k))


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=64), n=st.integers(0, 600), frac=st.floats(0, 1))
def test_fuzz_random_bytes(data, n, frac):
    _decode_or_error(data, n, int(n * frac))


@settings(max_examples=200, deadline=None)
@given(
    codec=st.integers(0, 6),
    rest=st.binary(max_size=40),
    n=st.integers(1, 400),
    frac=st.floats(0, 1),
)
def test_fuzz_random_bytes_with_valid_codec_id(codec, rest, n, frac):
    _decode_or_error(bytes([codec]) + rest, n, int(n * frac))


@settings(max_examples=150, deadline=None)
@given(bits=st.lists(st.booleans(), max_size=300))
def test_fuzz_round_trip_any_mask(bits):
    mask = np.array(bits, dtype=bool)
    data = encode_mask(mask)
    np.testing.assert_array_equal(decode_mask(data, mask.size, int(mask.sum())), mask)
    assert len(data) <= 1 + (mask.size + 7) // 8  # never worse than the bitmap


# ------------------------------------------------------------------------------------------------
# cost: a stream is checked against its count before anything is allocated, and decoding costs
# the n-byte mask plus a bounded working set (numpy's allocations are visible to tracemalloc)


def _peak_bytes(function) -> int:
    import tracemalloc

    tracemalloc.start()
    try:
        function()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


_HUGE_N = 300 * 946 * 946  # LeNet-300-100's fc1 on 946 x 946 inputs: 268,474,800 entries


@pytest.mark.parametrize(
    "data, k",
    [
        (bytes([mc.ADAPTIVE_COMPL, 3, 0, 0, 0]), 1),  # the reproduced case: 5 bytes claiming n - 1 gaps
        (bytes([mc.ADAPTIVE, 0, 0, 8, 0]), _HUGE_N - 1),
        (bytes([mc.GOLOMB, 1, 0]), _HUGE_N // 2),
        (bytes([mc.GOLOMB_COMPL, 1, 0xFF, 0xFF]), 1),
        (bytes([mc.RUNS, 0x80, 0x80, 0x10, 1, 1, 0xFF]), _HUGE_N // 2),
        (bytes([mc.BITMAP]) + b"\xff" * 8, 3),
    ],
    ids=["adaptive-compl", "adaptive", "golomb", "golomb-compl", "runs", "bitmap"],
)
def test_a_stream_too_short_for_its_count_is_rejected_before_allocating(data, k):
    def decode():
        with pytest.raises(MaskCodecError, match="cannot hold|expected"):
            decode_mask(data, _HUGE_N, k)
        with pytest.raises(MaskCodecError, match="cannot hold|expected"):
            mc.check_mask_code(data, _HUGE_N, k)

    assert _peak_bytes(decode) < 2**20


def test_a_valid_complement_code_costs_the_mask_plus_a_bounded_working_set():
    """k = 1 coded as golomb-compl with m = 1: n - 1 gaps (one unary bit each), the costliest valid code."""
    n, p = 2**22, 12345
    bits = np.ones(n, np.uint8)  # gap 0 is "1"; the zero after the one (at p) has gap 1: "01"
    bits[p] = 0
    data = bytes([mc.GOLOMB_COMPL, 1]) + np.packbits(bits).tobytes()
    expected = np.zeros(n, bool)
    expected[p] = True
    out = {}
    peak = _peak_bytes(lambda: out.setdefault("mask", decode_mask(data, n, 1)))
    np.testing.assert_array_equal(out["mask"], expected)
    assert peak < n + 12 * 2**20, peak  # was about 33 bytes per coded gap
