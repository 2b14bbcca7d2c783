"""The packed artifact: trained values, coded masks, dense tensors and the seed; see SPEC.md.

``write_artifact`` turns a trained state dict plus its plan into artifact bytes; ``read_artifact``
parses and validates one (every malformation is a ``FormatError``); ``rebuild_state_dict`` regenerates
the full state dict (frozen entries from the seed, each rebuilt tensor checked against its SHA-256).
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from formats import compact as compact_layout
from formats.container import DTYPE_SIZES, StoredTensor, encode_container, parse_json, read_container
from formats.errors import FormatError, UserError
from formats.mask_codec import MaskCodecError, check_mask_code, decode_mask, encode_mask, mask_information_bits

FORMAT_NAME = "compress-artifact"
FORMAT_VERSION = 5  # 2 interspace layers, 3 custom architectures, 4 quantised values, 5 the compact layout
COMPACT_VERSION = 5  # the version of the compact layout (formats/compact.py); the plain layout is written as 1 to 4
COMPACT_HASH_DIGITS = 16  # a compact file keeps the first 64 bits of each rebuilt tensor's SHA-256
CUSTOM = "custom"  # the model name of an architecture outside formats.models: the user's class, rebuilt by the user
MAX_STATE_ENTRIES = 100_000  # most tensors a custom architecture lists
MAX_NDIM = 8
SCHEMA_KEY = "compress"
MODES = ("dense", "prune", "freeze")
VALUE_DTYPES = {"fp16": "F16", "bf16": "BF16", "fp32": "F32", "int8": "F16"}  # int8: quantised trained values, fp16 dense
QUANTIZED = {"int8": "I8"}  # lossy trained values: symmetric, one float32 scale per tensor (SPEC.md)
TORCH_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64, "I8": torch.int8,
                "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}
KNOWN_GENERATORS = {("philox4x32-10", 1)}
# Every torch dtype a safetensors file holds, by its safetensors name, and the order safetensors.torch.save lays
# the tensors out in (by dtype in this order, then by name): safetensors_header follows it.
SAFETENSORS_DTYPE_NAMES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16",
                           torch.uint16: "U16", torch.float16: "F16", torch.bfloat16: "BF16", torch.int32: "I32",
                           torch.uint32: "U32", torch.float32: "F32", torch.int64: "I64", torch.uint64: "U64",
                           torch.float64: "F64"}
_SAFETENSORS_LAYOUT_ORDER = ("U64", "I64", "F64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16", "I8", "U8", "BOOL")
DENSE_INTEGER_DTYPES = {"I64", "I32", "U8", "I8", "BOOL"}
MAX_ELEMENTS = 2**28  # largest architecture a loader rebuilds unless told otherwise (1 GiB of float32)
MAX_FILE_BYTES = 2**40
MAX_INPUT_DIM = 2**16  # largest declared input channels, height or width
MAX_INPUT_ELEMENTS = 2**24  # largest declared C * H * W
MAX_DENSE_FP32_BYTES = 2**50
MAX_CLASS_NAME = 200  # characters of one class name in the manifest


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """Raw little-endian bytes of a tensor in C order."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def tensor_from_bytes(data: bytes | memoryview, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor of ``dtype`` (a safetensors name) and ``shape`` holding one copy of the raw bytes ``data``."""
    torch_dtype = TORCH_DTYPES[dtype]
    if not len(data):
        return torch.zeros(shape, dtype=torch_dtype)
    raw = np.frombuffer(data, np.uint8)
    if dtype == "BOOL":  # any nonzero byte is True, as in safetensors; torch must only see 0 and 1
        return torch.from_numpy(raw != 0).reshape(shape)
    return torch.from_numpy(raw.copy()).view(torch_dtype).reshape(shape)


@dataclass
class Artifact:
    """A parsed, validated artifact: its schema (dict) and its stored tensors, not yet rebuilt."""

    schema: dict
    tensors: dict[str, StoredTensor]  # compact layout: values and dense tensors have data None until decoded
    header_bytes: int
    file_bytes: int
    streams: dict[str, memoryview] | None = None  # compact layout: the coded values, dense and bases sections


# --------------------------------------------------------------------------------------------------------------
# Writing


def safetensors_header(entries: dict[str, tuple[str, list[int], int]], metadata: dict[str, str] | None = None
                       ) -> tuple[bytes, list[str]]:
    """The header of a safetensors file holding tensors given as ``name: (dtype name, shape, data bytes)``: its
    8-byte length, then the JSON padded to 8 bytes; and the order of their data, the one ``safetensors.torch.save``
    lays out (by dtype, widest first, so every offset is aligned; then by name)."""
    ordered = sorted(entries, key=lambda name: (_SAFETENSORS_LAYOUT_ORDER.index(entries[name][0]), name))
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in ordered:
        dtype, shape, size = entries[name]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, ordered


def dense_fp32_bytes(state: dict[str, torch.Tensor]) -> int:
    """The size of the safetensors file of ``state`` with every floating tensor in fp32 (what
    ``safetensors.torch.save`` writes), from names, dtypes and shapes alone: serialising a large model only to
    count its bytes would hold two more copies of it."""
    entries = {}
    for name, tensor in state.items():
        dtype = "F32" if tensor.is_floating_point() else SAFETENSORS_DTYPE_NAMES[tensor.dtype]
        entries[name] = (dtype, list(tensor.shape), tensor.numel() * (4 if dtype == "F32" else tensor.element_size()))
    header, _ = safetensors_header(entries)
    return len(header) + sum(size for _, _, size in entries.values())


