"""The compact layout (format version 5, formats/compact.py): exact round trips, the coding of values and schema,
and one test per malformation of its stub, sections, streams and layout fields (the schema's own checks run on
both layouts in test_formats.py)."""
import hashlib
import json
import lzma
import tracemalloc
import zlib

import numpy as np
import pytest
import torch

import formats
from formats import compact as layout
from formats.artifact import FORMAT_NAME, encode_artifact, parse_artifact, rebuild_state_dict, split_artifact
from formats.container import MAX_HEADER_BYTES, StoredTensor, decode_container, encode_container
from cli_helpers import run_cli
from test_formats import expect_error, first_masked, make_tiny


@pytest.fixture(scope="module")
def tiny():
    return {mode: make_tiny(mode, compact=True) for mode in ("freeze", "prune")}


def sections_of(data: bytes) -> dict[str, bytes]:
    metadata, stored = decode_container(data)
    lengths = json.loads(metadata["compress"])["sections"]
    payload, sections, position = bytes(stored["payload"].data), {}, 0
    for name, length in zip(layout.SECTIONS, lengths):
        sections[name], position = payload[position : position + length], position + length
    return sections


def assemble(sections: dict[str, bytes], stub: dict | None = None, extra: dict | None = None) -> bytes:
    """A signed compact file of these sections (the stub's lengths computed unless ``stub`` is given)."""
    lengths, payload = layout.join_sections(sections)
    stub = stub if stub is not None else {"format": FORMAT_NAME, "version": 5, **lengths}
    tensors = {"payload": StoredTensor("U8", (len(payload),), payload), **(extra or {})}
    return encode_container(tensors, {"compress": json.dumps(stub)})


def with_schema_text(data: bytes, edit) -> bytes:
    """The file with its schema section recoded after ``edit(text) -> text``, every other section as it was."""
    sections = sections_of(data)
    sections["schema"] = layout.encode_schema(edit(layout.decode_schema(sections["schema"])))
    return assemble(sections)


# ---------------------------------------------------------------------------------------------------------------
# Round trips and sizes


@pytest.mark.parametrize("values", ["fp16", "bf16", "fp32", "int8"])
@pytest.mark.parametrize("mode", ["freeze", "prune"])
def test_compact_and_plain_files_rebuild_bit_identical_state_dicts(mode, values):
    compact = parse_artifact(make_tiny(mode, values=values, compact=True))
    plain = parse_artifact(make_tiny(mode, values=values, compact=False))
    assert compact.schema["version"] == 5 and plain.schema["version"] == (4 if values == "int8" else 1)
    rebuilt, reference = rebuild_state_dict(compact), rebuild_state_dict(plain)
    assert list(rebuilt) == list(reference)
    assert all(torch.equal(rebuilt[k], reference[k]) and rebuilt[k].dtype == reference[k].dtype for k in reference)


def test_a_compact_file_is_one_safetensors_tensor_and_much_smaller_than_the_plain_one(tiny):
    plain = make_tiny("prune", compact=False)
    metadata, stored = decode_container(tiny["prune"])
    assert list(stored) == ["payload"] and set(json.loads(metadata["compress"])) == {"format", "version", "sections"}
    compact_info, plain_info = parse_artifact(tiny["prune"]), parse_artifact(plain)
    assert compact_info.header_bytes < plain_info.header_bytes / 2  # schema coded with the preset dictionary
    assert len(tiny["prune"]) < len(plain)


def test_the_report_gives_coded_and_raw_bytes(tiny):
    info = formats.artifact.information_report(parse_artifact(tiny["prune"]))
    totals = info["totals"]
    assert totals["layout"] == "compact"
    assert totals["value_raw_bytes"] == 2 * totals["masked_trained"]
    assert totals["value_raw_bytes"] == sum(r["value_bytes"] for r in info["tensors"] if r["kind"] == "masked")
    assert 0 < totals["value_bytes"] < totals["value_raw_bytes"]  # N(0, 0.1) values: the exponents code well
    sections = sections_of(tiny["prune"])
    assert totals["value_bytes"] == len(sections["values"]) and totals["dense_bytes"] == len(sections["dense"])
    assert totals["mask_bytes"] == len(sections["masks"]) and totals["basis_bytes"] == 0 == len(sections["bases"])
    assert totals["header_bytes"] == 8 + int.from_bytes(tiny["prune"][:8], "little") + len(sections["schema"])


