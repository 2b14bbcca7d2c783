"""Portable random numbers: Philox4x32-10 keyed by (seed, parameter name), integer-only.

PyTorch and numpy do not promise the same random stream across releases, platforms or devices, so
every weight that may be frozen (and so regenerated from the seed alone) is drawn here instead.
The stream is a pure function of ``(seed, name, element index)``:

* key     = the first 8 bytes of SHA-256(``"compress-philox-v1:<seed>:<name>"``) as two little-endian uint32;
* counter = ``(block & 0xffffffff, block >> 32, 0, 0)`` for block ``i // 4``; element ``i`` takes word ``i % 4``;
* float   = ``(u >> 8) * 2**-23 - 1`` (exact in float32, in [-1, 1)), then ONE float32 multiply by the bound.

Every step is an integer operation or a single correctly rounded IEEE operation, so the result is
bit-identical on every IEEE machine, numpy release and torch release. Known-answer tests pin the
Philox block function (Random123's vectors) and golden hashes pin the whole stream.
"""
from __future__ import annotations

from formats.errors import UserError, UserTypeError
import hashlib
import math

import numpy as np
import torch

GENERATOR_NAME = "philox4x32-10"
GENERATOR_VERSION = 1

_M0 = np.uint64(0xD2511F53)
_M1 = np.uint64(0xCD9E8D57)
_W0 = 0x9E3779B9
_W1 = 0xBB67AE85
_LOW32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)
_ROUNDS = 10
_BLOCKS_PER_CHUNK = 1 << 16


def check_seed(seed: object) -> int:
    """Return ``seed`` if it is an int in [0, 2**32), else raise a precise error."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise UserTypeError(f"seed must be an integer in [0, 2**32), got {type(seed).__name__}")
    if not 0 <= int(seed) < 2**32:
        raise UserError(f"seed must be in [0, 2**32) (a 32-bit unsigned integer), got {seed}")
    return int(seed)


def philox4x32_10(counter: np.ndarray, key: tuple[int, int]) -> np.ndarray:
    """Philox4x32-10 block function on a (4, n) array of uint32 counters; returns (4, n) uint32."""
    c0, c1, c2, c3 = (np.array(w, dtype=np.uint64) for w in counter)
    k0, k1 = int(key[0]) & 0xFFFFFFFF, int(key[1]) & 0xFFFFFFFF
    p0, p1 = np.empty_like(c0), np.empty_like(c0)
    for round_index in range(_ROUNDS):
        if round_index:
            k0 = (k0 + _W0) & 0xFFFFFFFF
            k1 = (k1 + _W1) & 0xFFFFFFFF
        np.multiply(c0, _M0, out=p0)
        np.multiply(c2, _M1, out=p1)
        # (c0, c1, c2, c3) <- (hi(p1) ^ c1 ^ k0, lo(p1), hi(p0) ^ c3 ^ k1, lo(p0)), in place.
        np.right_shift(p1, _SHIFT32, out=c0)
        c0 ^= c1
        c0 ^= np.uint64(k0)
        np.bitwise_and(p1, _LOW32, out=c1)
        np.right_shift(p0, _SHIFT32, out=c2)
        c2 ^= c3
        c2 ^= np.uint64(k1)
        np.bitwise_and(p0, _LOW32, out=c3)
    return np.stack([c0, c1, c2, c3]).astype(np.uint32)


def stream_key(seed: int, name: str) -> tuple[int, int]:
    """The Philox key of one named tensor: two uint32 words from SHA-256 of the seed and the name."""
    digest = hashlib.sha256(f"compress-philox-v1:{check_seed(seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[0:4], "little"), int.from_bytes(digest[4:8], "little")


def random_uint32(seed: int, name: str, count: int) -> np.ndarray:
    """The first ``count`` uint32 words of the stream of ``(seed, name)``."""
    if count < 0:
        raise UserError(f"count must be >= 0, got {count}")
    key = stream_key(seed, name)
    total_blocks = (count + 3) // 4
    words = np.empty((total_blocks, 4), dtype=np.uint32)
    for start in range(0, total_blocks, _BLOCKS_PER_CHUNK):  # chunks that stay in cache
        blocks = np.arange(start, min(total_blocks, start + _BLOCKS_PER_CHUNK), dtype=np.uint64)
        zeros = np.zeros_like(blocks)
        counter = np.stack([blocks & _LOW32, blocks >> _SHIFT32, zeros, zeros])
        words[start : start + len(blocks)] = philox4x32_10(counter, key).T
    return words.reshape(-1)[:count]


_CONVERT_CHUNK = 1 << 16


def uniform_flat(seed: int, name: str, count: int, bound: float) -> np.ndarray:
    """``count`` float32 values from U[-bound, bound): 24 bits ``u`` of each word, ``(u - 2^23) * 2^-23`` (exact),
    times ``float32(bound)``; converted in place, chunk by chunk (4 bytes per value at peak)."""
    words = random_uint32(seed, name, count)
    out = words.view(np.float32)
    bound32 = np.float32(bound)
    for start in range(0, count, _CONVERT_CHUNK):
        top24 = (words[start : start + _CONVERT_CHUNK] >> np.uint32(8)).astype(np.int32)
        out[start : start + _CONVERT_CHUNK] = (top24 - np.int32(1 << 23)).astype(np.float32) * np.float32(2.0**-23) * bound32
    return out


def uniform(seed: int, name: str, shape: tuple[int, ...] | torch.Size, bound: float) -> torch.Tensor:
    """float32 tensor of ``shape`` drawn from U[-bound, bound), bit-identical on every machine."""
    return torch.from_numpy(uniform_flat(seed, name, math.prod(shape), bound).reshape(tuple(shape)))


def tensor_sha256(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's raw little-endian bytes in C order (dtype and shape are not included)."""
    array = tensor.detach().cpu().contiguous().numpy()
    return hashlib.sha256(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()).hexdigest()