def write_artifact(
    state_dict: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor],
    *,
    mode: str,
    seed: int,
    architecture: dict,
    init_rules: dict[str, dict],
    manifest: dict,
    values: str = "fp16",
    dense_fp32_bytes: int,
    generator: dict,
    compact: bool = True,
) -> bytes:
    """Artifact bytes for a trained ``state_dict`` whose masked entries follow ``masks``.

    ``init_rules`` gives, for every masked tensor in freeze mode, the rule that regenerates it
    (``{"kind": "uniform", "bound": b}``). ``compact`` writes the entropy-coded layout of version 5 (the
    default, the smallest); otherwise the plain layout of versions 1 to 4, one safetensors tensor per stored
    tensor. Deterministic: the same inputs give the same bytes.
    """
    if values not in VALUE_DTYPES:
        raise UserError(f"unknown values dtype {values!r}; known: {', '.join(VALUE_DTYPES)}")
    if mode not in MODES:
        raise UserError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
    value_dtype = VALUE_DTYPES[values]
    quantized = QUANTIZED.get(values)
    stored: dict[str, StoredTensor] = {}
    entries = []
    for name, tensor in state_dict.items():
        tensor = tensor.detach().cpu()
        if name in masks:
            mask = masks[name].detach().cpu().bool().reshape(-1)
            if mask.numel() != tensor.numel():
                raise ValueError(f"mask of {name} has {mask.numel()} entries, the tensor {tensor.numel()}")
            count = int(torch.count_nonzero(mask))
            entry = {"name": name, "kind": "masked", "n": int(mask.numel()), "k": count}
            if quantized:
                trained, entry["scale"] = quantize(tensor.reshape(-1)[mask])
            else:
                trained = tensor.reshape(-1)[mask].to(TORCH_DTYPES[value_dtype])
            stored[f"v:{name}"] = StoredTensor(quantized or value_dtype, (count,), tensor_bytes(trained))
            code = encode_mask(mask.numpy()) if 0 < count < mask.numel() else b""
            stored[f"m:{name}"] = StoredTensor("U8", (len(code),), code)
            if mode == "freeze":
                entry["init"] = init_rules[name]
            rebuilt = rebuild_masked(entry, mask, trained, mode, seed, tuple(tensor.shape))
            entry["sha256"] = _sha256(rebuilt)
            entries.append(entry)
        else:
            dtype = value_dtype if tensor.is_floating_point() else DTYPE_NAMES.get(tensor.dtype)
            if dtype is None:
                raise ValueError(f"cannot store {name} of dtype {tensor.dtype}")
            stored[f"d:{name}"] = StoredTensor(dtype, tuple(tensor.shape), tensor_bytes(tensor.to(TORCH_DTYPES[dtype])))
            entries.append({"name": name, "kind": "dense"})
    unknown = sorted(set(masks) - set(state_dict))
    if unknown:
        raise ValueError(f"masks for tensors that are not in the state dict: {unknown}")
    if compact:
        for entry in entries:
            if entry["kind"] == "masked":
                entry["sha256"] = entry["sha256"][:COMPACT_HASH_DIGITS]
    schema = {
        "format": FORMAT_NAME,
        "version": (COMPACT_VERSION if compact else 4 if quantized else 3 if architecture.get("model") == CUSTOM
                    else 2 if "interspace" in architecture else 1),
        "architecture": architecture,
        "seed": seed,
        "generator": generator,
        "mode": mode,
        "values": value_dtype,
        **({"quantized": quantized} if quantized else {}),
        "tensors": entries,
        "dense_fp32_bytes": dense_fp32_bytes,
        "manifest": manifest,
    }
    return encode_artifact(schema, stored, compact)


def _dumps(value) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True, allow_nan=False)


def encode_artifact(schema: dict | str, stored: dict[str, StoredTensor], compact: bool) -> bytes:
    """The file for a schema and its stored tensors (``v:``, ``m:`` and ``d:`` names, raw bytes), in the compact
    layout or the plain one. A schema dict of a compact file gets its layout fields (``code``, ``dtype``,
    ``shape``) from the tensors; a schema given as JSON text is written as it is (for tests and tools that
    rewrite files: it tolerates a malformed schema, so that tests can write the files a reader must reject)."""
    text = schema if isinstance(schema, str) else None
    if not compact:
        return encode_container(stored, {SCHEMA_KEY: text if text is not None else _dumps(schema)})
    if text is not None:
        try:
            schema = json.loads(text)
        except ValueError:
            schema = {}
        schema = schema if isinstance(schema, dict) else {}
    entries = [e for e in schema.get("tensors", []) if isinstance(e, dict)] if isinstance(schema.get("tensors"), list) else []
    bases = _basis_names(schema)
    parts: dict[str, list] = {"values": [], "dense": [], "bases": []}
    codes = []
    for entry in entries:
        name = entry.get("name")
        if entry.get("kind") == "masked" and f"m:{name}" in stored:
            codes.append(bytes(stored[f"m:{name}"].data))
            if f"v:{name}" in stored:
                parts["values"].append(stored[f"v:{name}"])
            if text is None:
                entry["code"] = len(codes[-1])
        elif entry.get("kind") == "dense" and f"d:{name}" in stored:
            tensor = stored[f"d:{name}"]
            parts["bases" if name in bases else "dense"].append(tensor)
            if text is None:
                entry["dtype"], entry["shape"] = tensor.dtype, list(tensor.shape)
    sections = {"schema": compact_layout.encode_schema(text if text is not None else _dumps(schema)),
                "masks": b"".join(codes)}
    for stream, tensors in parts.items():
        sections[stream] = compact_layout.encode_stream([(bytes(t.data), DTYPE_SIZES[t.dtype]) for t in tensors])
    stub, payload = compact_layout.join_sections(sections)
    stub = {"format": FORMAT_NAME, "version": COMPACT_VERSION, **stub}
    return encode_container({compact_layout.PAYLOAD: StoredTensor("U8", (len(payload),), payload)}, {SCHEMA_KEY: _dumps(stub)})


