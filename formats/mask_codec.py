r"""Lossless coding of a 1-D boolean mask in close to its information limit, log2 C(n, k) bits.

``encode_mask(mask)`` sizes every codec below exactly and emits the shortest (ties: lowest id);
``decode_mask(data, n, k)`` inverts it, given the length ``n`` and popcount ``k`` that the caller
keeps (and checks) in its own header. All work is vectorised numpy: no Python loop per entry.

Byte layout
-----------
``data[0]``  codec id; then the codec's parameter bytes; then one bit stream to the end of data.

Bit stream: bit i is bit ``7 - i % 8`` of stream byte ``i // 8`` (MSB first, ``np.packbits``
default "big" order); multi-bit fields are MSB first. The stream is followed by 0..7 zero bits up to
the byte boundary; nonzero padding, or any byte after the one holding the last stream bit, is an
error. So, for a given codec and parameters, every mask has exactly one valid byte string.

Varint: unsigned LEB128 (7 bits per byte, low group first, bit 7 = more follows), 1..5 bytes,
minimal (a multi-byte varint does not end in 0x00), value <= 2**32.

Golomb sequence GS: K integers ``x_i >= 0``, each with a parameter ``m_i >= 1``. Let
``q = x // m``, ``r = x % m``; for ``m >= 2`` let ``b = ceil(log2 m)``, ``W = b - 1``,
``u = 2**b - m``; for ``m = 1`` let ``W = 0``, ``u = 1``. Truncated binary remainder:
``v = r`` if ``r < u``, else ``v = (r + u) >> 1`` plus an extra bit ``(r + u) & 1``; the decoder
takes ``r = v`` if ``v < u``, else ``r = 2 v + extra - u``. (For m = 2**b, u = 0: Rice, b bits.)
A GS is three consecutive parts:
  A: the fields ``v_i``, ``W_i`` bits each, for i = 1..K;
  B: the extra bits, one for each i with ``v_i >= u_i``, in order of i;
  U: the quotients in unary, ``q_i`` zero bits then one 1 bit, for i = 1..K.

Gaps: for increasing positions ``p_1 < ... < p_K`` of one symbol, ``g_1 = p_1`` and
``g_i = p_i - p_(i-1) - 1``; the zeros after ``p_K`` are implied by n.

Codecs (k ones among n entries; codecs 1..6 require 0 < k < n, codec 0 requires k in {0, n}):

  id  name            parameter bytes                 bit stream
  0   empty           none (data is exactly b"\x00")  none: all zeros if k == 0, all ones if k == n
  1   bitmap          none                            the n mask bits, ceil(n/8) bytes
  2   golomb          varint m, 1 <= m <= n           GS of the k gaps of the ones, all with m
  3   golomb-compl    varint m, 1 <= m <= n           GS of the n-k gaps of the zeros, all with m
  4   adaptive        bytes s <= 30, j0 < 240, w <= 8 group fields, then GS of the gaps of the ones
  5   adaptive-compl  as 4                            as 4, of the n-k gaps of the zeros
  6   runs            varint R, varint mz, varint mo  GS(R values z_i, mz) then GS(R values o_i, mo)

Adaptive (4, 5): the K gaps form ``G = ceil(K / 2**s)`` groups of ``2**s`` consecutive gaps
(the last may be shorter). The stream holds G fields ``d_g`` of w bits, then the GS, in which every
gap of group g has ``m = M_TABLE[j0 + d_g]`` (which must exist and be <= n); w = 0 means no fields
(every group uses ``M_TABLE[j0]``). ``M_TABLE`` has 240 entries, increasing: 1, 2, ..., 16, then
every ``(8 + f) << e`` (f = 0..7, e >= 1) above 16 and <= 2**32: 18, 20, ..., 30, 32, 36, ..., 60,
64, 72, ..., 2**32.

Runs (6): the mask is zeros, ones, zeros, ..., ones, zeros with R >= 1 runs of ones; run i has
``O_i >= 1`` ones and ``Z_i`` zeros before it (``Z_1 >= 0``, ``Z_i >= 1`` for i > 1); the zeros
after the last run are implied by n. Coded: ``z_1 = Z_1``, ``z_i = Z_i - 1``, ``o_i = O_i - 1``.
Requires ``1 <= R <= min(k, n - k + 1)``, ``1 <= mz, mo <= n``, ``sum(O) == k``,
``sum(Z) + k <= n``.

The encoder is deterministic (same input, same numpy: same bytes); its choice of parameters uses
floating-point estimates, but every size it compares is an exact bit count. The decoder checks every
size it reads against n before allocating (O(n) memory at most) and raises ``MaskCodecError``, with
the reason, for any malformed or inconsistent stream.
"""

