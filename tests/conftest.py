"""Shared fixtures: finished run directories (trained once per session), packed artifacts, re-signing."""
import hashlib
import json

import pytest

from formats.artifact import encode_artifact, split_artifact

from cli.main import main

_QUICK_LENET = ["--model", "lenet300", "--data", "synthetic", "--subset", "256", "--epochs", "1",
                "--batch-size", "64", "--quiet"]
RUN_ARGS = {
    "freeze": [*_QUICK_LENET, "--method", "freezenet", "--density", "0.05"],
    "prune": [*_QUICK_LENET, "--method", "snip", "--density", "0.05"],
    "dense": [*_QUICK_LENET, "--method", "dense"],
    # BatchNorm: running stats (float) and num_batches_tracked (int64) buffers.
    "bn": ["--model", "resnet20", "--data", "synthetic", "--data-shape", "3x8x8", "--subset", "64", "--epochs", "1",
           "--batch-size", "32", "--score-batch-size", "32", "--quiet", "--method", "freezenet", "--density", "0.1"],
}


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """``finished_run(kind)``: the directory of a finished quick run (kinds: RUN_ARGS), trained once."""
    cache = {}

    def get(kind: str):
        if kind not in cache:
            out = tmp_path_factory.mktemp("runs") / kind
            assert main(["train", *RUN_ARGS[kind], "--out", str(out)]) == 0
            cache[kind] = out
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def packed(finished_run, tmp_path_factory):
    """``packed(kind, values="fp16")``: path of the artifact of ``finished_run(kind)``, packed once."""
    from compress.packing import pack_run

    cache = {}

    def get(kind: str, values: str = "fp16"):
        if (kind, values) not in cache:
            out = tmp_path_factory.mktemp("packed") / f"{kind}-{values}.cpk"
            pack_run(finished_run(kind), out, values)
            cache[kind, values] = out
        return cache[kind, values]

    return get


def _resign(data: bytes, mutate_header=None, mutate_body=None) -> bytes:
    """Re-sign container bytes after changing them, so that checks beyond the checksum are reached.

    ``mutate_header(header)`` gets the decoded header dict (checksum already zeroed); it may change it
    in place (return None), return a new object to serialise, or return raw JSON text (str/bytes) that
    must contain the zeroed checksum field to be signed. ``mutate_body(body) -> bytes`` changes the data
    buffer. The checksum is recomputed as formats/container.py does: SHA-256 of the whole file with
    the 64 digest digits replaced by zeros.
    """
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length].decode("utf-8"))
    body = data[8 + length :]
    zero = "0" * 64
    header["__metadata__"]["checksum"] = zero
    result = mutate_header(header) if mutate_header is not None else None
    if result is None:
        result = header
    if isinstance(result, (str, bytes)):
        text = result.encode("utf-8") if isinstance(result, str) else result
    else:
        text = json.dumps(result, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    if mutate_body is not None:
        body = mutate_body(body)
    unsigned = len(text).to_bytes(8, "little") + text + body
    digest = hashlib.sha256(unsigned).hexdigest()
    marker = f'"checksum":"{zero}"'.encode()
    return len(text).to_bytes(8, "little") + text.replace(marker, f'"checksum":"{digest}"'.encode(), 1) + body


def _resign_schema(data: bytes, mutate_schema) -> bytes:
    """The file rewritten, in its own layout (compact or plain), after ``mutate_schema(schema)`` changed the schema
    dict in place (or returned a new one, or JSON text to write as it is)."""
    schema, tensors, compact = split_artifact(data)
    result = mutate_schema(schema)
    return encode_artifact(schema if result is None else result, tensors, compact)


@pytest.fixture(scope="session")
def resign():
    """``resign(data, mutate_header=None, mutate_body=None) -> bytes`` (see _resign)."""
    return _resign


@pytest.fixture(scope="session")
def resign_schema():
    """``resign_schema(data, mutate_schema) -> bytes``: re-signed after a change of the schema JSON."""
    return _resign_schema
