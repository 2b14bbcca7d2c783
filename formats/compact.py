"""The compact layout of format version 5: one safetensors tensor ``payload`` of five coded sections.

Sections, back to back, their byte lengths listed in the container's ``__metadata__["compress"]`` stub:

1. ``schema``: the schema JSON, raw deflate (RFC 1951) with the preset dictionary ``SCHEMA_DICTIONARY``
   (a frozen sample of schema text: keys and common values, so even a short schema codes well);
2. ``values``: the trained values of every masked tensor, 3. ``dense``: the dense tensors except filter
   bases, 4. ``bases``: the filter bases of interspace layers; each a raw LZMA2 stream (stdlib ``lzma``) of
   the tensors' *byte planes*: first the most significant byte of every element of every tensor, then the
   next byte, and so on (for fp16: sign, exponent and two mantissa bits, then the low mantissa byte), so the
   exponents, which carry the structure, are modelled together and the near-random low bytes apart;
5. ``masks``: the mask codes of the masked tensors (``formats.mask_codec``, already at their information
   limit), concatenated in schema order.

An empty tensor list gives an empty (0-byte) section. Decoding is exact and bounded: the schema section
may decode to at most ``MAX_HEADER_BYTES``, a value section to exactly the size its tensors declare,
computed from the schema and the architecture before anything is decoded (see SPEC.md section 6).
"""
from __future__ import annotations

import lzma
import zlib

import numpy as np

from formats.container import MAX_HEADER_BYTES
from formats.errors import FormatError

PAYLOAD = "payload"
SECTIONS = ("schema", "values", "dense", "bases", "masks")
STREAMS = ("values", "dense", "bases")  # the LZMA-coded sections
LZMA_DICT_BYTES = 2**22  # the window of every value stream: what a decoder allocates, whatever the file says
_DECODER_FILTERS = [{"id": lzma.FILTER_LZMA2, "dict_size": LZMA_DICT_BYTES}]
_EXTREME_BELOW = 2**22  # streams shorter than this are coded with the slowest, smallest preset

# Frozen with format version 5: a change here changes how every version-5 schema decodes.
SCHEMA_DICTIONARY = (
    b'{"architecture":{"input_shape":[3,32,32],"interspace":{"layers":["conv1","layer1.0.conv1"]},"model":"resnet20",'
    b'"num_classes":10},"dense_fp32_bytes":1,"format":"compress-artifact","generator":{"name":"philox4x32-10",'
    b'"version":1},"manifest":{"config":{"basis":"dct","basis_in_budget":false,"batch_size":128,"data":"cifar10",'
    b'"data_shape":null,"density":0.01,"epochs":10,"fixed_basis":false,"gamma":0.5,"include_bias":false,'
    b'"interspace":false,"lr":0.1,"lr_decay":0.1,"milestones":null,"mode":"freeze","momentum":0.9,"nesterov":false,'
    b'"num_classes":null,"optimizer":"sgd","schedule":"cosine","scope":"global","score_batch_size":100,'
    b'"score_batches":1,"score_mode":"eval","scores":null,"seed":0,"step_size":null,"strategy_options":{},'
    b'"subset":null,"val_split":0.0,"weight_decay":0.0005},"class_names":["T-shirt/top","Trouser","Pullover",'
    b'"Dress","Coat","Sandal","Shirt","Sneaker","Bag","Ankle boot"],"density":0.01,"eval":{"data":"fashion-mnist","samples":10000,'
    b'"test_acc_packed":0.9,"test_acc_unpacked":0.9},"level":1,"method":"freezenet","normalization":{"mean":[0.286],'
    b'"std":[0.353]},"requested_density":0.01,"scope":"erk","score":"snip","strategy":"oneshot","test_acc":0.9,'
    b'"total_params":1,"trained_params":1,"versions":{"compress":"0.1.0","numpy":"2.","safetensors":"0.",'
    b'"torch":"2."}},"mode":"prune","quantized":"I8","seed":0,"tensors":[{"code":1,"init":{"bound":0.1,'
    b'"kind":"uniform","stream":"conv1.weight"},"k":1,"kind":"masked","n":1,"name":"conv1.weight","scale":0.01,'
    b'"sha256":"0123456789abcdef"},{"dtype":"F16","kind":"dense","name":"conv1.bias","shape":[10]},{"dtype":"I64",'
    b'"kind":"dense","name":"bn1.num_batches_tracked","shape":[]},{"dtype":"F16","kind":"dense","name":'
    b'"bn1.running_mean","shape":[16]},{"dtype":"F16","kind":"dense","name":"bn1.running_var","shape":[16]},'
    b'{"dtype":"F16","kind":"dense","name":"fc.weight","shape":[10,64]},{"dtype":"F16","kind":"dense","name":'
    b'"layer1.0.conv1.basis","shape":[9,3,3]},{"code":1,"init":{"bound":0.1,"kind":"uniform"},"k":1,"kind":"masked",'
    b'"n":1,"name":"fc1.weight","sha256":"0123456789abcdef"}],"values":"F16","version":5}'
)


# --------------------------------------------------------------------------------------------------------------
# The schema section


def encode_schema(text: str) -> bytes:
    """The schema JSON text as raw deflate (level 9) with the preset dictionary."""
    coder = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zlib.Z_DEFAULT_STRATEGY, SCHEMA_DICTIONARY)
    return coder.compress(text.encode("utf-8")) + coder.flush()


