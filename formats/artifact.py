"""The packed artifact: trained values, coded masks, dense tensors and the seed; see SPEC.md.

``write_artifact`` turns a trained state dict plus its plan into artifact bytes; ``read_artifact``
parses and validates one (every malformation is a ``FormatError``); ``rebuild_state_dict`` regenerates
the full state dict (frozen entries from the seed, each rebuilt tensor checked against its SHA-256).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from formats.container import FormatError, StoredTensor, decode_container, encode_container, parse_json
from formats.mask_codec import MaskCodecError, decode_mask, encode_mask, mask_information_bits

FORMAT_NAME = "compress-artifact"
FORMAT_VERSION = 2  # 2 adds interspace layers; files without them are still written as version 1
SCHEMA_KEY = "compress"
MODES = ("dense", "prune", "freeze")
VALUE_DTYPES = {"fp16": "F16", "bf16": "BF16", "fp32": "F32"}
TORCH_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
                "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}
KNOWN_GENERATORS = {("philox4x32-10", 1)}
DENSE_INTEGER_DTYPES = {"I64", "I32", "U8", "BOOL"}
MAX_ELEMENTS = 2**31  # largest architecture a loader rebuilds unless told otherwise (8 GiB of float32)
MAX_FILE_BYTES = 2**40


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """Raw little-endian bytes of a tensor in C order."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def tensor_from_bytes(data: bytes, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    torch_dtype = TORCH_DTYPES[dtype]
    if not data:
        return torch.zeros(shape, dtype=torch_dtype)
    return torch.frombuffer(bytearray(data), dtype=torch_dtype).reshape(shape).clone()


@dataclass
class Artifact:
    """A parsed, validated artifact: its schema (dict) and its stored tensors, not yet rebuilt."""

    schema: dict
    tensors: dict[str, StoredTensor]
    header_bytes: int
    file_bytes: int


