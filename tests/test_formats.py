"""The artifact format reads untrusted files: every malformation is a FormatError with a precise message.

Most cases re-sign the changed file (``resign``/``resign_schema`` in conftest.py recompute the
checksum as formats/container.py does) so that the checks behind the checksum are reached.
"""
import collections
import hashlib
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

import formats
from compress.init import init_rules
from formats.models import build_model
from formats.rng import GENERATOR_NAME, GENERATOR_VERSION
from formats.artifact import encode_artifact, parse_artifact, rebuild_state_dict, split_artifact, write_artifact
from formats.container import MAX_HEADER_BYTES, FormatError, StoredTensor, decode_container, encode_container

GENERATOR = {"name": GENERATOR_NAME, "version": GENERATOR_VERSION}
TINY_ARCH = {"model": "lenet300", "input_shape": [1, 1, 1], "num_classes": 2}  # 30,902 parameters


def make_tiny(mode: str = "freeze", values: str = "fp16", seed: int = 5, density: float = 0.05,
              densities: dict | None = None, state_out: dict | None = None, compact: bool = True) -> bytes:
    """A small valid artifact of a real architecture (LeNet-300-100 on 1x1x1 inputs, 2 classes).

    ``densities`` overrides the density per masked tensor (0.0: nothing trained, 1.0: all trained);
    ``state_out`` receives the state dict that was packed.
    """
    import compress

    model = compress.initialise(build_model(TINY_ARCH["model"], tuple(TINY_ARCH["input_shape"]), 2), seed)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(1)
    masks = {}
    for name in ("fc1.weight", "fc2.weight", "fc3.weight"):
        mask = torch.rand(state[name].shape, generator=generator) < (densities or {}).get(name, density)
        masks[name] = mask
        trained = torch.randn(state[name].shape, generator=generator) * 0.1
        base = state[name] if mode == "freeze" else torch.zeros_like(state[name])
        state[name] = torch.where(mask, trained, base)
    rules = {name: {"kind": rule.kind, "bound": rule.bound} for name, rule in init_rules(model).items()}
    if state_out is not None:
        state_out.update(state)
    return write_artifact(state, masks, mode=mode, seed=seed, architecture=dict(TINY_ARCH), init_rules=rules,
                          manifest={"method": "test"}, values=values, dense_fp32_bytes=123_456, generator=GENERATOR,
                          compact=compact)


@pytest.fixture(scope="module", params=["plain", "compact"])
def tiny(request):
    """Bytes of tiny artifacts by mode, built once per layout: every test that takes it runs on both."""
    return {mode: make_tiny(mode, compact=request.param == "compact") for mode in ("freeze", "prune")}


@pytest.fixture(scope="module")
def tiny_plain():
    """Tiny artifacts in the plain layout (versions 1 to 4), for checks of its own tensors and version numbers
    (tests/test_compact.py has the compact layout's)."""
    return {mode: make_tiny(mode, compact=False) for mode in ("freeze", "prune")}


def load_bytes(data: bytes) -> dict:
    """Parse, validate and rebuild artifact bytes (what formats.load_state_dict does with a file)."""
    return rebuild_state_dict(parse_artifact(data))


def expect_error(data: bytes, fragment: str) -> FormatError:
    with pytest.raises(FormatError) as caught:
        load_bytes(data)
    assert fragment in str(caught.value), str(caught.value)
    return caught.value


def recontainer(data: bytes, change) -> bytes:
    """Decode, let ``change(schema, tensors)`` edit the schema dict / StoredTensor dict, re-encode (signed)."""
    schema, tensors, compact = split_artifact(data)
    change(schema, tensors)
    return encode_artifact(schema, tensors, compact)


def first_masked(schema) -> dict:
    return next(e for e in schema["tensors"] if e["kind"] == "masked")


def test_tiny_artifacts_are_valid_and_rebuild_their_state_dict(tiny):
    for mode, data in tiny.items():
        state = load_bytes(data)
        assert set(state) == {f"fc{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias")}, mode


# ---------------------------------------------------------------------------------------------------------------
# Container


@pytest.fixture(scope="module")
def small_container():
    """A two-tensor container: a = F32 [2] (bytes 0..8), b = U8 [4] (bytes 8..12)."""
    tensors = {"a": StoredTensor("F32", (2,), bytes(range(8))), "b": StoredTensor("U8", (4,), b"\x01\x02\x03\x04")}
    return encode_container(tensors, {"note": "hi"})


def expect_container_error(data: bytes, fragment: str) -> None:
    with pytest.raises(FormatError) as caught:
        decode_container(data)
    assert fragment in str(caught.value), str(caught.value)


def raw_file(header_text: bytes, body: bytes = b"") -> bytes:
    return len(header_text).to_bytes(8, "little") + header_text + body


def test_valid_container_round_trips(small_container):
    metadata, tensors = decode_container(small_container)
    assert metadata["note"] == "hi" and len(metadata["checksum"]) == 64
    assert tensors["a"] == StoredTensor("F32", (2,), bytes(range(8)))
    assert tensors["b"].data == b"\x01\x02\x03\x04"


@pytest.mark.parametrize("data", [b"", b"\x00" * 7])
def test_file_shorter_than_the_length_field_is_truncated(data):
    expect_container_error(data, "truncated file")


def test_header_longer_than_the_file_is_truncated(small_container):
    expect_container_error(small_container[:20], "truncated file: header of")
    length = int.from_bytes(small_container[:8], "little")
    expect_container_error((length + 100).to_bytes(8, "little") + small_container[8:], "truncated file")


