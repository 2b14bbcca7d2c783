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
floating-point estimates, but every size it compares is an exact bit count. The decoder raises
``MaskCodecError``, with the reason, for any malformed or inconsistent stream. Before it allocates
anything it checks the parameters against n and k and the stream's length against the shortest
(every coded value takes at least 1 + W bits) and the longest valid stream for them
(``check_mask_code`` runs these checks alone); it then decodes in chunks, so that decoding costs the
n-byte mask plus a working set of a few MiB, whatever the stream claims.
"""

from __future__ import annotations

import math
import operator
from typing import Callable

import numpy as np

from formats.errors import FormatError, UserError, UserTypeError

__all__ = [
    "MaskCodecError",
    "encode_mask",
    "decode_mask",
    "check_mask_code",
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


class MaskCodecError(FormatError):
    """A coded mask is malformed or inconsistent with the given n and k (a ``FormatError``)."""


# --------------------------------------------------------------------------------------------
# information limit


def mask_information_bits(n: int, k: int) -> float:
    """log2 C(n, k): bits needed to name one mask of n entries with k ones (0 if k in {0, n})."""
    n, k = operator.index(n), operator.index(k)
    if n < 0 or not 0 <= k <= n:
        raise UserError(f"need 0 <= k <= n, got n={n}, k={k}")
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


# --------------------------------------------------------------------------------------------
# encoder


def _check_mask(mask) -> np.ndarray:
    if not isinstance(mask, np.ndarray):
        raise UserTypeError(f"mask must be a numpy array, got {type(mask).__name__}")
    if mask.dtype != np.bool_:
        raise UserTypeError(f"mask must have dtype bool, got {mask.dtype}")
    if mask.ndim != 1:
        raise UserError(f"mask must be 1-D (flatten it first), got shape {mask.shape}")
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
#
# A code's parameters and the size of its stream are checked against n and k before anything is
# allocated: every coded value takes at least one bit, so a stream too short for its count is
# rejected at once. Values are then decoded _CHUNK at a time, reading the stream where they lie
# (fields, extra bits and unary terminators are separate regions): decoding a mask costs the n-byte
# result plus O(_CHUNK) working memory, whatever the stream says.

_CHUNK = 1 << 16  # values decoded at a time
_WINDOW = 1 << 18  # stream bits unpacked at a time while looking for unary terminators


class _Stream:
    """The bit stream of a code (a uint8 array), unpacked only where it is read."""

    def __init__(self, payload: np.ndarray):
        self.payload = payload
        self.size = 8 * payload.size

    def bits(self, start: int, stop: int) -> np.ndarray:
        """Bits start..stop-1 as uint8 0/1 (the caller checked 0 <= start <= stop <= size)."""
        first = start >> 3
        return np.unpackbits(self.payload[first : (stop + 7) >> 3])[start - 8 * first : stop - 8 * first]


class _GolombReader:
    """GS(count) from bit ``start``; ``params(i0, i1)`` gives (m, W, u) of values i0..i1-1.

    Creating it reads part A once, to locate parts B and U and check that they fit in the stream;
    ``chunks()`` then yields the values (each at most ``limit``) in order, ``_CHUNK`` at a time, and
    leaves ``end`` at the bit after the sequence.
    """

    def __init__(self, stream: _Stream, start: int, count: int, params: Callable, limit: int, what: str):
        self.stream, self.start, self.count, self.params, self.limit, self.what = (
            stream, start, count, params, limit, what)
        pos, extras = start, 0
        for i0 in range(0, count, _CHUNK):
            i1 = min(count, i0 + _CHUNK)
            _, width, u = params(i0, i1)
            v, pos = self._fields(pos, i1 - i0, width)
            extras += int(np.count_nonzero(v >= u))
        if pos + extras > stream.size:
            raise MaskCodecError(f"truncated: {what} extra remainder bits run past the end of the data")
        self.extra_start = pos
        self.unary_start = self.end = pos + extras

    def _fields(self, pos: int, count: int, width) -> tuple[np.ndarray, int]:
        """The next ``count`` fields of part A (widths ``width``, one or per value) and the bit after them."""
        need = count * width if np.ndim(width) == 0 else int(width.sum())
        if pos + need > self.stream.size:
            raise MaskCodecError(f"truncated: {self.what} remainder fields run past the end of the data")
        bits = self.stream.bits(pos, pos + need)
        return (_read_fixed(bits, count, width) if np.ndim(width) == 0 else _read_var(bits, width)), pos + need

    def chunks(self):
        field, extra, scan = self.start, self.extra_start, self.unary_start
        # a valid quotient is at most limit // m, so a valid part U is at most count + limit bits
        stop = min(self.stream.size, self.unary_start + self.count + self.limit)
        found = np.zeros(0, np.int64)  # positions of terminators found but not used yet
        last = self.unary_start - 1  # the previous terminator
        self.end = self.unary_start
        for i0 in range(0, self.count, _CHUNK):
            size = min(self.count, i0 + _CHUNK) - i0
            m, width, u = self.params(i0, i0 + size)
            v, field = self._fields(field, size, width)
            long = v >= u
            n_long = int(np.count_nonzero(long))
            v[long] = 2 * v[long] + self.stream.bits(extra, extra + n_long) - (u if np.ndim(u) == 0 else u[long])
            extra += n_long
            parts = [found]
            while sum(p.size for p in parts) < size and scan < stop:
                window = self.stream.bits(scan, min(stop, scan + _WINDOW))
                parts.append(np.flatnonzero(window) + scan)
                scan += window.size
            found = parts[0] if len(parts) == 1 else np.concatenate(parts)
            if found.size < size:
                raise MaskCodecError(f"{self.what}: unary part has {i0 + found.size} of {self.count} terminators "
                                     "(truncated, or a value beyond n)")
            ends, found = found[:size], found[size:]
            q = np.diff(ends, prepend=np.int64(last)) - 1
            if np.any(q > self.limit // m):
                raise MaskCodecError(f"{self.what}: a value exceeds {self.limit} (the stream runs past n)")
            last = int(ends[-1])
            self.end = last + 1
            yield q * m + v


def _finish(stream: _Stream, pos: int, codec: str) -> None:
    """The stream must end in the last byte, and the padding bits must be zero."""
    if _nbytes(pos) != stream.payload.size:
        if _nbytes(pos) > stream.payload.size:  # cannot happen for streams checked while reading
            raise MaskCodecError(f"{codec}: truncated stream")
        raise MaskCodecError(
            f"{codec}: {stream.payload.size - _nbytes(pos)} trailing byte(s) after the coded stream"
        )
    if np.any(stream.bits(pos, stream.size)):
        raise MaskCodecError(f"{codec}: nonzero padding bits after the coded stream")


def _parse(data, n: int, k: int) -> tuple[int, tuple, _Stream]:
    """Codec id, parameters and bit stream of a code, checked against n and k in O(1) memory.

    The stream must be at least as long as the shortest and at most as long as the longest valid
    stream for these parameters: each coded value takes at least 1 + W bits (a field and a unary
    terminator), so the count a stream claims is bounded by its length before anything is allocated.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise UserTypeError(f"data must be bytes-like, got {type(data).__name__}")
    data = memoryview(data).cast("B")
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
        return codec, (), _Stream(np.zeros(0, np.uint8))
    if k == 0 or k == n:
        raise MaskCodecError(f"{name}: a mask with k == 0 or k == n must use codec 0 (empty)")
    if codec == BITMAP:
        if len(data) - 1 != _nbytes(n):
            raise MaskCodecError(f"bitmap: expected {_nbytes(n)} bytes for n={n}, got {len(data) - 1}")
        return codec, (), _Stream(np.frombuffer(data, np.uint8, offset=1))

    pos = 1
    count = n - k if codec in (GOLOMB_COMPL, ADAPTIVE_COMPL) else k
    if codec in (GOLOMB, GOLOMB_COMPL):
        m, pos = _read_varint(data, pos, f"{name}: parameter m")
        if not 1 <= m <= n:
            raise MaskCodecError(f"{name}: parameter m={m} outside 1..n={n}")
        params = (m,)
        width = _code_params(m)[1]
        min_bits = count * (width + 1)
        max_bits = count * (width + 2) + (n - count) // m
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
        params = (group_log, j0, width)
        fields = -(-count >> group_log) * width
        min_bits = fields + count * (int(_W_TABLE[j0]) + 1)  # the table is increasing: j0 has the least W
        max_width = int(_W_TABLE[min(j0 + (1 << width) - 1, M_TABLE.size - 1)])
        max_bits = fields + count * (max_width + 2) + n - count
    else:  # RUNS
        runs, pos = _read_varint(data, pos, "runs: count R")
        mz, pos = _read_varint(data, pos, "runs: parameter m_z")
        mo, pos = _read_varint(data, pos, "runs: parameter m_o")
        if not 1 <= runs <= min(k, n - k + 1):
            raise MaskCodecError(f"runs: R={runs} outside 1..min(k, n-k+1) for n={n}, k={k}")
        for label, m in (("m_z", mz), ("m_o", mo)):
            if not 1 <= m <= n:
                raise MaskCodecError(f"runs: parameter {label}={m} outside 1..n={n}")
        params = (runs, mz, mo)
        count = 2 * runs
        min_bits = runs * (_code_params(mz)[1] + _code_params(mo)[1] + 2)
        max_bits = sum(runs * (_code_params(m)[1] + 2) + limit // m for m, limit in ((mz, n - k), (mo, k - 1)))
    stream = _Stream(np.frombuffer(data, np.uint8, offset=pos))
    if stream.size < min_bits:
        raise MaskCodecError(f"{name}: {stream.payload.size} stream bytes cannot hold {count} coded values "
                             f"(at least {_nbytes(min_bits)} bytes): truncated, or wrong n={n}, k={k}")
    if stream.payload.size > _nbytes(max_bits):
        raise MaskCodecError(
            f"{name}: {stream.payload.size} stream bytes exceed the {_nbytes(max_bits)} of the longest "
            f"valid stream for n={n}, k={k} (trailing bytes?)"
        )
    return codec, params, stream


def check_mask_code(data, n: int, k: int) -> None:
    """Check a code's codec, parameters and stream size against n and k without decoding it.

    O(1) memory and time: a loader runs it on every mask before it allocates any. ``decode_mask``
    may still reject the code (its content is not read here).
    """
    _parse(data, n, k)


def _adaptive_params(stream: _Stream, group_log: int, j0: int, width: int, n: int, name: str) -> Callable:
    """(m, W, u) per value of an adaptive code, from the group fields at the start of its stream."""

    def params(i0: int, i1: int):
        g0, g1 = i0 >> group_log, ((i1 - 1) >> group_log) + 1
        j = j0 + _read_fixed(stream.bits(g0 * width, g1 * width), g1 - g0, width)
        if j.max() >= M_TABLE.size:
            raise MaskCodecError(f"{name}: group table index {int(j.max())} >= {M_TABLE.size}")
        if M_TABLE[j.max()] > n:
            raise MaskCodecError(f"{name}: group parameter m={int(M_TABLE[j.max()])} > n={n}")
        if width == 0:
            return _code_params(int(M_TABLE[j0]))
        j = j[(np.arange(i0, i1) >> group_log) - g0]
        return M_TABLE[j], _W_TABLE[j], _U_TABLE[j]

    return params


def decode_mask(data: bytes, n: int, k: int) -> np.ndarray:
    """Decode a stream of ``encode_mask``: 1-D bool array of length n with exactly k ones.

    Costs the n-byte result plus O(1) in n: see the comment above ``_CHUNK``.
    """
    codec, params, stream = _parse(data, n, k)
    name = CODEC_NAMES[codec]
    if codec == EMPTY:
        return np.full(n, k == n and n > 0, bool)
    if codec == BITMAP:
        payload = stream.payload
        if n % 8 and payload[-1] & ((1 << (8 - n % 8)) - 1):
            raise MaskCodecError("bitmap: nonzero padding bits after the coded stream")
        ones = int(np.bitwise_count(payload).sum())
        if ones != k:
            raise MaskCodecError(f"bitmap: {ones} ones, but k={k}")
        return np.unpackbits(payload, count=n).view(bool)
    if codec == RUNS:
        return _decode_runs(stream, n, k, *params)

    compl = codec in (GOLOMB_COMPL, ADAPTIVE_COMPL)
    count = n - k if compl else k
    if codec in (GOLOMB, GOLOMB_COMPL):
        scalar = _code_params(params[0])
        gaps = _GolombReader(stream, 0, count, lambda i0, i1: scalar, n - count, name)
    else:
        group_log, j0, width = params
        start = -(-count >> group_log) * width  # the group fields come first (_parse checked they fit)
        gaps = _GolombReader(stream, start, count, _adaptive_params(stream, group_log, j0, width, n, name),
                             n - count, name)
    mask = np.zeros(n, bool)
    last = -1
    for chunk in gaps.chunks():
        positions = np.cumsum(chunk + 1) + last
        if positions[-1] >= n:
            raise MaskCodecError(f"{name}: the gap stream runs past n = {n}")
        mask[positions] = True
        last = int(positions[-1])
    _finish(stream, gaps.end, name)
    return np.logical_not(mask, out=mask) if compl else mask


def _decode_runs(stream: _Stream, n: int, k: int, runs: int, mz: int, mo: int) -> np.ndarray:
    """The runs codec: the zero runs' GS, then the one runs' GS, read side by side in chunks."""
    zeros = _GolombReader(stream, 0, runs, lambda i0, i1: _code_params(mz), n - k, "runs: zero runs")
    for _ in zeros.chunks():  # only to find where the one runs begin
        pass
    ones = _GolombReader(stream, zeros.end, runs, lambda i0, i1: _code_params(mo), k - 1, "runs: one runs")
    delta = np.zeros(n + 1, np.int8)  # +1 where a run starts, -1 after it ends; its running sum is the mask
    end, total = 0, 0  # the entry after the previous run; ones so far
    for i, (z, o) in enumerate(zip(zeros.chunks(), ones.chunks())):
        z += 1  # Z_i = z_i + 1, except Z_1 = z_1
        if i == 0:
            z[0] -= 1
        lengths = o + 1
        total += int(lengths.sum())
        starts = end + np.cumsum(z)
        starts[1:] += np.cumsum(lengths)[:-1]
        if int(starts[-1] + lengths[-1]) > n:
            raise MaskCodecError(f"runs: the runs extend past n = {n}")
        delta[starts] = 1
        delta[starts + lengths] = -1
        end = int(starts[-1] + lengths[-1])
    _finish(stream, ones.end, "runs")
    if total != k:
        raise MaskCodecError(f"runs: run lengths sum to {total}, but k={k}")
    return np.cumsum(delta, dtype=np.int8, out=delta)[:n].view(bool)
