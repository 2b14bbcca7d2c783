"""A strict, checksummed safetensors container: writing is deterministic, reading trusts nothing.

Layout (the safetensors format, see SPEC.md): 8-byte little-endian header length N, N bytes of UTF-8
JSON header (padded with spaces to a multiple of 8), then the data buffer. The header maps tensor
names to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (relative to the buffer) and holds
``"__metadata__"``: string keys to string values, among them ``"checksum"``: the SHA-256 of the whole
file computed with those 64 hex digits replaced by ``"0" * 64``. Any changed byte is detected.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from formats.atomic import write_atomic  # noqa: F401  (re-exported: the one atomic writer)
from formats.errors import FormatError

MAX_HEADER_BYTES = 16 * 2**20
CHECKSUM_KEY = "checksum"
_ZERO_DIGEST = "0" * 64
DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4,
               "F32": 4, "I64": 8, "U64": 8, "F64": 8}




@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a container: dtype name, shape and its raw little-endian bytes."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes


def _header_bytes(tensors: dict[str, StoredTensor], metadata: dict[str, str]) -> bytes:
    header: dict = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for name in sorted(tensors):
        tensor = tensors[name]
        header[name] = {"dtype": tensor.dtype, "shape": list(tensor.shape), "data_offsets": [offset, offset + len(tensor.data)]}
        offset += len(tensor.data)
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
    return text + b" " * (-len(text) % 8)


def encode_container(tensors: dict[str, StoredTensor], metadata: dict[str, str]) -> bytes:
    """The container bytes for ``tensors`` and string ``metadata`` (a checksum is added)."""
    for name, tensor in tensors.items():
        if name == "__metadata__" or not name:
            raise ValueError(f"invalid tensor name {name!r}")
        if tensor.dtype not in DTYPE_SIZES:
            raise ValueError(f"unknown dtype {tensor.dtype!r} for {name}")
        expected = math.prod(tensor.shape) * DTYPE_SIZES[tensor.dtype]
        if len(tensor.data) != expected:
            raise ValueError(f"{name}: {len(tensor.data)} bytes for shape {tensor.shape} of {tensor.dtype}")
    if CHECKSUM_KEY in metadata or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("metadata values must be strings and must not contain the checksum key")
    header = _header_bytes(tensors, {**metadata, CHECKSUM_KEY: _ZERO_DIGEST})
    body = b"".join(tensors[name].data for name in sorted(tensors))
    unsigned = len(header).to_bytes(8, "little") + header + body
    digest = hashlib.sha256(unsigned).hexdigest()
    marker = f'"{CHECKSUM_KEY}":"{_ZERO_DIGEST}"'.encode()
    signed_header = header.replace(marker, f'"{CHECKSUM_KEY}":"{digest}"'.encode(), 1)
    return len(header).to_bytes(8, "little") + signed_header + body


def _reject_duplicates(pairs):
    result = {}
    for key, value in pairs:
        if key in result:
            raise FormatError(f"duplicate key {key!r} in the header")
        result[key] = value
    return result


def _reject_constant(name):
    raise FormatError(f"the header holds the non-JSON number {name}")


def parse_json(text: str, what: str):
    """Strict JSON: no duplicate keys, no NaN/Infinity."""
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
    except FormatError:
        raise
    except (ValueError, RecursionError) as error:
        raise FormatError(f"{what} is not valid JSON: {error}") from None


def decode_container(data: bytes) -> tuple[dict[str, str], dict[str, StoredTensor]]:
    """Parse and verify container bytes; every malformation raises FormatError."""
    if len(data) < 8:
        raise FormatError(f"truncated file: {len(data)} bytes, not even the 8-byte header length")
    header_length = int.from_bytes(data[:8], "little")
    if header_length > MAX_HEADER_BYTES:
        raise FormatError(f"header length {header_length} exceeds the limit of {MAX_HEADER_BYTES} bytes")
    if header_length > len(data) - 8:
        raise FormatError(f"truncated file: header of {header_length} bytes but only {len(data) - 8} follow")
    raw_header = data[8 : 8 + header_length]
    try:
        text = raw_header.decode("utf-8")
    except UnicodeDecodeError as error:
        raise FormatError(f"header is not valid UTF-8 ({error.reason} at byte {error.start})") from None
    header = parse_json(text, "header")
    if not isinstance(header, dict):
        raise FormatError("header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError("header has no __metadata__ object of strings")
    digest = metadata.get(CHECKSUM_KEY)
    if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise FormatError("header has no valid checksum")
    marker = f'"{CHECKSUM_KEY}":"{digest}"'.encode()
    if raw_header.count(marker) != 1:
        raise FormatError("the checksum field is not written exactly once in canonical form")
    unsigned = data[:8] + raw_header.replace(marker, f'"{CHECKSUM_KEY}":"{_ZERO_DIGEST}"'.encode()) + data[8 + header_length :]
    if hashlib.sha256(unsigned).hexdigest() != digest:
        raise FormatError("checksum mismatch: the file is corrupted or was modified")
    buffer = memoryview(data)[8 + header_length :]
    spans = []
    tensors = {}
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise FormatError(f"tensor {name!r}: entry must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise FormatError(f"tensor {name!r}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape) or len(shape) > 8:
            raise FormatError(f"tensor {name!r}: shape must be a list of at most 8 non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise FormatError(f"tensor {name!r}: data_offsets must be two integers")
        begin, end = offsets
        if not 0 <= begin <= end <= len(buffer):
            raise FormatError(f"tensor {name!r}: data_offsets {offsets} out of range of the {len(buffer)}-byte buffer")
        if end - begin != math.prod(shape) * DTYPE_SIZES[dtype]:
            raise FormatError(f"tensor {name!r}: {end - begin} bytes do not hold shape {shape} of {dtype}")
        spans.append((begin, end, name))
        tensors[name] = StoredTensor(dtype, tuple(shape), bytes(buffer[begin:end]))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            kind = "overlaps the previous tensor" if begin < position else f"leaves a gap of {begin - position} bytes"
            raise FormatError(f"tensor {name!r}: data_offsets {[begin, end]} {kind}")
        position = end
    if position != len(buffer):
        raise FormatError(f"{len(buffer) - position} trailing bytes after the last tensor")
    return metadata, tensors