def test_data_cut_short_is_detected(small_container, resign):
    # the tensors' sizes are checked against the file size before the data is read (or hashed)
    expect_container_error(small_container[:-1], "out of range of the 11-byte buffer")
    expect_container_error(resign(small_container, mutate_body=lambda body: body[:-1]), "out of range")
    expect_container_error(small_container + b"\0", "1 trailing bytes after the last tensor")


def test_header_length_over_the_cap_is_rejected_before_reading():
    expect_container_error((MAX_HEADER_BYTES + 1).to_bytes(8, "little") + b"{}", "is not a compress artifact")
    expect_container_error(b"\xff" * 8, "the data is not a compress artifact (it does not start with a safetensors header)")


def test_non_utf8_header():
    expect_container_error(raw_file(b'{"\xff":1}   '), "not valid UTF-8")


def test_non_json_header():
    expect_container_error(raw_file(b"{not json}  "), "header is not valid JSON")


@pytest.mark.parametrize("text", [b"[]      ", b"1       ", b'"x"     ', b"null    ", b" {}     "])
def test_header_that_is_not_an_object(text):
    expect_container_error(raw_file(text), "not a compress artifact (it does not start with a safetensors header)")


def test_duplicate_keys_are_rejected(small_container, resign):
    def duplicate_tensor(header):
        text = json.dumps(header, separators=(",", ":"))
        entry = json.dumps(header["a"], separators=(",", ":"))
        return text[:-1] + f',"a":{entry}' + "}"

    expect_container_error(resign(small_container, duplicate_tensor), "duplicate key 'a'")

    def duplicate_metadata(header):
        text = json.dumps(header, separators=(",", ":"))
        return text.replace('"note":"hi"', '"note":"hi","note":"ho"')

    expect_container_error(resign(small_container, duplicate_metadata), "duplicate key 'note'")


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_non_json_numbers_are_rejected(small_container, resign, constant):
    def with_constant(header):
        return json.dumps(header, separators=(",", ":"))[:-1] + f',"x":{constant}' + "}"

    expect_container_error(resign(small_container, with_constant), "non-JSON number")


def test_missing_or_invalid_metadata(small_container, resign):
    expect_container_error(resign(small_container, lambda h: h.pop("__metadata__") and None), "no __metadata__")
    expect_container_error(resign(small_container, lambda h: h.__setitem__("__metadata__", [])), "no __metadata__")
    expect_container_error(resign(small_container, lambda h: h["__metadata__"].__setitem__("n", 1)), "no __metadata__")


def test_missing_or_invalid_checksum(small_container, resign):
    expect_container_error(resign(small_container, lambda h: h["__metadata__"].pop("checksum") and None),
                           "no valid checksum")
    for bad in ["A" * 64, "0" * 63, "g" * 64, ""]:
        def set_checksum(header, bad=bad):
            header["__metadata__"]["checksum"] = bad
        expect_container_error(resign(small_container, set_checksum), "no valid checksum")


def test_checksum_not_in_canonical_form(small_container, resign):
    def spaced(header):
        return json.dumps(header, separators=(",", ":")).replace('"checksum":"', '"checksum": "')

    expect_container_error(resign(small_container, spaced), "not written exactly once")


def test_checksum_mismatch(small_container):
    data = bytearray(small_container)
    data[-1] ^= 1
    expect_container_error(bytes(data), "checksum mismatch")
    length = int.from_bytes(small_container[:8], "little")
    text = small_container[8 : 8 + length]
    digit = text.index(b'"checksum":"') + len(b'"checksum":"')
    data = bytearray(small_container)
    data[8 + digit] = ord("0") if data[8 + digit] != ord("0") else ord("1")
    expect_container_error(bytes(data), "checksum mismatch")


@pytest.mark.parametrize("dtype", ["F8", "f32", "", "FLOAT"])
def test_unknown_dtype(small_container, resign, dtype):
    expect_container_error(resign(small_container, lambda h: h["b"].__setitem__("dtype", dtype)), "unknown dtype")


@pytest.mark.parametrize("dtype", [["U8"], {"U8": 1}])
def test_unhashable_dtype_is_a_format_error(small_container, resign, dtype):
    expect_container_error(resign(small_container, lambda h: h["b"].__setitem__("dtype", dtype)), "unknown dtype")


@pytest.mark.parametrize("shape", [[-4], [4.0], "4", [True, 4], [1] * 9, None, [[4]]])
def test_bad_shape(small_container, resign, shape):
    expect_container_error(resign(small_container, lambda h: h["b"].__setitem__("shape", shape)), "shape must be")


@pytest.mark.parametrize("entry", [{"dtype": "U8", "shape": [4]}, "x", [],
                                   {"dtype": "U8", "shape": [4], "data_offsets": [8, 12], "extra": 1}])
def test_bad_tensor_entry(small_container, resign, entry):
    expect_container_error(resign(small_container, lambda h: h.__setitem__("b", entry)), "entry must have exactly")


@pytest.mark.parametrize("offsets", [[8], [8, 12, 12], "8,12", [8.0, 12], [8, None], [True, 12]])
def test_data_offsets_not_two_integers(small_container, resign, offsets):
    expect_container_error(resign(small_container, lambda h: h["b"].__setitem__("data_offsets", offsets)),
                           "data_offsets must be two integers")


@pytest.mark.parametrize("offsets", [[9, 13], [-1, 3], [12, 8], [8, 2**64 - 1]])
def test_data_offsets_out_of_range(small_container, resign, offsets):
    expect_container_error(resign(small_container, lambda h: h["b"].__setitem__("data_offsets", offsets)),
                           "out of range")