from __future__ import annotations

import math
import operator
from typing import Callable

import numpy as np

__all__ = [
    "MaskCodecError",
    "encode_mask",
    "decode_mask",
    "mask_information_bits",
    "CODEC_NAMES",
    "M_TABLE",
]

EMPTY, BITMAP, GOLOMB, GOLOMB_COMPL, ADAPTIVE, ADAPTIVE_COMPL, RUNS = range(7)
CODEC_NAMES = {
    EMPTY: "empty",
    BITMAP: "bitmap",
    GOLOMB: "golomb",
    GOLOMB_COMPL: "golomb-compl",
    ADAPTIVE: "adaptive",
    ADAPTIVE_COMPL: "adaptive-compl",
    RUNS: "runs",
}

_MAX_M = 1 << 32
_MAX_GROUP_LOG = 30
_MAX_FIELD_WIDTH = 8
_GROUP_LOGS = tuple(range(3, 11))  # log2 of the group sizes the adaptive encoder considers

M_TABLE = np.array(
    sorted({*range(1, 17), *((8 + f) << e for e in range(1, 30) for f in range(8))}), dtype=np.int64
)
M_TABLE = M_TABLE[M_TABLE <= _MAX_M]  # 240 entries
_LOG_M_TABLE = np.log(M_TABLE.astype(np.float64))


def _code_params(m: int) -> tuple[int, int, int]:
    """(m, W, u) of a Golomb parameter: W = width of the remainder field v, u = truncation point.

    For m >= 2, W = ceil(log2 m) - 1 and u = 2**ceil(log2 m) - m; for m = 1 there is no remainder
    (W = 0) and u = 1, so that v = r = 0 < u never takes an extra bit: one code path for all m.
    """
    if m == 1:
        return 1, 0, 1
    b = (m - 1).bit_length()
    return m, b - 1, (1 << b) - m


_W_TABLE = np.array([_code_params(int(m))[1] for m in M_TABLE], dtype=np.int64)
_U_TABLE = np.array([_code_params(int(m))[2] for m in M_TABLE], dtype=np.int64)
for _table in (M_TABLE, _LOG_M_TABLE, _W_TABLE, _U_TABLE):
    _table.flags.writeable = False


class MaskCodecError(ValueError):
    """A coded mask is malformed or inconsistent with the given n and k."""


# --------------------------------------------------------------------------------------------
# information limit


def mask_information_bits(n: int, k: int) -> float:
    """log2 C(n, k): bits needed to name one mask of n entries with k ones (0 if k in {0, n})."""
    n, k = operator.index(n), operator.index(k)
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got n={n}, k={k}")
    if k == 0 or k == n:
        return 0.0
    bits = (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)
    return max(bits, 0.0)


# --------------------------------------------------------------------------------------------
# bytes and bits


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if not value:
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)