# --------------------------------------------------------------------------------------------------------------
# Writing


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
) -> bytes:
    """Artifact bytes for a trained ``state_dict`` whose masked entries follow ``masks``.

    ``init_rules`` gives, for every masked tensor in freeze mode, the rule that regenerates it
    (``{"kind": "uniform", "bound": b}``). Deterministic: the same inputs give the same bytes.
    """
    if values not in VALUE_DTYPES:
        raise ValueError(f"unknown values dtype {values!r}; known: {', '.join(VALUE_DTYPES)}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
    value_dtype = VALUE_DTYPES[values]
    stored: dict[str, StoredTensor] = {}
    entries = []
    for name, tensor in state_dict.items():
        tensor = tensor.detach().cpu()
        if name in masks:
            mask = masks[name].detach().cpu().bool().reshape(-1)
            if mask.numel() != tensor.numel():
                raise ValueError(f"mask of {name} has {mask.numel()} entries, the tensor {tensor.numel()}")
            trained = tensor.reshape(-1)[mask].to(TORCH_DTYPES[value_dtype])
            stored[f"v:{name}"] = StoredTensor(value_dtype, (int(mask.sum()),), tensor_bytes(trained))
            code = encode_mask(mask.numpy()) if 0 < int(mask.sum()) < mask.numel() else b""
            stored[f"m:{name}"] = StoredTensor("U8", (len(code),), code)
            entry = {"name": name, "kind": "masked", "n": int(mask.numel()), "k": int(mask.sum())}
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
    schema = {
        "format": FORMAT_NAME,
        "version": 2 if "interspace" in architecture else 1,
        "architecture": architecture,
        "seed": seed,
        "generator": generator,
        "mode": mode,
        "values": value_dtype,
        "tensors": entries,
        "dense_fp32_bytes": dense_fp32_bytes,
        "manifest": manifest,
    }
    text = json.dumps(schema, separators=(",", ":"), sort_keys=True, allow_nan=False)
    return encode_container(stored, {SCHEMA_KEY: text})


def _sha256(tensor: torch.Tensor) -> str:
    from compress.rng import tensor_sha256

    return tensor_sha256(tensor)


def rebuild_masked(entry: dict, mask: torch.Tensor, values: torch.Tensor, mode: str, seed: int, shape) -> torch.Tensor:
    """Full float32 tensor: trained values where the mask is set, zero (prune) or init (freeze) elsewhere."""
    if mode == "freeze":
        from compress.init import InitRule

        rule = entry["init"]
        base = InitRule(rule["kind"], rule["bound"], rule.get("stream")).generate(seed, entry["name"], shape)
        base = base.numpy().reshape(-1)
    else:
        base = np.zeros(math.prod(shape), dtype=np.float32)
    base[mask.numpy()] = values.to(torch.float32).numpy()
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
    _require(schema["dense_fp32_bytes"] >= 1, f"dense_fp32_bytes must be positive, got {schema['dense_fp32_bytes']}")
    _require(schema["mode"] in MODES, f"unknown mode {schema['mode']!r}")
    _require(schema["values"] in VALUE_DTYPES.values(), f"unknown values dtype {schema['values']!r}")
    architecture = schema["architecture"]
    _require(isinstance(architecture.get("model"), str), "architecture has no model name")
    shape = architecture.get("input_shape")
    _require(isinstance(shape, list) and len(shape) == 3 and all(_is_int(s, 1, 2**16) for s in shape),
             f"architecture input_shape {shape!r} is not three positive integers")
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
    expected_keys = set()
    names = set()
    for entry in schema["tensors"]:
        _require(isinstance(entry, dict) and isinstance(entry.get("name"), str), "a tensor entry has no name")
        name = entry["name"]
        _require(name not in names, f"tensor {name!r} is listed twice")
        names.add(name)
        if entry.get("kind") == "dense":
            _require(set(entry) == {"name", "kind"}, f"dense tensor {name!r} has unexpected fields")
            stored = tensors.get(f"d:{name}")
            _require(stored is not None, f"dense tensor {name!r} has no stored data")
            _require(stored.dtype in DENSE_INTEGER_DTYPES or stored.dtype == schema["values"],
                     f"dense tensor {name!r} is stored as {stored.dtype}; floating tensors must use the values dtype "
                     f"{schema['values']}, integer ones one of {sorted(DENSE_INTEGER_DTYPES)}")
            expected_keys.add(f"d:{name}")
        elif entry.get("kind") == "masked":
            _require(schema["mode"] != "dense", f"tensor {name!r} is masked but the mode is dense")
            allowed = {"name", "kind", "n", "k", "sha256"} | ({"init"} if schema["mode"] == "freeze" else set())
            _require(set(entry) == allowed, f"masked tensor {name!r} must have exactly the fields {sorted(allowed)}")
            _require(_is_int(entry["n"], 0, 2**40), f"masked tensor {name!r}: invalid n {entry['n']!r}")
            _require(_is_int(entry["k"], 0, entry["n"]), f"masked tensor {name!r}: k {entry['k']!r} not in [0, n]")
            sha = entry["sha256"]
            _require(isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha),
                     f"masked tensor {name!r}: invalid sha256")
            if schema["mode"] == "freeze":
                rule = entry["init"]
                _require(isinstance(rule, dict) and set(rule) in ({"kind", "bound"}, {"kind", "bound", "stream"})
                         and rule["kind"] == "uniform" and isinstance(rule.get("stream", ""), str)
                         and type(rule["bound"]) is float and math.isfinite(rule["bound"]) and rule["bound"] >= 0,
                         f"masked tensor {name!r}: invalid init rule {rule!r}")
            values = tensors.get(f"v:{name}")
            code = tensors.get(f"m:{name}")
            _require(values is not None and code is not None, f"masked tensor {name!r} lacks its values or mask")
            _require(values.dtype == schema["values"] and values.shape == (entry["k"],),
                     f"masked tensor {name!r}: {values.shape} {values.dtype} values stored, the mask has "
                     f"{entry['k']} set ({schema['values']})")
            _require(code.dtype == "U8" and len(code.shape) == 1, f"masked tensor {name!r}: mask must be 1-D U8")
            expected_keys |= {f"v:{name}", f"m:{name}"}
        else:
            raise FormatError(f"tensor {name!r} has unknown kind {entry.get('kind')!r}")
    extra = sorted(set(tensors) - expected_keys)
    _require(not extra, f"stored tensors not named by the schema: {extra}")


def parse_artifact(data: bytes) -> Artifact:
    """Parse and validate artifact bytes (no weight is rebuilt)."""
    metadata, tensors = decode_container(data)
    _require(set(metadata) == {SCHEMA_KEY, "checksum"}, f"unexpected metadata keys {sorted(metadata)}")
    schema = parse_json(metadata[SCHEMA_KEY], "schema")
    _check_schema(schema, tensors)
    header_bytes = 8 + int.from_bytes(data[:8], "little")
    return Artifact(schema, tensors, header_bytes, len(data))


def read_artifact(path: str | Path) -> Artifact:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"artifact {path} does not exist")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise FormatError(f"{path} is {size} bytes, larger than any artifact this reader accepts")
    return parse_artifact(path.read_bytes())


def build_architecture(architecture: dict, device: str | None = None, factored: bool = False) -> torch.nn.Module:
    """The untrained model an artifact describes; a name this library does not know is a FormatError.

    ``device="meta"`` builds it without storage (shapes only), which is how loaders build it before
    assigning the rebuilt tensors. ``factored`` builds interspace layers as coefficients and bases
    (the stored form); otherwise the plain convolutional model that loaders return.
    """
    from compress.interspace import to_interspace
    from compress.models import build_model

    try:
        model = build_model(architecture["model"], tuple(architecture["input_shape"]), architecture["num_classes"],
                            device=device)
    except (ValueError, TypeError) as error:
        raise FormatError(f"unknown or invalid architecture {architecture['model']!r}: {error}") from None
    if factored and "interspace" in architecture:
        layers = to_interspace(model, "spatial")
        _require(layers == architecture["interspace"]["layers"],
                 f"interspace layers {architecture['interspace']['layers']} do not match the architecture's "
                 f"eligible convolutions {layers}")
    return model