@pytest.mark.parametrize("value", [2**64, -(2**63) - 1, 10**400])
def test_integers_beyond_64_bits_are_rejected(small_container, resign, value):
    expect_container_error(resign(small_container, lambda h: h["b"].__setitem__("data_offsets", [8, value])),
                           "beyond 64 bits")


def test_data_offsets_overlapping(small_container, resign):
    expect_container_error(resign(small_container, lambda h: h["b"].__setitem__("data_offsets", [4, 8])), "overlaps")


def test_data_offsets_leaving_a_gap(small_container, resign):
    data = resign(small_container, lambda h: h["b"].__setitem__("data_offsets", [12, 16]),
                  mutate_body=lambda body: body + b"\0" * 4)
    expect_container_error(data, "leaves a gap of 4 bytes")


def test_buffer_start_not_covered(small_container, resign):
    def shift(header):
        header["a"]["data_offsets"] = [4, 12]
        header["b"]["data_offsets"] = [12, 16]

    expect_container_error(resign(small_container, shift, mutate_body=lambda body: body + b"\0" * 4), "leaves a gap")


def test_trailing_bytes_after_the_last_tensor(small_container, resign):
    expect_container_error(resign(small_container, mutate_body=lambda body: body + b"\0" * 3), "3 trailing bytes")
    # a tensor dropped from the header leaves its bytes uncovered
    expect_container_error(resign(small_container, lambda h: h.pop("b") and None), "4 trailing bytes")


def test_offsets_not_matching_shape_times_dtype_size(small_container, resign):
    expect_container_error(resign(small_container, lambda h: h["b"].__setitem__("shape", [5])), "do not hold shape")
    expect_container_error(resign(small_container, lambda h: h["a"].__setitem__("dtype", "F16")), "do not hold shape")
    huge = [2**62] * 8  # unbounded integers: no overflow into a small size
    expect_container_error(resign(small_container, lambda h: h["b"].__setitem__("shape", huge)), "do not hold shape")


def test_encode_container_refuses_invalid_input():
    with pytest.raises(ValueError, match="unknown dtype"):
        encode_container({"a": StoredTensor("F8", (1,), b"\0")}, {})
    with pytest.raises(ValueError, match="bytes for shape"):
        encode_container({"a": StoredTensor("F32", (2,), b"\0" * 4)}, {})
    with pytest.raises(ValueError, match="invalid tensor name"):
        encode_container({"__metadata__": StoredTensor("U8", (1,), b"\0")}, {})
    with pytest.raises(ValueError, match="checksum"):
        encode_container({}, {"checksum": "x"})


# ---------------------------------------------------------------------------------------------------------------
# Schema


def test_metadata_must_hold_exactly_schema_and_checksum(tiny, resign):
    expect_error(resign(tiny["prune"], lambda h: h["__metadata__"].__setitem__("extra", "1")),
                 "unexpected metadata keys")
    expect_error(resign(tiny["prune"], lambda h: h["__metadata__"].pop("compress") and None),
                 "the data is a safetensors file but not a compress artifact: no compress schema in __metadata__")
    expect_error(resign(tiny["prune"], lambda h: h.pop("__metadata__") and None),
                 "a safetensors file but not a compress artifact")


def test_schema_that_is_not_json_or_not_an_object(tiny, resign):
    expect_error(resign(tiny["prune"], lambda h: h["__metadata__"].__setitem__("compress", "{oops")),
                 "schema is not valid JSON")
    expect_error(resign(tiny["prune"], lambda h: h["__metadata__"].__setitem__("compress", "[1, 2]")),
                 "schema is not a JSON object")
    nan = json.dumps({"format": "compress-artifact", "x": float("nan")})
    expect_error(resign(tiny["prune"], lambda h: h["__metadata__"].__setitem__("compress", nan)), "non-JSON number")


@pytest.mark.parametrize("name", ["safetensors", "", None, 1])
def test_not_the_format_name(tiny, resign_schema, name):
    expect_error(resign_schema(tiny["prune"], lambda s: s.__setitem__("format", name)), "not a compress-artifact file")


@pytest.mark.parametrize("version, fragment", [(99, "unknown format version 99"), (6, "unknown format version 6"),
                                               (0, "unknown format version 0"), (-1, "unknown format version -1"),
                                               ("1", "version is missing"), (1.0, "version is missing"),
                                               (None, "version is missing")])
def test_unknown_version(tiny_plain, resign_schema, version, fragment):
    error = expect_error(resign_schema(tiny_plain["prune"], lambda s: s.__setitem__("version", version)), fragment)
    if version in (3, 99):
        assert "upgrade compress" in str(error)


@pytest.mark.parametrize("field", ["architecture", "seed", "generator", "mode", "values", "tensors",
                                   "dense_fp32_bytes", "manifest"])
def test_missing_or_mistyped_schema_field(tiny, resign_schema, field):
    expect_error(resign_schema(tiny["prune"], lambda s: s.pop(field) and None), f"schema field {field!r}")
    wrong = {} if field == "tensors" else []
    expect_error(resign_schema(tiny["prune"], lambda s: s.__setitem__(field, wrong)), f"schema field {field!r}")


@pytest.mark.parametrize("seed, fragment", [(2**32, "outside 32 bits"), (-1, "outside 32 bits"),
                                            (2**64, "beyond 64 bits")])