def test_reading_a_compact_file_decodes_no_value_stream_until_it_is_rebuilt(tiny, monkeypatch, tmp_path):
    path = tmp_path / "t.cpk"
    path.write_bytes(tiny["prune"])

    def refuse(*args):
        raise AssertionError("a value stream was decoded")

    monkeypatch.setattr(layout, "decode_stream", refuse)
    formats.read_info(path)
    with pytest.raises(AssertionError, match="a value stream was decoded"):
        formats.load_state_dict(path)


def test_byte_planes_of_mixed_element_sizes_round_trip():
    rng = np.random.default_rng(0)
    parts = [(rng.integers(0, 256, count * size, dtype=np.uint8).tobytes(), size)
             for count, size in ((5, 2), (0, 4), (3, 8), (7, 1), (4, 4))]
    planes = layout._byte_planes(parts)
    assert len(planes) == sum(len(data) for data, _ in parts)
    first = np.frombuffer(parts[0][0], np.uint8).reshape(-1, 2)[:, 1].tobytes()  # most significant bytes first
    assert planes.startswith(first)
    decoded = layout.decode_stream(layout.encode_stream(parts), [(len(d) // s, s) for d, s in parts], "values")
    assert [d.tobytes() for d in decoded] == [data for data, _ in parts]


# Version 5 schemas decode with this dictionary: changing it is a format change (a new version).
SCHEMA_DICTIONARY_SHA256 = "4dcf0d08d72ccd77a8e8b961932f2740330c86b4d02c74c262450ed489443926"


def test_the_schema_dictionary_is_frozen():
    assert hashlib.sha256(layout.SCHEMA_DICTIONARY).hexdigest() == SCHEMA_DICTIONARY_SHA256


# ---------------------------------------------------------------------------------------------------------------
# The stub and the payload


@pytest.mark.parametrize("change, fragment", [
    (lambda stub: stub.update(extra=1), "must be exactly {format, version, sections}"),
    (lambda stub: stub.pop("sections") and None, "must be exactly {format, version, sections}"),
    (lambda stub: stub.update(format="other"), "must be exactly {format, version, sections}"),
    (lambda stub: stub.update(sections=[1, 2, 3]), "the stub's sections must be 5 byte lengths"),
    (lambda stub: stub.update(sections=[-1, 0, 0, 0, 0]), "the stub's sections must be 5 byte lengths"),
    (lambda stub: stub.update(sections=[1.0, 0, 0, 0, 0]), "the stub's sections must be 5 byte lengths"),
    (lambda stub: stub.update(sections=[2**60, 0, 0, 0, 0]), "the stub's sections must be 5 byte lengths"),
    (lambda stub: stub["sections"].__setitem__(0, stub["sections"][0] + 1), "the sections add up to"),
    (lambda stub: stub["sections"].__setitem__(4, stub["sections"][4] - 1), "the sections add up to"),
])
def test_a_malformed_stub_is_a_format_error(tiny, change, fragment):
    sections = sections_of(tiny["prune"])
    stub = {"format": FORMAT_NAME, "version": 5, **layout.join_sections(sections)[0]}
    change(stub)
    expect_error(assemble(sections, stub), fragment)


def test_a_shifted_section_boundary_is_a_format_error(tiny):
    sections = sections_of(tiny["prune"])
    stub = {"format": FORMAT_NAME, "version": 5, **layout.join_sections(sections)[0]}
    stub["sections"][1] += 1  # the values section takes the first byte of the dense one: same total
    stub["sections"][2] -= 1
    expect_error(assemble(sections, stub), "section")


def test_a_compact_file_holds_exactly_one_u8_payload(tiny):
    sections = sections_of(tiny["prune"])
    expect_error(assemble(sections, extra={"d:x": StoredTensor("U8", (1,), b"x")}), "exactly one 1-D U8 tensor")
    lengths, payload = layout.join_sections(sections)
    stub = json.dumps({"format": FORMAT_NAME, "version": 5, **lengths})
    odd = len(payload) % 2 == 0
    two_d = encode_container({"payload": StoredTensor("U8", (1, len(payload)), payload)}, {"compress": stub})
    expect_error(two_d, "exactly one 1-D U8 tensor")
    renamed = encode_container({"data": StoredTensor("U8", (len(payload),), payload)}, {"compress": stub})
    expect_error(renamed, "exactly one 1-D U8 tensor")
    if odd:
        as_i16 = encode_container({"payload": StoredTensor("I16", (len(payload) // 2,), payload)}, {"compress": stub})
        expect_error(as_i16, "exactly one 1-D U8 tensor")


# ---------------------------------------------------------------------------------------------------------------
# The schema section


def test_a_schema_section_that_is_not_deflate_is_a_format_error(tiny):
    sections = sections_of(tiny["prune"])
    expect_error(assemble({**sections, "schema": b"\xff" * 40}), "the schema section is not a valid deflate stream")


def test_a_truncated_schema_section_is_a_format_error(tiny):
    sections = sections_of(tiny["prune"])
    expect_error(assemble({**sections, "schema": sections["schema"][:-5]}), "schema section is truncated")


def test_bytes_after_the_schema_stream_are_a_format_error(tiny):
    sections = sections_of(tiny["prune"])
    expect_error(assemble({**sections, "schema": sections["schema"] + b"\0"}), "after the end of the schema")


def test_a_schema_that_decodes_beyond_the_header_limit_is_rejected_without_decoding_it_all(tiny):
    sections = sections_of(tiny["prune"])
    bomb = layout.encode_schema(" " * (MAX_HEADER_BYTES + 1))  # about 16 KB of deflate
    tracemalloc.start()
    try:
        expect_error(assemble({**sections, "schema": bomb}), "the schema decodes to more than")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2.5 * MAX_HEADER_BYTES


def test_a_schema_that_is_not_utf8_or_json_is_a_format_error(tiny):
    sections = sections_of(tiny["prune"])
    coder = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zlib.Z_DEFAULT_STRATEGY, layout.SCHEMA_DICTIONARY)
    expect_error(assemble({**sections, "schema": coder.compress(b"{\xff}") + coder.flush()}), "not valid UTF-8")
    expect_error(with_schema_text(tiny["prune"], lambda text: text[:-1]), "schema is not valid JSON")
    expect_error(with_schema_text(tiny["prune"], lambda text: "[1]"), "schema is not a JSON object")


@pytest.mark.parametrize("edit, fragment", [
    (lambda s: s.update(version=4), "the schema's version 4 differs from the metadata's 5"),
    (lambda s: s.update(format="other"), "not a compress-artifact file"),
    (lambda s: s.update(tensors={}), "schema field 'tensors' is missing or not a list"),
])
def test_a_schema_that_contradicts_the_stub_is_a_format_error(tiny, edit, fragment):
    def change(text):
        schema = json.loads(text)
        edit(schema)
        return json.dumps(schema)

    expect_error(with_schema_text(tiny["prune"], change), fragment)


# ---------------------------------------------------------------------------------------------------------------
# Value streams


@pytest.mark.parametrize("stream", ["values", "dense"])
def test_a_value_stream_that_is_not_lzma2_is_a_format_error(tiny, stream):
    sections = sections_of(tiny["prune"])
    expect_error(assemble({**sections, stream: b"\xff" * len(sections[stream])}),
                 f"the {stream} section is not a valid LZMA2 stream")


@pytest.mark.parametrize("stream", ["values", "dense"])
def test_a_truncated_value_stream_is_a_format_error(tiny, stream):
    sections = sections_of(tiny["prune"])
    expect_error(assemble({**sections, stream: sections[stream][: len(sections[stream]) // 2]}),
                 f"the {stream} section decodes to")


@pytest.mark.parametrize("stream", ["values", "dense"])
def test_bytes_after_a_value_stream_are_a_format_error(tiny, stream):
    sections = sections_of(tiny["prune"])
    expect_error(assemble({**sections, stream: sections[stream] + b"\0\0"}), f"after the end of the {stream} section")


def test_a_value_stream_longer_than_its_tensors_is_rejected_without_decoding_it(tiny):
    sections = sections_of(tiny["prune"])
    bomb = lzma.compress(bytes(2**26), format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": 1}])
    tracemalloc.start()
    try:
        expect_error(assemble({**sections, "values": bomb}), "the values section decodes to more than")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**24  # the declared few KB and the decoder's window, not the 64 MiB the stream holds


def test_a_value_section_for_tensors_that_hold_nothing_must_be_empty(tiny):
    data = make_tiny("prune", densities={"fc1.weight": 0.0, "fc2.weight": 0.0, "fc3.weight": 0.0}, compact=True)
    sections = sections_of(data)
    assert sections["values"] == b""
    expect_error(assemble({**sections, "values": b"\0"}), "the values section holds 1 bytes but its tensors hold none")


def test_a_value_stream_that_decodes_other_values_is_caught_by_the_hash(tiny):
    schema, tensors, _ = split_artifact(tiny["prune"])
    stored = tensors["v:fc2.weight"]
    tensors["v:fc2.weight"] = StoredTensor(stored.dtype, stored.shape, bytes([stored.data[0] ^ 1]) + stored.data[1:])
    expect_error(encode_artifact(schema, tensors, compact=True), "hash mismatch for 'fc2.weight'")


# ---------------------------------------------------------------------------------------------------------------
# Layout fields of the schema


def _edit_entries(data: bytes, edit) -> bytes:
    def change(text):
        schema = json.loads(text)
        edit(schema)
        return json.dumps(schema)

    return with_schema_text(data, change)


def _dense(schema) -> dict:
    return next(e for e in schema["tensors"] if e["kind"] == "dense")


@pytest.mark.parametrize("edit, fragment", [
    (lambda s: first_masked(s).pop("code"), "code (its mask code's bytes) and k must be non-negative integers"),
    (lambda s: first_masked(s).update(code=-1), "code (its mask code's bytes) and k must be non-negative integers"),
    (lambda s: first_masked(s).update(code="5"), "code (its mask code's bytes) and k must be non-negative integers"),
    (lambda s: first_masked(s).update(code=first_masked(s)["code"] + 1), "the masked tensors' codes add up to"),
    (lambda s: _dense(s).pop("dtype"), "dtype and shape must be a known dtype"),
    (lambda s: _dense(s).update(dtype="X8"), "dtype and shape must be a known dtype"),
    (lambda s: _dense(s).update(dtype=["F16"]), "dtype and shape must be a known dtype"),
    (lambda s: _dense(s).update(shape=[-1]), "dtype and shape must be a known dtype"),
    (lambda s: _dense(s).update(shape=[1] * 9), "dtype and shape must be a known dtype"),
    (lambda s: _dense(s).update(shape="300"), "dtype and shape must be a known dtype"),
    (lambda s: _dense(s).update(shape=[2**40, 2**40]), "dtype and shape must be a known dtype"),
    (lambda s: _dense(s).update(shape=[1, _dense(s)["shape"][0]]), "has shape"),
    (lambda s: _dense(s).update(dtype="F32"), "is stored as F32"),
    (lambda s: _dense(s).update(extra=1), "must have exactly the fields"),
    (lambda s: first_masked(s).update(sha256="0" * 64), "invalid sha256"),
    (lambda s: first_masked(s).update(sha256="0" * 16), "hash mismatch"),
])
def test_malformed_layout_fields_are_format_errors(tiny, edit, fragment):
    expect_error(_edit_entries(tiny["prune"], edit), fragment)


def test_a_mask_code_boundary_moved_between_tensors_is_caught(tiny):
    def move(schema):
        masked = [e for e in schema["tensors"] if e["kind"] == "masked"]
        masked[0]["code"] += 1
        masked[1]["code"] -= 1

    expect_error(_edit_entries(tiny["prune"], move), "mask of")


# ---------------------------------------------------------------------------------------------------------------
# compress pack --layout


@pytest.mark.parametrize("kind", ["freeze", "bn"])
def test_pack_layout_plain_and_compact_load_to_the_same_model(finished_run, tmp_path, capsys, kind):
    run = finished_run(kind)
    code, out, err = run_cli(["pack", run, "-o", tmp_path / "c.cpk"], capsys)
    assert code == 0 and "compact layout, format version 5" in out and "entropy-coded from" in out, err
    code, out, err = run_cli(["pack", run, "-o", tmp_path / "p.cpk", "--layout", "plain"], capsys)
    assert code == 0 and "plain layout, format version 1" in out, err
    compact, plain = formats.load_state_dict(tmp_path / "c.cpk"), formats.load_state_dict(tmp_path / "p.cpk")
    assert list(compact) == list(plain) and all(torch.equal(compact[k], plain[k]) for k in plain)
    assert (tmp_path / "c.cpk").stat().st_size < (tmp_path / "p.cpk").stat().st_size


def test_an_unknown_layout_is_a_user_error(finished_run, tmp_path, capsys):
    code, _, err = run_cli(["pack", finished_run("prune"), "-o", tmp_path / "x.cpk", "--layout", "zip"], capsys)
    assert code == 2 and "'zip' is not one of 'compact', 'plain'" in err and not (tmp_path / "x.cpk").exists()
    from compress.packing import pack_run
    from formats.errors import UserError

    with pytest.raises(UserError, match="unknown --layout 'zip'; known: compact, plain"):
        pack_run(finished_run("prune"), tmp_path / "x.cpk", layout="zip")
    assert not (tmp_path / "x.cpk").exists()
