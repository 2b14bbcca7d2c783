"""Export a packed artifact to ONNX, verified against the PyTorch model with onnxruntime.

The rebuilt model is a plain convolutional network, so the export is a standard dense graph that
runs in any ONNX runtime at the cost of the original. Options:

* ``fp16``: initializers stored as float16, each followed by a ``Cast`` to float32, so the file
  halves while the arithmetic stays float32. The exporter folds BatchNorm into the convolutions
  before the weights are rounded, so no PyTorch model has the same weights; the fp32 graph is
  verified against PyTorch (1e-4) and the fp16 graph against the fp32 graph, with a tolerance
  relative to the size of the outputs (``FP16_TOLERANCE``: fp16 keeps 11 significant bits, a relative
  error of at most 4.9e-4 per weight, which grows with depth);
* ``sparse_initializers``: weights with many zeros stored in COO form (values and int64 linear
  indices, as ONNX sparse tensors in ``Constant`` nodes), only where that makes the file smaller;
  onnxruntime densifies them at load, so this shrinks the file, not the memory or the latency.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DEFAULT_OPSET = 17
TOLERANCE = 1e-4  # largest |onnxruntime - torch| output difference, relative to max(1, largest |output|)
FP16_TOLERANCE = 1e-2  # largest |fp16 graph - fp32 graph| output difference, relative likewise
VERIFY_BATCHES = (1, 7)


class ExportError(RuntimeError):
    """The exported graph failed verification (checker or output mismatch); no file is left behind."""


@dataclass
class ExportReport:
    path: str
    onnx_bytes: int
    artifact_bytes: int
    dense_fp32_bytes: int
    max_abs_diff: float | None
    sparse_initializers: list[str]
    opset: int
    fp16: bool

    def text(self) -> str:
        lines = [f"wrote {self.path} (opset {self.opset}{', fp16 weights' if self.fp16 else ''})"]
        if self.max_abs_diff is not None:
            lines.append(f"verified: onnx.checker (full) passed; largest |onnxruntime - torch| = {self.max_abs_diff:.3g} "
                         f"on random inputs of batch {' and '.join(map(str, VERIFY_BATCHES))}")
        if self.sparse_initializers:
            lines.append(f"{len(self.sparse_initializers)} weights stored as COO sparse tensors; note that "
                         "onnxruntime densifies them at load: they shrink the file, not memory or latency")
        lines += [
            f"onnx file       : {self.onnx_bytes:>12,} B",
            f"packed artifact : {self.artifact_bytes:>12,} B",
            f"dense fp32      : {self.dense_fp32_bytes:>12,} B (safetensors)",
        ]
        return "\n".join(lines)


def _rewrite_initializers(graph, fp16: bool, sparse: bool) -> list[str]:
    """Store float initializers as float16 (plus a Cast to float32) and/or as COO sparse constants.

    A sparse weight becomes a ``Constant`` node whose ``sparse_value`` holds the nonzero values and
    their int64 linear indices; graph-level ``sparse_initializer`` entries that feed dense operators
    fail ONNX's full check (shape inference types them as sparse tensors), a Constant does not.
    Only weights whose COO form is smaller than their dense form are converted.
    """
    from onnx import TensorProto, helper, numpy_helper

    moved, new_nodes = [], []
    for initializer in list(graph.initializer):
        if initializer.data_type != TensorProto.FLOAT:
            continue
        name = initializer.name
        array = numpy_helper.to_array(initializer)
        if fp16:
            array = array.astype(np.float16)
        stored = f"{name}__fp16" if fp16 else name
        flat = array.reshape(-1)
        nonzero = np.flatnonzero(flat)
        if sparse and array.ndim >= 2 and nonzero.size * (flat.itemsize + 8) < flat.size * flat.itemsize:
            values = numpy_helper.from_array(flat[nonzero], f"{stored}__values")
            indices = numpy_helper.from_array(nonzero.astype(np.int64), f"{stored}__indices")
            coo = helper.make_sparse_tensor(values, indices, list(array.shape))
            new_nodes.append(helper.make_node("Constant", [], [stored], sparse_value=coo, name=f"sparse_{name}"))
            graph.initializer.remove(initializer)
            moved.append(name)
        elif fp16:
            initializer.CopyFrom(numpy_helper.from_array(array, stored))
        if fp16:
            new_nodes.append(helper.make_node("Cast", [stored], [name], to=TensorProto.FLOAT, name=f"cast_{name}"))
    for node in reversed(new_nodes):
        graph.node.insert(0, node)
    return moved


def _run(model_bytes: bytes, inputs: list[np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return [session.run(None, {"input": x})[0] for x in inputs]


def _largest_difference(got: list[np.ndarray], expected: list[np.ndarray]) -> float:
    worst = 0.0
    for a, b in zip(got, expected):
        if a.shape != b.shape:
            raise ExportError(f"onnxruntime output shape {a.shape} differs from the reference's {b.shape}")
        worst = max(worst, float(np.max(np.abs(a - b))) if a.size else 0.0)
    return worst


def _verify(final: bytes, fp32: bytes, model: torch.nn.Module, input_shape: tuple[int, ...], fp16: bool,
            tolerance: float) -> float:
    """Check the graphs and compare outputs on random inputs; returns the difference of the final graph.

    The fp32 graph must match PyTorch within ``tolerance``; an fp16 graph must match the fp32 graph
    within ``FP16_TOLERANCE``; both relative to max(1, largest |output|), since float arithmetic errors
    scale with the values. Raises ``ExportError`` otherwise.
    """
    import onnx

    for blob in {final, fp32}:
        onnx.checker.check_model(onnx.load_from_string(blob), full_check=True)
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn((batch, *input_shape), generator=generator) for batch in VERIFY_BATCHES]
    with torch.no_grad():
        expected = [model(x).numpy() for x in inputs]
    arrays = [x.numpy() for x in inputs]
    scale = max([1.0] + [float(np.max(np.abs(o))) for o in expected if o.size])
    fp32_outputs = _run(fp32, arrays)
    difference = _within(_largest_difference(fp32_outputs, expected), tolerance * scale, "onnxruntime and torch outputs")
    if final is fp32:
        return difference
    if not fp16:  # sparse initializers only: exact values, the same tolerance against torch
        return _within(_largest_difference(_run(final, arrays), expected), tolerance * scale,
                       "onnxruntime and torch outputs")
    return _within(_largest_difference(_run(final, arrays), fp32_outputs), FP16_TOLERANCE * scale,
                   "the fp16 graph's outputs and the fp32 graph's")


def _within(difference: float, tolerance: float, what: str) -> float:
    if not difference <= tolerance:
        raise ExportError(f"{what} differ by {difference:.3g} > {tolerance:.3g}; nothing was written")
    return difference


def export_onnx(
    artifact: str | os.PathLike,
    path: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    fp16: bool = False,
    sparse_initializers: bool = False,
    verify: bool = True,
    tolerance: float = TOLERANCE,
    force: bool = False,
) -> ExportReport:
    """Export ``artifact`` to the ONNX file ``path`` (dynamic batch dimension), verified by default.

    Verification runs ``onnx.checker`` with the full check, then random inputs of batch 1 and 7
    through onnxruntime and through ``formats.load(artifact)``; above ``tolerance`` (fp32) or
    ``FP16_TOLERANCE`` (fp16, against the fp32 graph), both times max(1, largest |output|), the export raises ``ExportError`` and
    writes nothing. The file is written atomically; an existing ``path`` is replaced only with ``force``.
    """
    import onnx

    import formats
    from formats.atomic import check_output_file, write_atomic
    from formats.errors import UserError

    path = Path(path)
    if isinstance(opset, bool) or not isinstance(opset, int) or not 9 <= opset <= onnx.defs.onnx_opset_version():
        raise UserError(f"opset must be an integer from 9 to {onnx.defs.onnx_opset_version()}, got {opset!r}")
    check_output_file(path, force, "model.onnx")
    info = formats.read_info(artifact)
    model = formats.load(artifact)
    input_shape = tuple(info["schema"]["architecture"]["input_shape"])
    with tempfile.TemporaryDirectory(prefix="compress-export-") as scratch:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (torch.zeros((1, *input_shape)),), os.path.join(scratch, "model.onnx"), dynamo=False,
                opset_version=opset, input_names=["input"], output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            )
        proto = onnx.load(os.path.join(scratch, "model.onnx"))
    manifest = info["schema"]["manifest"]
    metadata = {"compress.architecture": json.dumps(info["schema"]["architecture"], sort_keys=True),
                "compress.method": str(manifest.get("method")), "compress.mode": info["schema"]["mode"],
                "compress.density": str(info["totals"]["density"])}
    for key in ("mean", "std"):
        if key in manifest.get("normalization", {}):
            metadata[f"compress.{key}"] = ",".join(repr(float(v)) for v in manifest["normalization"][key])
    if isinstance(manifest.get("class_names"), list):
        metadata["compress.class_names"] = json.dumps([str(name) for name in manifest["class_names"]])
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    fp32 = proto.SerializeToString()
    moved = _rewrite_initializers(proto.graph, fp16, sparse_initializers)
    final = proto.SerializeToString() if (fp16 or moved) else fp32
    difference = None
    if verify:
        try:
            difference = _verify(final, fp32, model, input_shape, fp16, tolerance)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
            raise ExportError(f"onnx.checker rejected the graph: {str(error).splitlines()[0]}") from None
    write_atomic(path, final, overwrite=force)
    return ExportReport(str(path), len(final), info["totals"]["file_bytes"],
                        info["totals"]["dense_fp32_bytes"], difference, moved, opset, fp16)