def _read_varint(data: bytes, pos: int, what: str) -> tuple[int, int]:
    value = 0
    for i in range(5):
        if pos + i >= len(data):
            raise MaskCodecError(f"truncated: {what} varint runs past the end of the data")
        byte = data[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if byte == 0 and i > 0:
                raise MaskCodecError(f"{what} varint is not minimal (ends in a zero byte)")
            if value > _MAX_M:
                raise MaskCodecError(f"{what} = {value} exceeds 2**32")
            return value, pos + i + 1
    raise MaskCodecError(f"{what} varint is longer than 5 bytes")


def _nbytes(bits: int) -> int:
    return (bits + 7) // 8


def _fixed_bits(values: np.ndarray, width: int) -> np.ndarray:
    """values as width-bit fields, MSB first, concatenated: uint8 array of 0/1."""
    if width == 0 or values.size == 0:
        return np.zeros(0, np.uint8)
    shifts = np.arange(width - 1, -1, -1, dtype=np.int64)
    return ((values[:, None] >> shifts) & 1).astype(np.uint8).ravel()


def _read_fixed(bits: np.ndarray, count: int, width: int) -> np.ndarray:
    """count width-bit fields from the start of bits (the caller checked the length)."""
    out = np.zeros(count, np.int64)
    if width == 0 or count == 0:
        return out
    fields = bits[: count * width].reshape(count, width)
    for t in range(width):
        out <<= 1
        out |= fields[:, t]
    return out


def _var_bits(values: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """values as fields of per-value widths (MSB first), concatenated."""
    starts = np.cumsum(widths) - widths
    out = np.zeros(int(widths.sum()), np.uint8)
    for t in range(int(widths.max(initial=0))):
        sel = widths > t
        out[starts[sel] + t] = (values[sel] >> (widths[sel] - 1 - t)) & 1
    return out


def _read_var(bits: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Fields of per-value widths from the start of bits (the caller checked the length)."""
    out = np.zeros(widths.size, np.int64)
    wmax = int(widths.max(initial=0))
    if wmax == 0:
        return out
    starts = np.cumsum(widths) - widths
    padded = np.concatenate((bits[: int(widths.sum())], np.zeros(wmax, np.uint8)))
    for t in range(wmax):
        out = np.where(widths > t, (out << 1) | padded[starts + t], out)
    return out


def _pack(header: bytes, parts: list[np.ndarray]) -> bytes:
    bits = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
    return header + np.packbits(bits).tobytes()


# --------------------------------------------------------------------------------------------
# Golomb sequences; params = (m, W, u), each an int or an int64 array with one entry per value


def _golomb_m0(mean: float) -> int:
    """Gallager/van Voorhis optimal Golomb parameter for geometric values with this mean."""
    if mean <= 0:
        return 1
    theta = mean / (mean + 1.0)
    return max(1, math.ceil(math.log1p(theta) / -math.log(theta)))


def _golomb_bits(values: np.ndarray, params) -> int:
    """Exact length in bits of GS(values) with these parameters."""
    m, width, u = params
    if np.ndim(m) == 0:
        if m == 1:
            return values.size + int(values.sum())
        if u == 0:  # Rice: a shift, and every value has width + 1 remainder bits
            return values.size * (width + 2) + int((values >> (width + 1)).sum())
        q = values // m
        return values.size * (width + 1) + int(q.sum()) + int(np.count_nonzero(values - q * m >= u))
    q = values // m
    total = values.size + int(q.sum())
    return total + int(width.sum()) + int(np.count_nonzero(values - q * m >= u))


def _golomb_write(values: np.ndarray, params) -> list[np.ndarray]:
    m, width, u = params
    q = values // m
    r = values - q * m
    long = r >= u
    v = np.where(long, (r + u) >> 1, r)
    fields = _fixed_bits(v, width) if np.ndim(width) == 0 else _var_bits(v, width)
    extra = (r + u)[long] & 1
    unary = np.zeros(values.size + int(q.sum()), np.uint8)
    unary[np.cumsum(q + 1) - 1] = 1
    return [fields, extra.astype(np.uint8), unary]


def _golomb_read(bits: np.ndarray, pos: int, count: int, params, limit: int, what: str):
    """Decode GS(count) from bits[pos:]; every value must be <= limit. Returns (values, end)."""
    m, width, u = params
    if np.ndim(width) == 0:
        need = count * width
        if pos + need > bits.size:
            raise MaskCodecError(f"truncated: {what} remainder fields run past the end of the data")
        v = _read_fixed(bits[pos:], count, width)
    else:
        need = int(width.sum())
        if pos + need > bits.size:
            raise MaskCodecError(f"truncated: {what} remainder fields run past the end of the data")
        v = _read_var(bits[pos:], width)
    pos += need
    long = v >= u
    n_extra = int(np.count_nonzero(long))
    if pos + n_extra > bits.size:
        raise MaskCodecError(f"truncated: {what} extra remainder bits run past the end of the data")
    u_long = u if np.ndim(u) == 0 else u[long]
    v[long] = 2 * v[long] + bits[pos : pos + n_extra] - u_long
    pos += n_extra
    # Unary quotients: count terminating 1 bits. A valid quotient is at most limit // m, so a
    # valid unary part is at most count + limit bits long; look no further.
    ones = np.flatnonzero(bits[pos : pos + count + limit])
    if ones.size < count:
        raise MaskCodecError(f"{what}: unary part has {ones.size} of {count} terminators "
                             "(truncated, or a value beyond n)")
    ends = ones[:count]
    q = np.diff(ends, prepend=np.int64(-1)) - 1
    if np.any(q > limit // m):
        raise MaskCodecError(f"{what}: a value exceeds {limit} (the stream runs past n)")
    if count:
        pos += int(ends[-1]) + 1
    return q * m + v, pos


# --------------------------------------------------------------------------------------------
# encoder


def _check_mask(mask) -> np.ndarray:
    if not isinstance(mask, np.ndarray):
        raise TypeError(f"mask must be a numpy array, got {type(mask).__name__}")
    if mask.dtype != np.bool_:
        raise TypeError(f"mask must have dtype bool, got {mask.dtype}")
    if mask.ndim != 1:
        raise ValueError(f"mask must be 1-D (flatten it first), got shape {mask.shape}")
    return np.ascontiguousarray(mask)


def _best_golomb(values: np.ndarray, max_m: int) -> tuple[int, int]:
    """(bits, m) for the best scalar parameter among the estimate and its neighbours."""
    m0 = _golomb_m0(float(values.mean()) if values.size else 0.0)
    cands = [m for m in (m0 - 1, m0, m0 + 1) if 1 <= m <= max(max_m, 1)] or [max(max_m, 1)]
    return min((_golomb_bits(values, _code_params(m)), m) for m in cands)


def _adaptive_plan(gaps: np.ndarray, n: int) -> tuple[int, np.ndarray]:
    """Group size and one M_TABLE index per group for the adaptive codecs.

    Each group gets the table entry nearest (in log scale) to the Golomb optimum for its mean gap.
    The group size is the one with the smallest estimated length (estimate: remainder bits of a
    uniform remainder plus sum/m unary bits, plus the group fields); only this plan is then sized
    exactly, which keeps the encoder at a few passes over the gaps.
    """
    j_max = int(np.searchsorted(M_TABLE, max(n, 1), side="right")) - 1
    base = _GROUP_LOGS[0]
    starts = np.arange(0, gaps.size, 1 << base)
    sums = np.add.reduceat(gaps, starts).astype(np.float64)
    counts = np.diff(np.append(starts, gaps.size)).astype(np.float64)
    best = None
    for group_log in _GROUP_LOGS:
        if group_log > base:  # merge pairs of groups
            if sums.size == 1:
                break
            if sums.size % 2:
                sums, counts = np.append(sums, 0.0), np.append(counts, 0.0)
            sums, counts = sums[0::2] + sums[1::2], counts[0::2] + counts[1::2]
        mean = sums / counts
        theta = mean / (mean + 1.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            log_m = np.log(np.where(mean > 0, np.ceil(np.log1p(theta) / -np.log(theta)), 1.0))
        j = np.clip(np.searchsorted(_LOG_M_TABLE, log_m), 1, max(j_max, 1))
        nearer_below = log_m - _LOG_M_TABLE[j - 1] < _LOG_M_TABLE[j] - log_m
        j = np.minimum(np.where(nearer_below, j - 1, j), j_max)
        m, width, u = M_TABLE[j], _W_TABLE[j], _U_TABLE[j]
        estimate = float(
            (counts * (1.0 + width + (m - np.minimum(u, m)) / m) + sums / m).sum()
            + j.size * int(j.max() - j.min()).bit_length()
        )
        if best is None or estimate < best[0]:
            best = (estimate, group_log, j)
    return best[1], best[2]


def _table_params(j_groups: np.ndarray, group_log: int, count: int):
    """Per-value (m, W, u) for groups of 2**group_log values with these table indices."""
    reps = np.full(j_groups.size, 1 << group_log, np.int64)
    reps[-1] = count - ((j_groups.size - 1) << group_log)
    return tuple(np.repeat(table[j_groups], reps) for table in (M_TABLE, _W_TABLE, _U_TABLE))


def _runs_from_gaps(gaps: np.ndarray, compl: bool, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The runs codec's values z (zeros before each run of ones, less 1 after the first) and
    o (run length less 1), from the gaps of the minority symbol in O(len(gaps))."""
    run_start = np.flatnonzero(gaps[1:]) + 1  # a new run of the minority symbol starts here
    run_start = np.concatenate((np.zeros(1, np.int64), run_start))
    run_len = np.diff(run_start, append=np.int64(gaps.size))
    if not compl:  # minority = ones: its runs are the runs of ones
        zeros_before, ones = gaps[run_start], run_len
    else:  # minority = zeros: the runs of ones are the nonzero gaps, plus the ones after the end
        trailing = n - int(gaps.sum()) - gaps.size  # ones after the last zero
        ones = np.append(gaps[run_start], trailing)
        zeros_before = np.concatenate((np.zeros(1, np.int64), run_len))
        keep = ones > 0
        ones, zeros_before = ones[keep], zeros_before[keep]
    z = zeros_before.copy()
    z[1:] -= 1
    return z, ones - 1


def _candidates(mask: np.ndarray, exhaustive: bool = False) -> list[tuple[int, int, Callable]]:
    """(exact size in bytes, codec id, builder of the bytes) per codec worth trying; 0 < k < n.

    Without ``exhaustive`` the runs codec is skipped (or its parameter search cut short) where it
    cannot win; tests set it to build every codec. The builders close over names that are not
    rebound later in this function.
    """
    n = mask.size
    k = int(np.count_nonzero(mask))
    cands = [(1 + _nbytes(n), BITMAP, lambda: bytes([BITMAP]) + np.packbits(mask).tobytes())]

    compl = k > n - k  # code the positions of the minority symbol
    gaps = np.diff(np.flatnonzero(~mask if compl else mask), prepend=np.int64(-1)) - 1

    bits, m = _best_golomb(gaps, n)
    golomb_head = bytes([GOLOMB_COMPL if compl else GOLOMB]) + _varint(m)
    cands.append((len(golomb_head) + _nbytes(bits), golomb_head[0],
                  lambda: _pack(golomb_head, _golomb_write(gaps, _code_params(m)))))

    if gaps.size > (1 << _GROUP_LOGS[0]) or (exhaustive and gaps.size > 1):
        group_log, j = _adaptive_plan(gaps, n)
        j0 = int(j.min())
        width = int(j.max() - j0).bit_length()
        params = _table_params(j, group_log, gaps.size)
        bits = j.size * width + _golomb_bits(gaps, params)
        adaptive_head = bytes([ADAPTIVE_COMPL if compl else ADAPTIVE, group_log, j0, width])
        cands.append((len(adaptive_head) + _nbytes(bits), adaptive_head[0],
                      lambda: _pack(adaptive_head,
                                    [_fixed_bits(j - j0, width)] + _golomb_write(gaps, params))))

    # Runs of ones: each run costs at least 2 bits, so skip them when that alone loses.
    minority_runs = 1 + int(np.count_nonzero(gaps[1:]))
    best = min(c[0] for c in cands)
    if exhaustive or 2 * (minority_runs - 1) < 8 * best:
        z, o = _runs_from_gaps(gaps, compl, n)
        # first size the estimated parameters; search their neighbours only if that comes close
        mz, mo = (min(_golomb_m0(float(v.mean())), n) for v in (z, o))
        bits_z = _golomb_bits(z, _code_params(mz))
        bits_o = _golomb_bits(o, _code_params(mo))
        if exhaustive or _nbytes(bits_z + bits_o) < 1.05 * best:
            bits_z, mz = _best_golomb(z, n)
            bits_o, mo = _best_golomb(o, n)
        runs_head = bytes([RUNS]) + _varint(z.size) + _varint(mz) + _varint(mo)
        cands.append((len(runs_head) + _nbytes(bits_z + bits_o), RUNS,
                      lambda: _pack(runs_head, _golomb_write(z, _code_params(mz))
                                    + _golomb_write(o, _code_params(mo)))))
    return cands


def encode_mask(mask: np.ndarray) -> bytes:
    """Code a 1-D bool mask with the shortest codec of the module docstring (deterministic)."""
    mask = _check_mask(mask)
    k = int(np.count_nonzero(mask))
    if k == 0 or k == mask.size:
        return bytes([EMPTY])
    size, _, build = min(_candidates(mask), key=lambda c: (c[0], c[1]))
    out = build()
    if len(out) != size:  # the size model and the writer disagree: a bug, never a user error
        raise RuntimeError(f"mask codec internal error: predicted {size} bytes, wrote {len(out)}")
    return out


# --------------------------------------------------------------------------------------------
# decoder


def _finish(bits: np.ndarray, pos: int, payload_len: int, codec: str) -> None:
    """The stream must end in the last byte, and the padding bits must be zero."""
    if _nbytes(pos) != payload_len:
        if _nbytes(pos) > payload_len:  # cannot happen for streams checked while reading
            raise MaskCodecError(f"{codec}: truncated stream")
        raise MaskCodecError(
            f"{codec}: {payload_len - _nbytes(pos)} trailing byte(s) after the coded stream"
        )
    if np.any(bits[pos:]):
        raise MaskCodecError(f"{codec}: nonzero padding bits after the coded stream")


def _gaps_to_mask(gaps: np.ndarray, n: int, what: str) -> np.ndarray:
    positions = np.cumsum(gaps + 1) - 1
    if positions.size and positions[-1] >= n:
        raise MaskCodecError(f"{what}: the gap stream runs past n = {n}")
    mask = np.zeros(n, bool)
    mask[positions] = True
    return mask


def decode_mask(data: bytes, n: int, k: int) -> np.ndarray:
    """Decode a stream of ``encode_mask``: 1-D bool array of length n with exactly k ones."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes-like, got {type(data).__name__}")
    data = bytes(data)
    n, k = operator.index(n), operator.index(k)
    if n < 0 or not 0 <= k <= n:
        raise MaskCodecError(f"need 0 <= k <= n, got n={n}, k={k}")
    if not data:
        raise MaskCodecError("empty data: no codec id byte")
    codec = data[0]
    if codec not in CODEC_NAMES:
        raise MaskCodecError(f"unknown codec id {codec}; known: {sorted(CODEC_NAMES)}")
    name = CODEC_NAMES[codec]

    if codec == EMPTY:
        if len(data) != 1:
            raise MaskCodecError(f"empty: {len(data) - 1} trailing byte(s) after the codec id")
        if k not in (0, n):
            raise MaskCodecError(f"empty: codec 0 needs k == 0 or k == n, got n={n}, k={k}")
        return np.full(n, k == n and n > 0, bool)
    if k == 0 or k == n:
        raise MaskCodecError(f"{name}: a mask with k == 0 or k == n must use codec 0 (empty)")

    if codec == BITMAP:
        payload = np.frombuffer(data, np.uint8, offset=1)
        if payload.size != _nbytes(n):
            raise MaskCodecError(
                f"bitmap: expected {_nbytes(n)} bytes for n={n}, got {payload.size}"
            )
        if n % 8 and payload[-1] & ((1 << (8 - n % 8)) - 1):
            raise MaskCodecError("bitmap: nonzero padding bits after the coded stream")
        ones = int(np.bitwise_count(payload).sum())
        if ones != k:
            raise MaskCodecError(f"bitmap: {ones} ones, but k={k}")
        return np.unpackbits(payload, count=n).view(bool)

    pos = 1
    if codec in (GOLOMB, GOLOMB_COMPL):
        m, pos = _read_varint(data, pos, f"{name}: parameter m")
        if not 1 <= m <= n:
            raise MaskCodecError(f"{name}: parameter m={m} outside 1..n={n}")
    elif codec in (ADAPTIVE, ADAPTIVE_COMPL):
        if len(data) < 4:
            raise MaskCodecError(f"truncated: {name} needs 3 parameter bytes")
        group_log, j0, width = data[1], data[2], data[3]
        pos = 4
        if group_log > _MAX_GROUP_LOG:
            raise MaskCodecError(f"{name}: group size 2**{group_log} exceeds 2**{_MAX_GROUP_LOG}")
        if width > _MAX_FIELD_WIDTH:
            raise MaskCodecError(f"{name}: field width {width} exceeds {_MAX_FIELD_WIDTH}")
        if j0 >= M_TABLE.size:
            raise MaskCodecError(f"{name}: table index j0={j0} >= {M_TABLE.size}")
    else:  # RUNS
        runs, pos = _read_varint(data, pos, "runs: count R")
        mz, pos = _read_varint(data, pos, "runs: parameter m_z")
        mo, pos = _read_varint(data, pos, "runs: parameter m_o")
        if not 1 <= runs <= min(k, n - k + 1):
            raise MaskCodecError(f"runs: R={runs} outside 1..min(k, n-k+1) for n={n}, k={k}")
        for label, m in (("m_z", mz), ("m_o", mo)):
            if not 1 <= m <= n:
                raise MaskCodecError(f"runs: parameter {label}={m} outside 1..n={n}")

    # the longest valid stream for these parameters; reject longer data before unpacking it
    if codec == RUNS:
        max_bits = sum(runs * (_code_params(m)[1] + 2) + limit // m
                       for m, limit in ((mz, n - k), (mo, k - 1)))
    else:
        count = n - k if codec in (GOLOMB_COMPL, ADAPTIVE_COMPL) else k
        if codec in (GOLOMB, GOLOMB_COMPL):
            max_bits = count * (_code_params(m)[1] + 2) + (n - count) // m
        else:
            max_width = int(_W_TABLE[min(j0 + (1 << width) - 1, M_TABLE.size - 1)])
            max_bits = -(-count >> group_log) * width + count * (max_width + 2) + n - count
    if len(data) - pos > _nbytes(max_bits):
        raise MaskCodecError(
            f"{name}: {len(data) - pos} stream bytes exceed the {_nbytes(max_bits)} of the longest "
            f"valid stream for n={n}, k={k} (trailing bytes?)"
        )
    payload = np.frombuffer(data, np.uint8, offset=pos)
    bits = np.unpackbits(payload)

    if codec == RUNS:
        z, bpos = _golomb_read(bits, 0, runs, _code_params(mz), n - k, "runs: zero runs")
        o, bpos = _golomb_read(bits, bpos, runs, _code_params(mo), k - 1, "runs: one runs")
        _finish(bits, bpos, payload.size, name)
        lengths = o + 1
        if int(lengths.sum()) != k:
            raise MaskCodecError(f"runs: run lengths sum to {int(lengths.sum())}, but k={k}")
        z[1:] += 1
        if int(z.sum()) + k > n:
            raise MaskCodecError(f"runs: the runs extend past n = {n}")
        starts = np.cumsum(z)
        starts[1:] += np.cumsum(lengths)[:-1]
        delta = np.zeros(n + 1, np.int8)
        delta[starts] = 1
        delta[starts + lengths] = -1
        return np.cumsum(delta[:n], dtype=np.int8).view(bool)

    compl = codec in (GOLOMB_COMPL, ADAPTIVE_COMPL)
    count = n - k if compl else k
    bpos = 0
    if codec in (GOLOMB, GOLOMB_COMPL):
        params = _code_params(m)
    else:
        n_groups = -(-count >> group_log)
        if n_groups * width > bits.size:
            raise MaskCodecError(f"truncated: {name} group fields run past the end of the data")
        j = j0 + _read_fixed(bits, n_groups, width)
        if j.max() >= M_TABLE.size:
            raise MaskCodecError(f"{name}: group table index {int(j.max())} >= {M_TABLE.size}")
        if M_TABLE[j.max()] > n:
            raise MaskCodecError(f"{name}: group parameter m={int(M_TABLE[j.max()])} > n={n}")
        params = _table_params(j, group_log, count)
        bpos = n_groups * width
    gaps, bpos = _golomb_read(bits, bpos, count, params, n - count, name)
    _finish(bits, bpos, payload.size, name)
    mask = _gaps_to_mask(gaps, n, name)
    return ~mask if compl else mask