def decode_schema(section) -> str:
    """The schema text of a schema section: at most MAX_HEADER_BYTES, the stream ending exactly at the section's end."""
    decoder = zlib.decompressobj(-15, zdict=SCHEMA_DICTIONARY)
    try:
        text = decoder.decompress(bytes(section), MAX_HEADER_BYTES)
        more = b"" if decoder.eof else decoder.decompress(decoder.unconsumed_tail, 1)
    except zlib.error as error:
        raise FormatError(f"the schema section is not a valid deflate stream ({error})") from None
    if more:
        raise FormatError(f"the schema decodes to more than {MAX_HEADER_BYTES:,} bytes")
    if not decoder.eof:
        raise FormatError("the schema section is truncated (its deflate stream does not end)")
    if decoder.unused_data:
        raise FormatError(f"{len(decoder.unused_data)} bytes after the end of the schema's deflate stream")
    try:
        return text.decode("utf-8")
    except UnicodeDecodeError as error:
        raise FormatError(f"the schema is not valid UTF-8 ({error.reason} at byte {error.start})") from None


# --------------------------------------------------------------------------------------------------------------
# Value streams: byte planes through LZMA2


def encode_stream(parts: list[tuple[bytes, int]]) -> bytes:
    """A value section for tensors given as (raw little-endian bytes, element size), in order."""
    planes = _byte_planes(parts)
    if not planes:
        return b""
    preset = 9 | lzma.PRESET_EXTREME if len(planes) < _EXTREME_BELOW else 6
    filters = [{"id": lzma.FILTER_LZMA2, "preset": preset, "dict_size": LZMA_DICT_BYTES, "lc": 0, "lp": 0, "pb": 0}]
    return lzma.compress(planes, format=lzma.FORMAT_RAW, filters=filters)


def decode_stream(section, sizes: list[tuple[int, int]], what: str) -> list[np.ndarray]:
    """The raw bytes (uint8 arrays) of the tensors of a value section, given their (element count, element size)
    in order; the stream must decode to exactly their total size and end at the section's end."""
    expected = sum(count * size for count, size in sizes)
    if expected == 0:
        if len(section):
            raise FormatError(f"the {what} section holds {len(section)} bytes but its tensors hold none")
        return [np.zeros(0, np.uint8) for _ in sizes]
    decoder = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=_DECODER_FILTERS)
    try:
        planes = decoder.decompress(bytes(section), max_length=expected)
    except lzma.LZMAError as error:
        raise FormatError(f"the {what} section is not a valid LZMA2 stream ({error})") from None
    if len(planes) < expected:
        raise FormatError(f"the {what} section decodes to {len(planes):,} bytes, its tensors hold {expected:,} "
                          "(truncated or corrupted)")
    if not decoder.eof:
        raise FormatError(f"the {what} section decodes to more than the {expected:,} bytes its tensors hold")
    if decoder.unused_data:
        raise FormatError(f"{len(decoder.unused_data)} bytes after the end of the {what} section's LZMA2 stream")
    return _from_planes(np.frombuffer(planes, np.uint8), sizes)


def _byte_planes(parts: list[tuple[bytes, int]]) -> bytes:
    """Plane j (j = 0 the most significant byte) of every tensor, tensors in order, for j = 0, 1, ..."""
    arrays = [(np.frombuffer(data, np.uint8).reshape(-1, size), size) for data, size in parts if len(data)]
    widest = max((size for _, size in arrays), default=0)
    return b"".join(array[:, size - 1 - j].tobytes() for j in range(widest) for array, size in arrays if size > j)


def _from_planes(planes: np.ndarray, sizes: list[tuple[int, int]]) -> list[np.ndarray]:
    """Inverse of ``_byte_planes``: each tensor's little-endian bytes from the planes."""
    outputs = [np.empty((count, size), np.uint8) for count, size in sizes]
    offset = 0
    for j in range(max((size for _, size in sizes), default=0)):
        for output, (count, size) in zip(outputs, sizes):
            if size > j and count:
                output[:, size - 1 - j] = planes[offset : offset + count]
                offset += count
    return [output.reshape(-1) for output in outputs]


# --------------------------------------------------------------------------------------------------------------
# The payload


def join_sections(sections: dict[str, bytes]) -> tuple[dict, bytes]:
    """The stub (``{"format", "version", "sections": [byte lengths]}``, without format and version) and the payload."""
    return {"sections": [len(sections[name]) for name in SECTIONS]}, b"".join(sections[name] for name in SECTIONS)


def split_sections(stub: dict, payload) -> dict[str, memoryview]:
    """The sections of a payload, checked against the stub's lengths."""
    lengths = stub.get("sections")
    if not (isinstance(lengths, list) and len(lengths) == len(SECTIONS)
            and all(type(n) is int and 0 <= n <= 2**48 for n in lengths)):
        raise FormatError(f"the stub's sections must be {len(SECTIONS)} byte lengths ({', '.join(SECTIONS)})")
    if sum(lengths) != len(payload):
        raise FormatError(f"the sections add up to {sum(lengths):,} bytes, the payload holds {len(payload):,}")
    view, offsets = memoryview(payload), np.cumsum([0, *lengths])
    return {name: view[offsets[i] : offsets[i + 1]] for i, name in enumerate(SECTIONS)}


def split_codes(section, lengths: list[int]) -> list[memoryview]:
    """The mask codes of the masks section, given their lengths (which the caller checked add up)."""
    view, offsets = memoryview(section), np.cumsum([0, *lengths]).tolist()
    return [view[offsets[i] : offsets[i + 1]] for i in range(len(lengths))]