def test_seed_outside_32_bits(tiny, resign_schema, seed, fragment):
    expect_error(resign_schema(tiny["freeze"], lambda s: s.__setitem__("seed", seed)), fragment)


@pytest.mark.parametrize("seed", [True, 1.0, "1"])
def test_seed_not_an_integer(tiny, resign_schema, seed):
    expect_error(resign_schema(tiny["freeze"], lambda s: s.__setitem__("seed", seed)), "schema field 'seed'")


@pytest.mark.parametrize("generator", [{"name": "mt19937", "version": 1}, {"name": GENERATOR_NAME, "version": 2},
                                       {"name": GENERATOR_NAME}, {}])
def test_unknown_generator(tiny, resign_schema, generator):
    expect_error(resign_schema(tiny["freeze"], lambda s: s.__setitem__("generator", generator)), "unknown generator")


@pytest.mark.parametrize("generator", [{"name": [GENERATOR_NAME], "version": 1}, {"name": GENERATOR_NAME, "version": {}}])
def test_unhashable_generator_fields_are_a_format_error(tiny, resign_schema, generator):
    expect_error(resign_schema(tiny["freeze"], lambda s: s.__setitem__("generator", generator)), "unknown generator")


@pytest.mark.parametrize("mode", ["zero", "Freeze", ""])
def test_unknown_mode(tiny, resign_schema, mode):
    expect_error(resign_schema(tiny["prune"], lambda s: s.__setitem__("mode", mode)), "unknown mode")


def test_mode_and_masked_fields_must_agree(tiny, resign_schema):
    # a prune artifact relabelled freeze lacks the init rules; a freeze one relabelled prune has extra ones
    expect_error(resign_schema(tiny["prune"], lambda s: s.__setitem__("mode", "freeze")), "must have exactly the fields")
    expect_error(resign_schema(tiny["freeze"], lambda s: s.__setitem__("mode", "prune")), "must have exactly the fields")


def test_dense_mode_with_masked_tensors_is_rejected(tiny, resign_schema):
    expect_error(resign_schema(tiny["prune"], lambda s: s.__setitem__("mode", "dense")), "dense")


@pytest.mark.parametrize("values", ["F64", "fp16", "I64", ""])
def test_unknown_values_dtype(tiny, resign_schema, values):
    expect_error(resign_schema(tiny["prune"], lambda s: s.__setitem__("values", values)), "unknown values dtype")


def test_values_dtype_differs_from_the_stored_values(tiny_plain, resign_schema):
    expect_error(resign_schema(tiny_plain["prune"], lambda s: s.__setitem__("values", "F32")), "values stored")


def test_unknown_architecture_model_name(tiny, resign_schema):
    expect_error(resign_schema(tiny["prune"], lambda s: s["architecture"].__setitem__("model", "nope")),
                 "unknown or invalid architecture 'nope'")
    expect_error(resign_schema(tiny["prune"], lambda s: s["architecture"].__setitem__("model", "tv:nope")),
                 "unknown or invalid architecture 'tv:nope'")
    expect_error(resign_schema(tiny["prune"], lambda s: s["architecture"].__setitem__("model", 5)),
                 "architecture has no model name")


@pytest.mark.parametrize("change, fragment", [
    (lambda a: a.__setitem__("input_shape", [1, 1]), "input_shape"),
    (lambda a: a.__setitem__("input_shape", [1, 0, 1]), "input_shape"),
    (lambda a: a.__setitem__("input_shape", [1, 1, 2**16 + 1]), "input_shape"),
    (lambda a: a.__setitem__("input_shape", "1x1x1"), "input_shape"),
    (lambda a: a.__setitem__("num_classes", 1), "num_classes"),
    (lambda a: a.__setitem__("num_classes", 2**24 + 1), "num_classes"),
    (lambda a: a.pop("num_classes") and None, "num_classes"),
    (lambda a: a.__setitem__("input_shape", [1, 2, 2]), "but the architecture has"),  # fc1 300x4, not 300x1
    (lambda a: a.__setitem__("model", "lenet5"), "unknown or invalid architecture"),     # needs 16x16 inputs
])
def test_invalid_architecture(tiny, resign_schema, change, fragment):
    expect_error(resign_schema(tiny["prune"], lambda s: change(s["architecture"])), fragment)


def test_architecture_that_does_not_match_the_tensors(packed, resign_schema):
    data = packed("prune").read_bytes()
    expect_error(resign_schema(data, lambda s: s["architecture"].__setitem__("model", "lenet5")),
                 "do not match the architecture")


def test_value_count_differs_from_the_mask_popcount(tiny_plain, resign_schema):
    def more_k(schema):
        first_masked(schema)["k"] += 1

    expect_error(resign_schema(tiny_plain["prune"], more_k), "values stored, the mask has")

    def k_beyond_n(schema):
        entry = first_masked(schema)
        entry["k"] = entry["n"] + 1

    expect_error(resign_schema(tiny_plain["prune"], k_beyond_n), "not in [0, n]")


def test_values_shape_changed(tiny_plain):
    def drop_one_value(schema, tensors):
        name = first_masked(schema)["name"]
        stored = tensors[f"v:{name}"]
        tensors[f"v:{name}"] = StoredTensor(stored.dtype, (stored.shape[0] - 1,), stored.data[:-2])

    expect_error(recontainer(tiny_plain["prune"], drop_one_value), "values stored, the mask has")

    def drop_one_value_and_k(schema, tensors):
        drop_one_value(schema, tensors)
        first_masked(schema)["k"] -= 1

    expect_error(recontainer(tiny_plain["prune"], drop_one_value_and_k), "mask of 'fc1.weight'")

    def values_2d(schema, tensors):
        name = first_masked(schema)["name"]
        stored = tensors[f"v:{name}"]
        tensors[f"v:{name}"] = StoredTensor(stored.dtype, (1, stored.shape[0]), stored.data)

    expect_error(recontainer(tiny_plain["prune"], values_2d), "values stored, the mask has")