def _basis_names(schema: dict) -> set[str]:
    """The dense tensors that are filter bases: ``<layer>.basis`` of every interspace layer."""
    architecture = schema.get("architecture")
    spec = architecture.get("interspace") if isinstance(architecture, dict) else None
    layers = spec.get("layers") if isinstance(spec, dict) else None
    return {f"{layer}.basis" for layer in layers if isinstance(layer, str)} if isinstance(layers, list) else set()


def _sha256(tensor: torch.Tensor) -> str:
    """SHA-256 of a float32 tensor's little-endian bytes in C order, as ``formats.rng.tensor_sha256``
    computes it, but hashed in place (no copy of the tensor)."""
    return hashlib.sha256(np.ascontiguousarray(tensor.numpy(), dtype="<f4")).hexdigest()


def quantize(values: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Symmetric int8 of ``values``: q = round(v / s) in [-127, 127] with s = max|v| / 127 as a float32 (1 when
    every value is 0); the stored scale is that float32, so dequantising (q x s in float32) is exact."""
    values = values.to(torch.float32)
    peak = float(values.abs().max()) if values.numel() else 0.0
    scale = torch.tensor(peak / 127 if peak > 0 else 1.0, dtype=torch.float32)
    quantised = torch.clamp(torch.round(values / scale), -127, 127).to(torch.int8)
    return quantised, float(scale)


def dequantize(values: torch.Tensor, entry: dict) -> torch.Tensor:
    """Trained values as float32: int8 ones times their tensor's float32 scale, others converted."""
    if values.dtype == torch.int8:
        return values.to(torch.float32) * torch.tensor(entry["scale"], dtype=torch.float32)
    return values.to(torch.float32)


def initial_values(rule: dict, seed: int, name: str, count: int) -> np.ndarray:
    """The ``count`` frozen initial values of a uniform rule, flat float32, as ``formats.rng.uniform`` draws
    them (4 bytes per entry at peak; the SHA-256 of every rebuilt tensor checks the result)."""
    from formats.rng import uniform_flat

    return uniform_flat(seed, rule.get("stream") or name, count, rule["bound"])


def rebuild_masked(entry: dict, mask, values: torch.Tensor, mode: str, seed: int, shape) -> torch.Tensor:
    """Full float32 tensor: trained values where the mask (bool, numpy or torch) is set, zero (prune) or
    init (freeze) elsewhere. Costs the 4-byte-per-entry result, plus the values."""
    count = math.prod(shape)
    base = initial_values(entry["init"], seed, entry["name"], count) if mode == "freeze" else np.zeros(count, np.float32)
    base[np.asarray(mask).reshape(-1)] = dequantize(values, entry).numpy()
    return torch.from_numpy(base.reshape(shape))


# --------------------------------------------------------------------------------------------------------------
# Reading


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise FormatError(message)


def _is_int(value, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high


def _check_schema(schema, tensors: dict[str, StoredTensor]) -> None:
    _require(isinstance(schema, dict), "schema is not a JSON object")
    _require(schema.get("format") == FORMAT_NAME, f"not a {FORMAT_NAME} file (format {schema.get('format')!r})")
    version = schema.get("version")
    _require(type(version) is int, "schema version is missing or not an integer")
    _require(version <= FORMAT_VERSION, f"unknown format version {version}; this reader knows versions up to "
             f"{FORMAT_VERSION} (upgrade compress)")
    _require(version >= 1, f"unknown format version {version}")
    required = {"architecture": dict, "seed": int, "generator": dict, "mode": str, "values": str, "tensors": list,
                "dense_fp32_bytes": int, "manifest": dict}
    for key, kind in required.items():
        _require(type(schema.get(key)) is kind, f"schema field {key!r} is missing or not a {kind.__name__}")
    _require(_is_int(schema["seed"], 0, 2**32 - 1), f"seed {schema['seed']} is outside 32 bits")
    generator = schema["generator"]
    generator_name, generator_version = generator.get("name"), generator.get("version")
    _require(isinstance(generator_name, str) and type(generator_version) is int
             and (generator_name, generator_version) in KNOWN_GENERATORS,
             f"unknown generator {generator!r}; known: {sorted(KNOWN_GENERATORS)}")
    _require(_is_int(schema["dense_fp32_bytes"], 1, MAX_DENSE_FP32_BYTES),
             f"dense_fp32_bytes must be in [1, 2**50], got {schema['dense_fp32_bytes']}")
    _require(schema["mode"] in MODES, f"unknown mode {schema['mode']!r}")
    _require(schema["values"] in VALUE_DTYPES.values(), f"unknown values dtype {schema['values']!r}")
    if "quantized" in schema:
        _require(version >= 4, "quantised values need format version 4")
        _require(schema["quantized"] in QUANTIZED.values(), f"unknown quantised values dtype {schema['quantized']!r}")
    architecture = schema["architecture"]
    _require(isinstance(architecture.get("model"), str), "architecture has no model name")
    if architecture["model"] == CUSTOM:
        _require(version >= 3, "a custom architecture needs format version 3")
        _check_custom_architecture(architecture, schema["tensors"])
        _check_manifest(schema["manifest"], None, None)
        _check_tensor_entries(schema, tensors)
        return
    shape = architecture.get("input_shape")
    _require(isinstance(shape, list) and len(shape) == 3 and all(_is_int(s, 1, MAX_INPUT_DIM) for s in shape),
             f"architecture input_shape {shape!r} is not three integers in [1, {MAX_INPUT_DIM}]")
    _require(math.prod(shape) <= MAX_INPUT_ELEMENTS,
             f"architecture input_shape {shape} has {math.prod(shape):,} elements, above the limit of "
             f"{MAX_INPUT_ELEMENTS:,}")
    _require(_is_int(architecture.get("num_classes"), 2, 2**24), "architecture num_classes is invalid")
    unknown = sorted(set(architecture) - {"model", "input_shape", "num_classes", "interspace"})
    _require(not unknown, f"architecture has unknown fields {unknown}")
    if "interspace" in architecture:
        _require(version >= 2, "interspace layers need format version 2")
        spec = architecture["interspace"]
        _require(isinstance(spec, dict) and set(spec) == {"layers"} and isinstance(spec["layers"], list)
                 and spec["layers"] and all(isinstance(x, str) for x in spec["layers"])
                 and len(set(spec["layers"])) == len(spec["layers"]),
                 "architecture interspace must be {\"layers\": [distinct layer names]}")
    _check_manifest(schema["manifest"], shape[0], architecture["num_classes"])
    _check_tensor_entries(schema, tensors)


def _check_custom_architecture(architecture: dict, entries) -> None:
    """``{"model": "custom", "class": name, "state": [[tensor name, shape, dtype], ...]}``: the user's model,
    described by every tensor of its state dict, in order (SPEC.md)."""
    _require(set(architecture) == {"model", "class", "state"},
             "a custom architecture must have exactly the fields class, model and state")
    _require(isinstance(architecture["class"], str) and 0 < len(architecture["class"]) <= 200,
             "custom architecture class must be a name of 1 to 200 characters")
    state = architecture["state"]
    _require(isinstance(state, list) and 0 < len(state) <= MAX_STATE_ENTRIES,
             f"custom architecture state must list 1 to {MAX_STATE_ENTRIES:,} tensors")
    names = []
    for item in state:
        _require(isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)
                 and isinstance(item[1], list) and len(item[1]) <= MAX_NDIM
                 and all(_is_int(d, 0, 2**40) for d in item[1])
                 and math.prod(max(d, 1) for d in item[1]) <= 2**48  # also bounds the strides of an empty tensor
                 and isinstance(item[2], str) and item[2] in TORCH_DTYPES,
                 f"custom architecture state entry {str(item)[:80]} is not [name, shape (at most {MAX_NDIM} "
                 f"dims, at most 2^48 entries), dtype of {sorted(TORCH_DTYPES)}]")
        names.append(item[0])
    _require(len(set(names)) == len(names), "custom architecture state lists a tensor twice")
    _require(sum(math.prod(item[1]) for item in state) <= MAX_DENSE_FP32_BYTES // 4,
             "custom architecture state declares more elements than any artifact holds")
    listed = [entry.get("name") if isinstance(entry, dict) else None for entry in entries]
    _require(sorted(names) == sorted(str(n) for n in listed),
             "custom architecture state and the schema's tensors name different tensors")


def custom_reference(architecture: dict) -> dict[str, torch.Tensor]:
    """The state dict a custom architecture describes, on the meta device (shapes and dtypes only)."""
    return {name: torch.empty(shape, dtype=TORCH_DTYPES[dtype], device="meta")
            for name, shape, dtype in architecture["state"]}


def custom_architecture(class_name: str, state: dict[str, torch.Tensor]) -> dict:
    """The architecture entry of a model outside ``formats.models``: its class name and every tensor of its state
    dict (name, shape, dtype); the loader is handed a fresh instance (``formats.load(path, model=...)``)."""
    unknown = sorted(name for name, t in state.items() if t.dtype not in DTYPE_NAMES)
    if unknown:
        raise UserError(f"cannot store {', '.join(unknown[:3])}: dtype {state[unknown[0]].dtype} is not one of "
                        f"{', '.join(sorted(str(d).removeprefix('torch.') for d in DTYPE_NAMES))}")
    return {"model": CUSTOM, "class": class_name[:200] or "Module",
            "state": [[name, list(t.shape), DTYPE_NAMES[t.dtype]] for name, t in state.items()]}


def _check_tensor_entries(schema: dict, tensors: dict[str, StoredTensor]) -> None:
    compact = schema["version"] >= COMPACT_VERSION
    expected_keys = set()
    names = set()
    for entry in schema["tensors"]:
        _require(isinstance(entry, dict) and isinstance(entry.get("name"), str), "a tensor entry has no name")
        name = entry["name"]
        _require(name not in names, f"tensor {name!r} is listed twice")
        names.add(name)
        if entry.get("kind") == "dense":
            allowed = {"name", "kind"} | ({"dtype", "shape"} if compact else set())
            _require(set(entry) == allowed, f"dense tensor {name!r} must have exactly the fields {sorted(allowed)}")
            stored = tensors.get(f"d:{name}")
            _require(stored is not None, f"dense tensor {name!r} has no stored data")
            _require(stored.dtype in DENSE_INTEGER_DTYPES or stored.dtype == schema["values"],
                     f"dense tensor {name!r} is stored as {stored.dtype}; floating tensors must use the values dtype "
                     f"{schema['values']}, integer ones one of {sorted(DENSE_INTEGER_DTYPES)}")
            expected_keys.add(f"d:{name}")
        elif entry.get("kind") == "masked":
            _require(schema["mode"] != "dense", f"tensor {name!r} is masked but the mode is dense")
            allowed = ({"name", "kind", "n", "k", "sha256"} | ({"init"} if schema["mode"] == "freeze" else set())
                       | ({"scale"} if "quantized" in schema else set()) | ({"code"} if compact else set()))
            _require(set(entry) == allowed, f"masked tensor {name!r} must have exactly the fields {sorted(allowed)}")
            _require(_is_int(entry["n"], 0, 2**40), f"masked tensor {name!r}: invalid n {entry['n']!r}")
            _require(_is_int(entry["k"], 0, entry["n"]), f"masked tensor {name!r}: k {entry['k']!r} not in [0, n]")
            sha = entry["sha256"]
            _require(isinstance(sha, str) and len(sha) == (COMPACT_HASH_DIGITS if compact else 64)
                     and all(c in "0123456789abcdef" for c in sha),
                     f"masked tensor {name!r}: invalid sha256 (a compact file holds its first {COMPACT_HASH_DIGITS} "
                     "hex digits, others all 64)")
            if schema["mode"] == "freeze":
                rule = entry["init"]
                _require(isinstance(rule, dict) and set(rule) in ({"kind", "bound"}, {"kind", "bound", "stream"})
                         and rule["kind"] == "uniform" and isinstance(rule.get("stream", ""), str)
                         and type(rule["bound"]) is float and math.isfinite(rule["bound"]) and rule["bound"] >= 0,
                         f"masked tensor {name!r}: invalid init rule {rule!r}")
            if "quantized" in schema:
                scale = entry["scale"]
                _require(type(scale) is float and math.isfinite(scale) and scale > 0
                         and float(np.float32(scale)) == scale,
                         f"masked tensor {name!r}: scale {str(scale)[:40]} is not a positive float32")
            values = tensors.get(f"v:{name}")
            code = tensors.get(f"m:{name}")
            _require(values is not None and code is not None, f"masked tensor {name!r} lacks its values or mask")
            value_dtype = schema.get("quantized", schema["values"])
            _require(values.dtype == value_dtype and values.shape == (entry["k"],),
                     f"masked tensor {name!r}: {values.shape} {values.dtype} values stored, the mask has "
                     f"{entry['k']} set ({value_dtype})")
            _require(code.dtype == "U8" and len(code.shape) == 1, f"masked tensor {name!r}: mask must be 1-D U8")
            expected_keys |= {f"v:{name}", f"m:{name}"}
        else:
            raise FormatError(f"tensor {name!r} has unknown kind {entry.get('kind')!r}")
    extra = sorted(set(tensors) - expected_keys)
    _require(not extra, f"stored tensors not named by the schema: {extra}")


def _is_number(value, low: float, high: float) -> bool:
    return type(value) in (int, float) and low <= value <= high  # parse_json keeps floats finite


def _check_manifest(manifest: dict, channels: int | None, classes: int | None) -> None:
    """The manifest is free-form, except the fields that readers use: ``test_acc`` (shown by ``info``),
    ``normalization`` (written into ONNX exports) and ``class_names`` (printed by the examples), checked so that
    no reader meets a bad value."""
    names = manifest.get("class_names", [])
    _require(isinstance(names, list) and all(isinstance(n, str) and len(n) <= MAX_CLASS_NAME for n in names)
             and (len(names) == classes if classes is not None and names else len(names) <= 2**16),
             f"manifest class_names must be a list of one name (at most {MAX_CLASS_NAME} characters) per class"
             + (f" ({classes})" if classes is not None else ""))
    accuracy = manifest.get("test_acc")
    _require(accuracy is None or _is_number(accuracy, 0, 1),
             f"manifest test_acc must be null or a number in [0, 1], got {str(accuracy)[:40]}")
    norm = manifest.get("normalization", {})
    _require(norm == {} or (channels is not None and isinstance(norm, dict) and set(norm) == {"mean", "std"}
                            and all(isinstance(norm[key], list) and len(norm[key]) == channels for key in norm)
                            and all(_is_number(v, -math.inf, math.inf) for v in norm["mean"])
                            and all(_is_number(v, 0, math.inf) and v > 0 for v in norm["std"])),
             f"manifest normalization must be {{}} or {{\"mean\": [numbers], \"std\": [positive numbers]}} "
             f"with one entry per input channel ({channels})")


def _parse(file, size: int, source: str) -> Artifact:
    if size > MAX_FILE_BYTES:
        raise FormatError(f"{source} is {size} bytes, larger than any artifact this reader accepts")
    metadata, tensors, header_length = read_container(file, size, source, require=SCHEMA_KEY)
    _require(set(metadata) == {SCHEMA_KEY, "checksum"}, f"unexpected metadata keys {sorted(metadata)}")
    schema = parse_json(metadata[SCHEMA_KEY], "schema")
    header_bytes, streams = 8 + header_length, None
    if isinstance(schema, dict) and schema.get("version") == COMPACT_VERSION:
        schema, tensors, streams, schema_bytes = _unpack_compact(schema, tensors)
        header_bytes += schema_bytes
    _check_schema(schema, tensors)
    return Artifact(schema, tensors, header_bytes, size, streams)


def _unpack_compact(stub: dict, stored: dict[str, StoredTensor]):
    """(schema, tensors, value streams, schema section bytes) of a compact file, whose metadata holds only the
    ``stub``. The tensors are the plain layout's: mask codes as views, values and dense tensors with data None
    (their dtype and shape from the schema), decoded by ``decoded_tensors`` once the architecture is checked."""
    _require(set(stub) == {"format", "version", "sections"} and stub["format"] == FORMAT_NAME,
             "a compact (version 5) file's metadata must be exactly {format, version, sections}")
    payload = stored.get(compact_layout.PAYLOAD)
    _require(set(stored) == {compact_layout.PAYLOAD} and payload.dtype == "U8" and len(payload.shape) == 1,
             f"a compact (version 5) file holds exactly one 1-D U8 tensor named {compact_layout.PAYLOAD!r}")
    sections = compact_layout.split_sections(stub, payload.data)
    schema = parse_json(compact_layout.decode_schema(sections["schema"]), "schema")
    _require(isinstance(schema, dict), "schema is not a JSON object")
    _require(schema.get("format") == FORMAT_NAME, f"not a {FORMAT_NAME} file (format {str(schema.get('format'))[:40]!r})")
    _require(schema.get("version") == COMPACT_VERSION, f"the schema's version {str(schema.get('version'))[:20]} "
             f"differs from the metadata's {COMPACT_VERSION}")
    entries = schema.get("tensors")
    _require(isinstance(entries, list), "schema field 'tensors' is missing or not a list")
    value_dtype = schema.get("quantized", schema.get("values"))
    tensors, codes = {}, []
    for entry in entries:
        _require(isinstance(entry, dict) and isinstance(entry.get("name"), str), "a tensor entry has no name")
        name = entry["name"]
        if entry.get("kind") == "masked":
            _require(_is_int(entry.get("code"), 0, 2**48) and _is_int(entry.get("k"), 0, 2**40),
                     f"masked tensor {name!r}: code (its mask code's bytes) and k must be non-negative integers")
            if isinstance(value_dtype, str) and value_dtype in DTYPE_SIZES:  # else the schema check names the field
                tensors[f"v:{name}"] = StoredTensor(value_dtype, (entry["k"],), None)
            codes.append((name, entry["code"]))
        elif entry.get("kind") == "dense":
            dtype, shape = entry.get("dtype"), entry.get("shape")
            _require(isinstance(dtype, str) and dtype in DTYPE_SIZES and isinstance(shape, list)
                     and len(shape) <= MAX_NDIM and all(_is_int(d, 0, 2**40) for d in shape)
                     and math.prod(shape) <= 2**48,
                     f"dense tensor {name!r}: dtype and shape must be a known dtype and at most {MAX_NDIM} dimensions")
            tensors[f"d:{name}"] = StoredTensor(dtype, tuple(shape), None)
    lengths = [length for _, length in codes]
    _require(sum(lengths) == len(sections["masks"]),
             f"the masked tensors' codes add up to {sum(lengths):,} bytes, the masks section holds "
             f"{len(sections['masks']):,}")
    for (name, _), code in zip(codes, compact_layout.split_codes(sections["masks"], lengths)):
        tensors[f"m:{name}"] = StoredTensor("U8", (len(code),), code)
    streams = {name: sections[name] for name in compact_layout.STREAMS}
    return schema, tensors, streams, len(sections["schema"])


def decoded_tensors(artifact: Artifact) -> dict[str, StoredTensor]:
    """The stored tensors with their raw bytes: as read (plain layout), or with the value streams decoded (compact
    layout; each decodes to exactly the bytes its tensors declare, so call this after the architecture check)."""
    if artifact.streams is None:
        return artifact.tensors
    tensors = dict(artifact.tensors)
    bases = _basis_names(artifact.schema)
    members: dict[str, list[str]] = {name: [] for name in compact_layout.STREAMS}
    for entry in artifact.schema["tensors"]:
        if entry["kind"] == "masked":
            members["values"].append(f"v:{entry['name']}")
        else:
            members["bases" if entry["name"] in bases else "dense"].append(f"d:{entry['name']}")
    for stream, names in members.items():
        sizes = [(math.prod(tensors[n].shape), DTYPE_SIZES[tensors[n].dtype]) for n in names]
        for name, data in zip(names, compact_layout.decode_stream(artifact.streams[stream], sizes, stream)):
            tensors[name] = StoredTensor(tensors[name].dtype, tensors[name].shape, data)
    return tensors


def split_artifact(data: bytes) -> tuple[dict, dict[str, StoredTensor], bool]:
    """(schema, stored tensors with their raw bytes, whether the layout is compact) of a valid artifact: what a
    tool that rewrites files (``encode_artifact``) needs. Every malformation raises FormatError."""
    artifact = parse_artifact(data)
    tensors = {name: StoredTensor(t.dtype, t.shape, bytes(t.data)) for name, t in decoded_tensors(artifact).items()}
    return json.loads(_dumps(artifact.schema)), tensors, artifact.streams is not None


def stored_bytes(tensor: StoredTensor) -> int:
    """The raw (uncoded) bytes of a stored tensor."""
    return math.prod(tensor.shape) * DTYPE_SIZES[tensor.dtype]


def parse_artifact(data: bytes) -> Artifact:
    """Parse and validate artifact bytes (no weight is rebuilt)."""
    return _parse(io.BytesIO(data), len(data), "the data")


def read_artifact(path: str | Path) -> Artifact:
    """Parse and validate the artifact file ``path`` (no weight is rebuilt), reading it once.

    Any file that is not a valid artifact, a missing one included, raises ``FormatError`` naming it.
    """
    path = Path(path)
    if not path.exists():
        raise FormatError(f"artifact {path} does not exist")
    if not path.is_file():
        raise FormatError(f"{path} is not a file (a directory?); give an artifact file")
    try:
        with open(path, "rb") as file:
            return _parse(file, os.fstat(file.fileno()).st_size, str(path))
    except OSError as error:
        raise FormatError(f"cannot read {path}: {error.strerror or error}") from None


def skeleton_differences(artifact: Artifact, model: torch.nn.Module) -> list[str]:
    """How the state dict of ``model`` (a user-built skeleton) differs from the tensors the artifact describes:
    names missing or unexpected, and shapes or dtypes that differ (empty: it fits)."""
    architecture = artifact.schema["architecture"]
    if "interspace" in architecture:
        raise UserError("an interspace artifact rebuilds its own model: call formats.load(path) without model=")
    expected = (custom_reference(architecture) if architecture["model"] == CUSTOM
                else build_architecture(architecture, device="meta", factored=True).state_dict())
    actual = model.state_dict()
    problems = [f"missing in the model: {name}" for name in expected if name not in actual]
    problems += [f"not in the artifact: {name}" for name in actual if name not in expected]
    for name, target in expected.items():
        if name in actual and (tuple(actual[name].shape) != tuple(target.shape) or actual[name].dtype != target.dtype):
            problems.append(f"{name}: the model has {str(actual[name].dtype).removeprefix('torch.')} "
                            f"{list(actual[name].shape)}, the artifact {str(target.dtype).removeprefix('torch.')} "
                            f"{list(target.shape)}")
    return problems


def build_architecture(architecture: dict, device: str | None = None, factored: bool = False) -> torch.nn.Module:
    """The untrained model an artifact describes; a name this library does not know is a FormatError.

    ``device="meta"`` builds it without storage (shapes only), which is how loaders build it before
    assigning the rebuilt tensors. ``factored`` builds interspace layers as coefficients and bases
    (the stored form); otherwise the plain convolutional model that loaders return.
    """
    from formats.interspace import to_interspace
    from formats.models import build_model

    if architecture["model"] == CUSTOM:
        raise UserError(f"this artifact holds a custom model (class {architecture['class']!r}) that only your code can "
                        f"build: load it in Python with formats.load(path, model={architecture['class']}(...)), a "
                        "fresh instance (compress eval and export build models of formats.models only)")
    try:
        model = build_model(architecture["model"], tuple(architecture["input_shape"]), architecture["num_classes"],
                            device=device)
    except (ValueError, TypeError, RuntimeError) as error:
        raise FormatError(f"unknown or invalid architecture {architecture['model']!r}: {error}") from None
    if factored and "interspace" in architecture:
        layers = to_interspace(model, "spatial")
        _require(layers == architecture["interspace"]["layers"],
                 f"interspace layers {architecture['interspace']['layers']} do not match the architecture's "
                 f"eligible convolutions {layers}")
    return model


def decode_stored_mask(code, n: int, k: int, name: str) -> np.ndarray:
    """A mask with k in {0, n} is implied by (n, k) and stored as zero bytes; others are coded."""
    if k in (0, n):
        _require(len(code) == 0, f"mask of {name!r}: a mask with k = {k} of n = {n} must be stored as 0 bytes")
        return np.full(n, k == n, dtype=bool)
    try:
        return decode_mask(code, n, k)
    except MaskCodecError as error:
        raise FormatError(f"mask of {name!r}: {error}") from None


def _check_max_elements(max_elements) -> None:
    if isinstance(max_elements, bool) or not isinstance(max_elements, numbers.Integral) or max_elements < 1:
        raise UserError(f"max_elements must be a positive integer, got {max_elements!r}")


def _check_against_architecture(schema: dict, tensors: dict[str, StoredTensor], reference: dict) -> None:
    """The cheap checks of every tensor against the architecture, done before any tensor is rebuilt:
    names, shapes, stored dtypes, counts, and each mask code's size against its n and k."""
    listed = [entry["name"] for entry in schema["tensors"]]
    _require(sorted(listed) == sorted(reference),
             "the tensors of the artifact do not match the architecture: "
             f"missing {sorted(set(reference) - set(listed))}, unexpected {sorted(set(listed) - set(reference))}")
    for entry in schema["tensors"]:
        name, target = entry["name"], reference[entry["name"]]
        shape = tuple(target.shape)
        if entry["kind"] == "dense":
            stored = tensors[f"d:{name}"]
            _require(stored.shape == shape, f"dense tensor {name!r} has shape {list(stored.shape)}, the architecture {list(shape)}")
            expected = schema["values"] if target.is_floating_point() else DTYPE_NAMES.get(target.dtype)
            _require(stored.dtype == expected, f"dense tensor {name!r} is stored as {stored.dtype}; the architecture's "
                     f"{str(target.dtype).removeprefix('torch.')} tensor must be stored as {expected}")
            continue
        _require(target.is_floating_point(), f"masked tensor {name!r}: the architecture's tensor is not floating point")
        _require(entry["n"] == math.prod(shape), f"masked tensor {name!r}: n = {entry['n']} but the architecture has {math.prod(shape)} entries")
        if 0 < entry["k"] < entry["n"]:
            try:
                check_mask_code(tensors[f"m:{name}"].data, entry["n"], entry["k"])
            except MaskCodecError as error:
                raise FormatError(f"mask of {name!r}: {error}") from None


def rebuild_state_dict(
    artifact: Artifact, model: torch.nn.Module | None = None, max_elements: int = MAX_ELEMENTS
) -> dict[str, torch.Tensor]:
    """The full state dict: dense tensors as stored, masked ones rebuilt and hash-checked.

    The architecture is built on the meta device (no storage) and everything cheap is checked first:
    its element count against ``max_elements``, then every tensor (``_check_against_architecture``);
    only then is each tensor rebuilt in turn and its hash compared before the next one is built.
    """
    _check_max_elements(max_elements)
    schema = artifact.schema
    if model is not None:
        reference = model.state_dict()
    elif schema["architecture"]["model"] == CUSTOM:
        reference = custom_reference(schema["architecture"])
    else:
        reference = build_architecture(schema["architecture"], device="meta", factored=True).state_dict()
    elements = sum(t.numel() for t in reference.values())
    _require(elements <= max_elements, f"the architecture has {elements:,} elements, above the loader's limit of "
             f"{max_elements:,} ({4 * max_elements / 2**30:.3g} GiB of float32); if you trust this file, pass a "
             "larger max_elements= to formats.load or formats.load_state_dict")
    _check_against_architecture(schema, artifact.tensors, reference)
    tensors = decoded_tensors(artifact)
    state = {}
    for entry in schema["tensors"]:
        name = entry["name"]
        target = reference[name]
        if entry["kind"] == "dense":
            stored = tensors[f"d:{name}"]
            state[name] = tensor_from_bytes(stored.data, stored.dtype, stored.shape).to(target.dtype)
            continue
        mask = decode_stored_mask(tensors[f"m:{name}"].data, entry["n"], entry["k"], name)
        set_count = int(np.count_nonzero(mask))
        _require(set_count == entry["k"], f"mask of {name!r} has {set_count} set, the schema says {entry['k']}")
        values_stored = tensors[f"v:{name}"]
        values = tensor_from_bytes(values_stored.data, values_stored.dtype, values_stored.shape)
        rebuilt = rebuild_masked(entry, mask, values, schema["mode"], schema["seed"], tuple(target.shape))
        del mask, values
        _require(_sha256(rebuilt)[: len(entry["sha256"])] == entry["sha256"],  # 16 digits (compact) or 64
                 f"hash mismatch for {name!r}: the rebuilt tensor differs from the packed one (a different "
                 "generator or a corrupted value)")
        state[name] = rebuilt.to(target.dtype)
    return state


def information_report(artifact: Artifact) -> dict:
    """Bytes of values, masks and header per tensor and in total, against the mask information limit.

    A row's ``value_bytes`` are its raw stored bytes; in a compact file the totals' ``value_bytes``,
    ``dense_bytes`` and ``basis_bytes`` are those of the entropy-coded sections (the raw ones as ``*_raw_bytes``),
    since the streams code their tensors jointly."""
    schema = artifact.schema
    bases = _basis_names(schema)
    rows = []
    for entry in schema["tensors"]:
        name = entry["name"]
        if entry["kind"] == "masked":
            values = stored_bytes(artifact.tensors[f"v:{name}"])
            mask = len(artifact.tensors[f"m:{name}"].data)
            n, k = entry["n"], entry["k"]
            limit = mask_information_bits(n, k) / 8
            rows.append({"name": name, "kind": "masked", "total": n, "trained": k, "density": k / n if n else 1.0,
                         "value_bytes": values, "mask_bytes": mask, "mask_limit_bytes": limit,
                         "bits_per_trained": 8 * (values + mask) / k if k else None})
        else:
            stored = artifact.tensors[f"d:{name}"]
            count, size = math.prod(stored.shape), stored_bytes(stored)
            rows.append({"name": name, "kind": "basis" if name in bases else "dense", "total": count, "trained": count,
                         "density": 1.0, "value_bytes": size, "mask_bytes": 0, "mask_limit_bytes": 0.0,
                         "bits_per_trained": 8 * size / count if count else None})
    masked = [r for r in rows if r["kind"] == "masked"]
    raw = {part: sum(r["value_bytes"] for r in rows if r["kind"] == kind)
           for part, kind in (("value", "masked"), ("dense", "dense"), ("basis", "basis"))}
    streams = artifact.streams
    totals = {
        "file_bytes": artifact.file_bytes,
        "layout": "plain" if streams is None else "compact",
        "interspace_layers": len(bases),
        "header_bytes": artifact.header_bytes,
        **{f"{part}_bytes": raw[part] if streams is None else len(streams[stream])
           for part, stream in (("value", "values"), ("dense", "dense"), ("basis", "bases"))},
        **{f"{part}_raw_bytes": raw[part] for part in raw},
        "mask_bytes": sum(r["mask_bytes"] for r in rows),
        "mask_limit_bytes": sum(r["mask_limit_bytes"] for r in rows),
        "masked_total": sum(r["total"] for r in masked),
        "masked_trained": sum(r["trained"] for r in masked),
        "dense_fp32_bytes": schema["dense_fp32_bytes"],
    }
    totals["density"] = totals["masked_trained"] / totals["masked_total"] if totals["masked_total"] else 1.0
    totals["ratio_to_dense_fp32"] = totals["dense_fp32_bytes"] / totals["file_bytes"]
    stored_values = totals["value_bytes"] + totals["mask_bytes"]
    totals["bits_per_trained"] = 8 * stored_values / totals["masked_trained"] if totals["masked_trained"] else None
    return {"schema": {k: v for k, v in schema.items() if k != "tensors"}, "tensors": rows, "totals": totals}

