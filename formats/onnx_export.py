"""Export a packed artifact to ONNX, verified against the PyTorch model with onnxruntime.

The rebuilt model is a plain convolutional network, so the export is a standard dense graph that
runs in any ONNX runtime at the cost of the original. Options:

* ``fp16``: initializers stored as float16, each followed by a ``Cast`` to float32, so the file
  halves while the arithmetic stays float32 (the reference for verification is the PyTorch model
  with the same fp16-rounded weights);
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
TOLERANCE = 1e-4
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


def _round_to_fp16(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())
    return model


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


def _verify(path: Path, model: torch.nn.Module, input_shape: tuple[int, ...]) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for batch in VERIFY_BATCHES:
        inputs = torch.randn((batch, *input_shape), generator=generator)
        with torch.no_grad():
            expected = model(inputs).numpy()
        (got,) = session.run(None, {"input": inputs.numpy()})
        if got.shape != expected.shape:
            raise ExportError(f"onnxruntime output shape {got.shape} differs from torch's {expected.shape}")
        worst = max(worst, float(np.max(np.abs(got - expected))) if got.size else 0.0)
    return worst


def export_onnx(
    artifact: str | os.PathLike,
    path: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    fp16: bool = False,
    sparse_initializers: bool = False,
    verify: bool = True,
    tolerance: float = TOLERANCE,
) -> ExportReport:
    """Export ``artifact`` to the ONNX file ``path`` (dynamic batch dimension), verified by default.

    Verification runs ``onnx.checker`` with the full check, then random inputs of batch 1 and 7
    through onnxruntime and through ``formats.load(artifact)``; above ``tolerance`` the export
    raises ``ExportError`` and leaves no file.
    """
    import onnx

    import formats

    path = Path(path)
    if isinstance(opset, bool) or not isinstance(opset, int) or not 9 <= opset <= onnx.defs.onnx_opset_version():
        raise ValueError(f"opset must be an integer from 9 to {onnx.defs.onnx_opset_version()}, got {opset!r}")
    if path.is_dir():
        raise ValueError(f"output {path} is a directory; give a file name such as {path / 'model.onnx'}")
    if not path.parent.is_dir():
        raise ValueError(f"cannot write {path}: directory {path.parent} does not exist")
    info = formats.read_info(artifact)
    model = formats.load(artifact)
    if fp16:
        _round_to_fp16(model)
    input_shape = tuple(info["schema"]["architecture"]["input_shape"])
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (torch.zeros((1, *input_shape)),), str(tmp), dynamo=False, opset_version=opset,
                input_names=["input"], output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            )
        proto = onnx.load(str(tmp))
        moved = _rewrite_initializers(proto.graph, fp16, sparse_initializers)
        manifest = info["schema"]["manifest"]
        metadata = {"compress.architecture": json.dumps(info["schema"]["architecture"], sort_keys=True),
                    "compress.method": str(manifest.get("method")), "compress.mode": info["schema"]["mode"],
                    "compress.density": str(info["totals"]["density"])}
        for key in ("mean", "std"):
            if key in manifest.get("normalization", {}):
                metadata[f"compress.{key}"] = ",".join(repr(float(v)) for v in manifest["normalization"][key])
        for key, value in metadata.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(proto, str(tmp))
        difference = None
        if verify:
            onnx.checker.check_model(str(tmp), full_check=True)
            difference = _verify(tmp, model, input_shape)
            if not difference <= tolerance:
                raise ExportError(f"onnxruntime and torch outputs differ by {difference:.3g} > {tolerance:g}; "
                                  "the export was removed")
        os.replace(tmp, path)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise ExportError(f"onnx.checker rejected the graph: {str(error).splitlines()[0]}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return ExportReport(str(path), path.stat().st_size, info["totals"]["file_bytes"],
                        info["totals"]["dense_fp32_bytes"], difference, moved, opset, fp16)