def test_corrupted_mask_bytes_are_caught_by_the_mask_codec(tiny):
    def codec(value):
        def change(schema, tensors):
            stored = tensors["m:fc2.weight"]
            tensors["m:fc2.weight"] = StoredTensor("U8", stored.shape, bytes([value]) + bytes(stored.data[1:]))
        return change

    expect_error(recontainer(tiny["prune"], codec(99)), "mask of 'fc2.weight': unknown codec id 99")

    def truncate(schema, tensors):
        stored = tensors["m:fc2.weight"]
        tensors["m:fc2.weight"] = StoredTensor("U8", (stored.shape[0] - 1,), stored.data[:-1])

    expect_error(recontainer(tiny["prune"], truncate), "mask of 'fc2.weight'")

    def trailing(schema, tensors):
        stored = tensors["m:fc2.weight"]
        tensors["m:fc2.weight"] = StoredTensor("U8", (stored.shape[0] + 1,), bytes(stored.data) + b"\x00")

    expect_error(recontainer(tiny["prune"], trailing), "mask of 'fc2.weight'")

    # any other change of the code: the codec rejects it, or it decodes another mask that the hash rejects
    length = len(split_artifact(tiny["prune"])[1]["m:fc2.weight"].data)
    for position in range(1, length, max(1, length // 40)):
        def flip(schema, tensors, position=position):
            stored = tensors["m:fc2.weight"]
            data = bytearray(stored.data)
            data[position] ^= 0x10
            tensors["m:fc2.weight"] = StoredTensor("U8", stored.shape, bytes(data))
        with pytest.raises(FormatError, match="mask of 'fc2.weight'|hash mismatch for 'fc2.weight'"):
            load_bytes(recontainer(tiny["prune"], flip))


@pytest.mark.parametrize("mode", ["freeze", "prune"])
def test_masks_with_nothing_or_everything_trained_are_stored_as_zero_bytes(mode):
    state = {}
    data = make_tiny(mode, values="fp32", densities={"fc1.weight": 0.0, "fc3.weight": 1.0}, state_out=state)
    artifact = parse_artifact(data)
    assert artifact.tensors["m:fc1.weight"].data == b"" and artifact.tensors["m:fc3.weight"].data == b""
    assert artifact.tensors["v:fc1.weight"].shape == (0,) and artifact.tensors["v:fc3.weight"].shape == (200,)
    rebuilt = rebuild_state_dict(artifact)
    assert all(torch.equal(rebuilt[name], state[name]) for name in state)

    def coded_full_mask(schema, tensors):
        tensors["m:fc3.weight"] = StoredTensor("U8", (1,), b"\x00")  # codec 0 "empty": must be implied instead

    expect_error(recontainer(data, coded_full_mask), "must be stored as 0 bytes")


def test_mask_stored_with_the_wrong_dtype(tiny_plain):
    def as_i8(schema, tensors):
        stored = tensors["m:fc2.weight"]
        tensors["m:fc2.weight"] = StoredTensor("I8", stored.shape, stored.data)

    expect_error(recontainer(tiny_plain["prune"], as_i8), "mask must be 1-D U8")


def test_n_not_matching_the_architecture(tiny, resign_schema):
    def more_n(schema):
        first_masked(schema)["n"] += 1

    expect_error(resign_schema(tiny["prune"], more_n), "but the architecture has")


def test_hash_mismatch_after_changing_one_stored_value(tiny):
    for mode, data in tiny.items():
        def nudge(schema, tensors):
            stored = tensors["v:fc2.weight"]
            tensors["v:fc2.weight"] = StoredTensor(stored.dtype, stored.shape, bytes([stored.data[0] ^ 1]) + stored.data[1:])

        expect_error(recontainer(data, nudge), "hash mismatch for 'fc2.weight'")


def test_hash_mismatch_when_the_frozen_init_changes(tiny, resign_schema):
    expect_error(resign_schema(tiny["freeze"], lambda s: s.__setitem__("seed", 6)), "hash mismatch")

    def other_bound(schema):
        first_masked(schema)["init"]["bound"] *= 1.5

    expect_error(resign_schema(tiny["freeze"], other_bound), "hash mismatch")


@pytest.mark.parametrize("rule", [{"kind": "normal", "bound": 0.1}, {"kind": "uniform"}, {"kind": "uniform", "bound": -1},
                                  {"kind": "uniform", "bound": "0.1"}, {"kind": "uniform", "bound": None},
                                  {"kind": "uniform", "bound": 0.1, "x": 1}, [], None])
def test_invalid_init_rule(tiny, resign_schema, rule):
    def set_rule(schema):
        first_masked(schema)["init"] = rule

    expect_error(resign_schema(tiny["freeze"], set_rule), "invalid init rule")


def test_init_bound_overflowing_to_infinity(tiny, resign_schema):
    def infinite_bound(schema):
        first_masked(schema)["init"]["bound"] = 12345.5
        # JSON 1e999 parses to inf: no NaN/Infinity literal needed
        return json.dumps(schema, separators=(",", ":"), sort_keys=True).replace("12345.5", "1e999")

    expect_error(resign_schema(tiny["freeze"], infinite_bound), "the header holds the number 1e999, which overflows a float")


def test_huge_integer_init_bound_is_a_format_error(tiny, resign_schema):
    def set_rule(schema):
        first_masked(schema)["init"]["bound"] = 10**400

    expect_error(resign_schema(tiny["freeze"], set_rule), "beyond 64 bits")


@pytest.mark.parametrize("sha", ["0" * 63, "A" * 64, 5, None])
def test_invalid_sha256_field(tiny, resign_schema, sha):
    def set_sha(schema):
        first_masked(schema)["sha256"] = sha

    expect_error(resign_schema(tiny["prune"], set_sha), "invalid sha256")


@pytest.mark.parametrize("field, value", [("n", -1), ("n", 2**41), ("n", "5"), ("k", -1), ("k", 1.0)])
def test_invalid_counts(tiny, resign_schema, field, value):
    def set_count(schema):
        first_masked(schema)[field] = value

    expect_error(resign_schema(tiny["prune"], set_count), "masked tensor 'fc1.weight'")


def test_masked_entry_with_extra_or_missing_fields(tiny, resign_schema):
    expect_error(resign_schema(tiny["prune"], lambda s: first_masked(s).__setitem__("extra", 1)),
                 "must have exactly the fields")
    expect_error(resign_schema(tiny["prune"], lambda s: first_masked(s).pop("sha256") and None),
                 "must have exactly the fields")


def test_dense_entry_with_extra_fields(tiny, resign_schema):
    def extra(schema):
        next(e for e in schema["tensors"] if e["kind"] == "dense")["n"] = 5

    expect_error(resign_schema(tiny["prune"], extra), "must have exactly the fields")


def test_duplicate_tensor_entry(tiny, resign_schema):
    expect_error(resign_schema(tiny["prune"], lambda s: s["tensors"].append(dict(s["tensors"][0]))), "listed twice")


@pytest.mark.parametrize("entry", [{"kind": "dense"}, {"name": 3, "kind": "dense"}, "fc1.weight", None])
def test_tensor_entry_without_a_name(tiny, resign_schema, entry):
    expect_error(resign_schema(tiny["prune"], lambda s: s["tensors"].append(entry)), "a tensor entry has no name")


def test_stored_tensor_not_named_by_the_schema(tiny_plain):
    def extra(schema, tensors):
        tensors["x:extra"] = StoredTensor("U8", (3,), b"abc")

    expect_error(recontainer(tiny_plain["prune"], extra), "stored tensors not named by the schema: ['x:extra']")


def test_missing_tensor(tiny_plain):
    def drop_stored(schema, tensors):
        del tensors["d:fc1.bias"]

    expect_error(recontainer(tiny_plain["prune"], drop_stored), "dense tensor 'fc1.bias' has no stored data")

    def drop_values(schema, tensors):
        del tensors["v:fc2.weight"]

    expect_error(recontainer(tiny_plain["prune"], drop_values), "lacks its values or mask")

    def drop_entry_and_data(schema, tensors):
        schema["tensors"] = [e for e in schema["tensors"] if e["name"] != "fc1.bias"]
        del tensors["d:fc1.bias"]

    expect_error(recontainer(tiny_plain["prune"], drop_entry_and_data), "missing ['fc1.bias']")

    def unknown_name(schema, tensors):
        schema["tensors"].append({"name": "fc9.bias", "kind": "dense"})
        tensors["d:fc9.bias"] = StoredTensor("F16", (2,), b"\0" * 4)

    expect_error(recontainer(tiny_plain["prune"], unknown_name), "unexpected ['fc9.bias']")


def test_dense_tensor_with_the_wrong_shape(tiny):
    def reshape(schema, tensors):
        stored = tensors["d:fc1.bias"]
        tensors["d:fc1.bias"] = StoredTensor(stored.dtype, (stored.shape[0] // 2, 2), stored.data)

    expect_error(recontainer(tiny["prune"], reshape), "dense tensor 'fc1.bias' has shape")


@pytest.mark.parametrize("dtype", ["I16", "U16"])
def test_dense_tensor_with_a_dtype_the_loader_cannot_read(tiny, dtype):
    def retype(schema, tensors):
        stored = tensors["d:fc1.bias"]  # F16: 2 bytes per entry, like I16/U16
        tensors["d:fc1.bias"] = StoredTensor(dtype, stored.shape, stored.data)

    expect_error(recontainer(tiny["prune"], retype), "fc1.bias")


@pytest.mark.parametrize("kind", ["sparse", None, 1])
def test_unknown_kind(tiny, resign_schema, kind):
    def set_kind(schema):
        schema["tensors"][0]["kind"] = kind

    expect_error(resign_schema(tiny["prune"], set_kind), "has unknown kind")


def test_read_artifact_of_a_directory_or_missing_file(tmp_path):
    with pytest.raises(FormatError, match=f"artifact {tmp_path / 'missing.cpk'} does not exist"):
        formats.read_artifact(tmp_path / "missing.cpk")
    with pytest.raises(FormatError, match="is not a file"):
        formats.read_artifact(tmp_path)
    assert issubclass(FormatError, formats.UserError)


# ---------------------------------------------------------------------------------------------------------------
# Every changed byte is detected


def test_every_flipped_byte_of_a_small_artifact_is_detected(tiny):
    data = tiny["freeze"]
    parse_artifact(data)
    patterns = (0x01, 0x80, 0xFF, 0x20, 0x5A)
    for position in range(len(data)):
        for pattern in (patterns[position % len(patterns)], 0x40):
            changed = bytearray(data)
            changed[position] ^= pattern
            with pytest.raises(FormatError):
                parse_artifact(bytes(changed))


def test_flipped_bytes_of_a_packed_run_are_detected(packed):
    data = packed("prune").read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    generator = torch.Generator().manual_seed(0)
    sample = torch.randint(header_end, len(data), (2000,), generator=generator).tolist()
    for position in [*range(header_end), *sample, len(data) - 1]:
        changed = bytearray(data)
        changed[position] ^= 1 << (position % 8)
        with pytest.raises(FormatError):
            parse_artifact(bytes(changed))


# ---------------------------------------------------------------------------------------------------------------
# Fuzzing: mutated files raise FormatError or load, never anything else


@pytest.fixture(scope="module")
def fuzz_file(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz") / "mutated.cpk"


def split_file(data: bytes) -> tuple[bytes, bytes, bytes]:
    length = int.from_bytes(data[:8], "little")
    return data[:8], data[8 : 8 + length], data[8 + length :]


def apply_edits(data: bytes, edits) -> bytes:
    data = bytearray(data)
    for op, where, value in edits:
        position = where % (len(data) + 1)
        if op == "flip" and position < len(data):
            data[position] ^= value or 1
        elif op == "set" and position < len(data):
            data[position] = value
        elif op == "insert":
            data[position:position] = bytes([value])
        elif op == "delete":
            del data[position : position + 1 + value % 4]
        elif op == "truncate":
            del data[position:]
    return bytes(data)


EDITS = st.lists(st.tuples(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]),
                           st.integers(0, 2**20), st.integers(0, 255)), min_size=1, max_size=4)
JSON_CHARS = st.sampled_from(list(b'{}[]",:0123456789.-eE tfnrulasF16U8I4'))
TEXT_EDITS = st.lists(st.tuples(st.sampled_from(["flip", "set", "insert", "delete"]), st.integers(0, 2**16),
                                JSON_CHARS), min_size=1, max_size=3)


def sign_header_text(text: bytes, body: bytes) -> bytes:
    """Pad and sign raw header text that holds the zeroed checksum field (else it stays unsigned)."""
    zero = b'"checksum":"' + b"0" * 64 + b'"'
    text = text + b" " * (-len(text) % 8)
    digest = hashlib.sha256(len(text).to_bytes(8, "little") + text + body).hexdigest().encode()
    return len(text).to_bytes(8, "little") + text.replace(zero, b'"checksum":"' + digest + b'"', 1) + body


def zeroed_header(data: bytes) -> tuple[bytes, bytes]:
    _, header, body = split_file(data)
    digest = json.loads(header)["__metadata__"]["checksum"]
    return header.rstrip(b" ").replace(digest.encode(), b"0" * 64), body


@st.composite
def mutated_files(draw):
    compact = draw(st.booleans())
    base = make_tiny_cached(draw(st.sampled_from(["freeze", "prune"])), compact)
    kind = draw(st.sampled_from(["raw", "random", "header-text", "schema-text"] + (["payload"] if compact else [])))
    if kind == "raw":
        return apply_edits(base, draw(EDITS))
    if kind == "random":
        prefix = draw(st.sampled_from([b"", len(b"{}").to_bytes(8, "little")]))
        return prefix + draw(st.binary(max_size=512))
    if kind == "payload":  # the coded sections edited, the container re-signed: the decoders must reject it
        metadata, stored = decode_container(base)
        payload = apply_edits(bytes(stored["payload"].data), draw(EDITS))
        return encode_container({"payload": StoredTensor("U8", (len(payload),), payload)},
                                {"compress": metadata["compress"]})
    if kind == "schema-text" and compact:
        schema, tensors, _ = split_artifact(base)
        text = apply_edits(json.dumps(schema, separators=(",", ":"), sort_keys=True).encode(), draw(TEXT_EDITS))
        return encode_artifact(text.decode("utf-8", "replace"), tensors, compact=True)
    header, body = zeroed_header(base)
    if kind == "header-text":
        return sign_header_text(apply_edits(header, draw(TEXT_EDITS)), body)
    parsed = json.loads(header)
    schema_text = apply_edits(parsed["__metadata__"]["compress"].encode(), draw(TEXT_EDITS))
    parsed["__metadata__"]["compress"] = schema_text.decode("utf-8", "replace")
    return sign_header_text(json.dumps(parsed, separators=(",", ":"), ensure_ascii=False).encode(), body)


_TINY_CACHE = {}


def make_tiny_cached(mode: str, compact: bool) -> bytes:
    if (mode, compact) not in _TINY_CACHE:
        _TINY_CACHE[mode, compact] = make_tiny(mode, compact=compact)
    return _TINY_CACHE[mode, compact]


def load_or_format_error(path, data: bytes) -> None:
    path.write_bytes(data)
    try:
        state = formats.load_state_dict(path)
    except FormatError:
        return
    assert all(isinstance(v, torch.Tensor) for v in state.values())


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=mutated_files())
def test_fuzz_mutated_files_raise_only_format_error(fuzz_file, data):
    load_or_format_error(fuzz_file, data)


def json_values():
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.sampled_from([10**400, -(10**400)]),
                        st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8),
                        st.sampled_from(["F16", "U8", "I64", "freeze", "prune", "dense", "masked", GENERATOR_NAME]))
    return st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                        max_leaves=6)


