"""A strict, checksummed safetensors container: writing is deterministic, reading trusts nothing.

Layout (the safetensors format, see SPEC.md): 8-byte little-endian header length N, N bytes of UTF-8
JSON header (padded with spaces to a multiple of 8), then the data buffer. The header maps tensor
names to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (relative to the buffer) and holds
``"__metadata__"``: string keys to string values, among them ``"checksum"``: the SHA-256 of the whole
file computed with those 64 hex digits replaced by ``"0" * 64``. Any changed byte is detected.

``read_container`` reads a file once, in order, and checks everything cheap (header length, header,
tensor sizes against the file size) before it reads the data buffer, which it hashes as it streams
in and keeps as the one copy that the tensors view.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os  # noqa: F401  (tests patch formats.container.os to simulate failing writes)
from dataclasses import dataclass
from typing import BinaryIO

from formats.atomic import write_atomic  # noqa: F401  (re-exported: the one atomic writer)
from formats.errors import FormatError

MAX_HEADER_BYTES = 16 * 2**20
MIN_INTEGER, MAX_INTEGER = -(2**63), 2**64 - 1  # the integers a header may hold
_READ_CHUNK = 16 * 2**20  # bytes of the data buffer read (and hashed) at a time
CHECKSUM_KEY = "checksum"
_ZERO_DIGEST = "0" * 64
DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4,
               "F32": 4, "I64": 8, "U64": 8, "F64": 8}


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a container: dtype name, shape and its raw little-endian bytes.

    Read tensors hold a read-only ``memoryview`` into the one buffer of the file's data (no copy).
    """

    dtype: str
    shape: tuple[int, ...]
    data: bytes | memoryview


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


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise FormatError(f"the header holds the number {text[:40]}, which overflows a float")
    return value


def _parse_int(text: str) -> int:
    if len(text) > 21 or not MIN_INTEGER <= int(text) <= MAX_INTEGER:
        raise FormatError(f"the header holds the integer {text[:40]}{'...' if len(text) > 40 else ''}, beyond 64 bits")
    return int(text)


def parse_json(text: str, what: str):
    """Strict JSON: no duplicate keys, no NaN/Infinity, no float that overflows, no integer beyond 64 bits.

    So every number a reader sees is a finite float or a 64-bit integer: formatting or arithmetic on
    it cannot overflow.
    """
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant,
                          parse_float=_parse_float, parse_int=_parse_int)
    except FormatError:
        raise
    except (ValueError, RecursionError) as error:
        raise FormatError(f"{what} is not valid JSON: {error}") from None


def _read_exactly(file: BinaryIO, count: int) -> bytes:
    data = file.read(count)
    if len(data) != count:
        raise FormatError(f"truncated file: it ended after {len(data)} of {count} expected bytes")
    return data


def _check_entry(name: str, entry, buffer_bytes: int) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one tensor entry of the header, every field checked."""
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
    if not 0 <= begin <= end <= buffer_bytes:
        hint = " (a truncated file?)" if 0 <= begin <= end else ""
        raise FormatError(f"tensor {name!r}: data_offsets {offsets} out of range of the {buffer_bytes}-byte buffer{hint}")
    if end - begin != math.prod(shape) * DTYPE_SIZES[dtype]:  # unbounded integers: no overflow
        raise FormatError(f"tensor {name!r}: {end - begin} bytes do not hold shape {shape} of {dtype}")
    return dtype, tuple(shape), begin, end


def read_container(file: BinaryIO, size: int, source: str = "the file",
                   require: str | None = None) -> tuple[dict[str, str], dict[str, StoredTensor], int]:
    """Parse and verify a container from an open binary ``file`` of ``size`` bytes, read once, in order.

    Returns (metadata, tensors, header length). The cheap checks come first: the header length
    against the file size and MAX_HEADER_BYTES, the header, and the tensors' sizes against the rest
    of the file; only then is the data buffer read, into one buffer that the returned tensors view
    (read-only), and hashed as it streams in. ``require`` names a metadata key the file must hold
    (else it is another safetensors file). Every malformation raises FormatError.
    """
    not_ours = f"{source} is not a compress artifact (it does not start with a safetensors header)"
    if size < 8:
        raise FormatError(f"truncated file: {size} bytes, not even the 8-byte header length")
    prefix = _read_exactly(file, 8)
    header_length = int.from_bytes(prefix, "little")
    if header_length > MAX_HEADER_BYTES:  # e.g. the first 8 bytes of an ONNX, ZIP or text file
        raise FormatError(not_ours)
    if header_length > size - 8:
        raise FormatError(f"truncated file: header of {header_length} bytes but only {size - 8} follow")
    raw_header = _read_exactly(file, header_length)
    if not raw_header.startswith(b"{"):
        raise FormatError(not_ours)
    try:
        text = raw_header.decode("utf-8")
    except UnicodeDecodeError as error:
        raise FormatError(f"header is not valid UTF-8 ({error.reason} at byte {error.start})") from None
    header = parse_json(text, "header")  # a JSON object: it starts with "{"
    metadata = header.pop("__metadata__", None)
    if require is not None and not (isinstance(metadata, dict) and require in metadata):
        raise FormatError(f"{source} is a safetensors file but not a compress artifact: no {require} schema "
                          "in __metadata__")
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError("header has no __metadata__ object of strings")
    digest = metadata.get(CHECKSUM_KEY)
    if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise FormatError("header has no valid checksum")
    marker = f'"{CHECKSUM_KEY}":"{digest}"'.encode()
    if raw_header.count(marker) != 1:
        raise FormatError("the checksum field is not written exactly once in canonical form")

    buffer_bytes = size - 8 - header_length
    entries = {name: _check_entry(name, entry, buffer_bytes) for name, entry in header.items()}
    position = 0
    for begin, end, name in sorted((begin, end, name) for name, (_, _, begin, end) in entries.items()):
        if begin != position:
            kind = "overlaps the previous tensor" if begin < position else f"leaves a gap of {begin - position} bytes"
            raise FormatError(f"tensor {name!r}: data_offsets {[begin, end]} {kind}")
        position = end
    if position != buffer_bytes:
        raise FormatError(f"{buffer_bytes - position} trailing bytes after the last tensor")

    hasher = hashlib.sha256(prefix + raw_header.replace(marker, f'"{CHECKSUM_KEY}":"{_ZERO_DIGEST}"'.encode()))
    buffer = memoryview(bytearray(buffer_bytes))
    done = 0
    while done < buffer_bytes:
        got = file.readinto(buffer[done : done + _READ_CHUNK])
        if not got:
            raise FormatError(f"truncated file: it ended after {8 + header_length + done} of {size} bytes")
        hasher.update(buffer[done : done + got])
        done += got
    if hasher.hexdigest() != digest:
        raise FormatError("checksum mismatch: the file is corrupted or was modified")
    buffer = buffer.toreadonly()
    tensors = {name: StoredTensor(dtype, shape, buffer[begin:end]) for name, (dtype, shape, begin, end) in entries.items()}
    return metadata, tensors, header_length


def decode_container(data: bytes) -> tuple[dict[str, str], dict[str, StoredTensor]]:
    """Parse and verify container bytes (see ``read_container``); every malformation raises FormatError."""
    metadata, tensors, _ = read_container(io.BytesIO(data), len(data), "the data")
    return metadata, tensors