def decode_stored_mask(code: bytes, n: int, k: int, name: str) -> torch.Tensor:
    """A mask with k in {0, n} is implied by (n, k) and stored as zero bytes; others are coded."""
    if k in (0, n):
        _require(len(code) == 0, f"mask of {name!r}: a mask with k = {k} of n = {n} must be stored as 0 bytes")
        return torch.full((n,), k == n, dtype=torch.bool)
    try:
        return torch.from_numpy(decode_mask(code, n, k))
    except MaskCodecError as error:
        raise FormatError(f"mask of {name!r}: {error}") from None


def rebuild_state_dict(
    artifact: Artifact, model: torch.nn.Module | None = None, max_elements: int = MAX_ELEMENTS
) -> dict[str, torch.Tensor]:
    """The full state dict: dense tensors as stored, masked ones rebuilt and hash-checked."""
    schema = artifact.schema
    model = build_architecture(schema["architecture"], device="meta", factored=True) if model is None else model
    reference = model.state_dict()
    elements = sum(t.numel() for t in reference.values())
    _require(elements <= max_elements, f"the architecture has {elements:,} elements, above the loader's limit of "
             f"{max_elements:,}; pass max_elements= to load larger models")
    listed = [entry["name"] for entry in schema["tensors"]]
    _require(sorted(listed) == sorted(reference),
             "the tensors of the artifact do not match the architecture: "
             f"missing {sorted(set(reference) - set(listed))}, unexpected {sorted(set(listed) - set(reference))}")
    state = {}
    for entry in schema["tensors"]:
        name = entry["name"]
        shape = tuple(reference[name].shape)
        if entry["kind"] == "dense":
            stored = artifact.tensors[f"d:{name}"]
            _require(stored.shape == shape, f"dense tensor {name!r} has shape {list(stored.shape)}, the architecture {list(shape)}")
            tensor = tensor_from_bytes(stored.data, stored.dtype, shape)
            state[name] = tensor.to(reference[name].dtype)
            continue
        _require(entry["n"] == math.prod(shape), f"masked tensor {name!r}: n = {entry['n']} but the architecture has {math.prod(shape)} entries")
        mask = decode_stored_mask(artifact.tensors[f"m:{name}"].data, entry["n"], entry["k"], name)
        _require(int(np.count_nonzero(mask.numpy())) == entry["k"], f"mask of {name!r} has {int(mask.sum())} set, the schema says {entry['k']}")
        values_stored = artifact.tensors[f"v:{name}"]
        values = tensor_from_bytes(values_stored.data, values_stored.dtype, values_stored.shape)
        rebuilt = rebuild_masked(entry, mask, values, schema["mode"], schema["seed"], shape)
        _require(_sha256(rebuilt) == entry["sha256"],
                 f"hash mismatch for {name!r}: the rebuilt tensor differs from the packed one (a different "
                 "generator or a corrupted value)")
        state[name] = rebuilt.to(reference[name].dtype)
    return state


def information_report(artifact: Artifact) -> dict:
    """Bytes of values, masks and header per tensor and in total, against the mask information limit."""
    schema = artifact.schema
    bases = {f"{layer}.basis" for layer in schema["architecture"].get("interspace", {}).get("layers", [])}
    rows = []
    for entry in schema["tensors"]:
        name = entry["name"]
        if entry["kind"] == "masked":
            values = len(artifact.tensors[f"v:{name}"].data)
            mask = len(artifact.tensors[f"m:{name}"].data)
            n, k = entry["n"], entry["k"]
            limit = mask_information_bits(n, k) / 8
            rows.append({"name": name, "kind": "masked", "total": n, "trained": k, "density": k / n if n else 1.0,
                         "value_bytes": values, "mask_bytes": mask, "mask_limit_bytes": limit,
                         "bits_per_trained": 8 * (values + mask) / k if k else None})
        else:
            stored = artifact.tensors[f"d:{name}"]
            count = math.prod(stored.shape)
            rows.append({"name": name, "kind": "basis" if name in bases else "dense", "total": count, "trained": count, "density": 1.0,
                         "value_bytes": len(stored.data), "mask_bytes": 0, "mask_limit_bytes": 0.0,
                         "bits_per_trained": 8 * len(stored.data) / count if count else None})
    masked = [r for r in rows if r["kind"] == "masked"]
    totals = {
        "file_bytes": artifact.file_bytes,
        "interspace_layers": len(bases),
        "header_bytes": artifact.header_bytes,
        "value_bytes": sum(r["value_bytes"] for r in rows if r["kind"] == "masked"),
        "dense_bytes": sum(r["value_bytes"] for r in rows if r["kind"] == "dense"),
        "basis_bytes": sum(r["value_bytes"] for r in rows if r["kind"] == "basis"),
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