def replace_node(tree, path_choices, value):
    """Replace the node reached by following indices ``path_choices`` (modulo each container's size)."""
    node = tree
    for i, choice in enumerate(path_choices):
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            break
        key = keys[choice % len(keys)]
        child = node[key]
        if i == len(path_choices) - 1 or not isinstance(child, (dict, list)):
            node[key] = value
            return tree
        node = child
    return tree


@st.composite
def structurally_mutated_files(draw):
    compact = draw(st.booleans())
    base = make_tiny_cached(draw(st.sampled_from(["freeze", "prune"])), compact)
    header, body = zeroed_header(base)
    parsed = json.loads(header)
    path = draw(st.lists(st.integers(0, 50), min_size=1, max_size=5))
    value = draw(json_values())
    if compact and draw(st.booleans()):  # the coded schema, its layout fields included
        schema, tensors, _ = split_artifact(base)
        replace_node(schema, path, value)
        return encode_artifact(json.dumps(schema, separators=(",", ":"), sort_keys=True), tensors, compact=True)
    if draw(st.booleans()):
        schema = json.loads(parsed["__metadata__"]["compress"])
        replace_node(schema, path, value)
        parsed["__metadata__"]["compress"] = json.dumps(schema, separators=(",", ":"), sort_keys=True)
    else:
        metadata = parsed.pop("__metadata__")
        replace_node(parsed, path, value)
        parsed = {"__metadata__": metadata, **parsed}
    return sign_header_text(json.dumps(parsed, separators=(",", ":"), ensure_ascii=False).encode(), body)


def test_fuzz_resigned_structural_mutations_raise_only_format_error(fuzz_file):
    unexpected = collections.Counter()  # every distinct failure is listed, not only the first one

    @settings(max_examples=300, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(data=structurally_mutated_files())
    def check(data):
        try:
            load_or_format_error(fuzz_file, data)
        except Exception as error:  # noqa: BLE001 - collected and asserted below
            unexpected[f"{type(error).__name__}: {error}"[:100]] += 1

    check()
    assert not unexpected, unexpected.most_common()


# ---------------------------------------------------------------------------------------------------------------
# Interoperability and golden bytes


def test_a_packed_artifact_opens_with_the_official_safetensors_reader(packed):
    path = packed("freeze")
    _, stored = decode_container(path.read_bytes())
    dtypes = {torch.float16: "F16", torch.float32: "F32", torch.uint8: "U8", torch.int64: "I64"}
    with safe_open(str(path), "pt") as reader:
        assert sorted(reader.keys()) == sorted(stored)
        assert set(reader.metadata()) == {"compress", "checksum"}
        for name in reader.keys():
            tensor = reader.get_tensor(name)
            assert dtypes[tensor.dtype] == stored[name].dtype, name
            assert tuple(tensor.shape) == stored[name].shape, name
            assert tensor.contiguous().view(torch.uint8).numpy().tobytes() == stored[name].data, name


def golden_artifact(compact: bool = False) -> bytes:
    state = {
        "fc.weight": torch.tensor([[0.5, 0.0, -0.25, 0.0], [0.0, 1.5, 0.0, 0.0]], dtype=torch.float32),
        "fc.bias": torch.tensor([0.125, -1.0], dtype=torch.float32),
    }
    masks = {"fc.weight": torch.tensor([[True, False, True, False], [False, True, False, False]])}
    return write_artifact(state, masks, mode="prune", seed=0,
                          architecture={"model": "lenet300", "input_shape": [1, 2, 2], "num_classes": 2},
                          init_rules={}, manifest={"method": "golden"}, values="fp16", dense_fp32_bytes=256,
                          generator=GENERATOR, compact=compact)


# If a hash changes, the writer's bytes changed: that is a format change. Bump FORMAT_VERSION in
# formats/artifact.py (and SPEC.md section 5), keep reading the older versions, then update the hash.
GOLDEN_SHA256 = "96b3ac1cb6fcc01eaa018ab4ff94a5631aac5534415016181008c045eaad017f"
GOLDEN_COMPACT_SHA256 = "918f4d70a9811dee1ccb6ee4d6813073aa8f299aa7d8c902fc32e02c03e9c2c4"


def test_golden_bytes_pin_the_plain_writer():
    data = golden_artifact()
    assert data == golden_artifact()  # deterministic
    artifact = parse_artifact(data)
    assert artifact.schema["version"] == 1 and formats.FORMAT_VERSION == 5  # a registry model, no interspace: version 1
    assert sorted(artifact.tensors) == ["d:fc.bias", "m:fc.weight", "v:fc.weight"]
    assert artifact.tensors["v:fc.weight"].data == torch.tensor([0.5, -0.25, 1.5], dtype=torch.float16).view(
        torch.uint8).numpy().tobytes()
    assert (8 + int.from_bytes(data[:8], "little")) % 8 == 0  # header padded to a multiple of 8
    assert hashlib.sha256(data).hexdigest() == GOLDEN_SHA256


def test_golden_bytes_pin_the_compact_writer():
    data = golden_artifact(compact=True)
    assert data == golden_artifact(compact=True)  # deterministic
    metadata, stored = decode_container(data)
    assert json.loads(metadata["compress"])["version"] == 5 and list(stored) == ["payload"]
    schema, tensors, compact = split_artifact(data)
    assert compact and tensors["v:fc.weight"].data == torch.tensor([0.5, -0.25, 1.5], dtype=torch.float16).view(
        torch.uint8).numpy().tobytes()
    assert schema["tensors"][0]["sha256"] == parse_artifact(golden_artifact()).schema["tensors"][0]["sha256"][:16]
    assert hashlib.sha256(data).hexdigest() == GOLDEN_COMPACT_SHA256
