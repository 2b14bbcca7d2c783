"""The packed artifact format (SPEC.md): write, read, rebuild a plain ``torch.nn.Module``, report sizes.

``load(path)`` -> model in eval mode; ``load_state_dict(path)`` -> full state dict;
``read_info(path)`` -> the byte report, without rebuilding any weight. Reading never unpickles; any
file that is not a valid artifact (malformed, truncated, corrupted, too large, or missing) raises
``FormatError`` (a ``UserError``, so a ``ValueError``) and nothing else, at a cost bounded by the
file's size and the declared model's size (SPEC.md section 4). ``max_elements`` bounds the model a
loader rebuilds (default ``MAX_ELEMENTS`` = 2**28 entries, 1 GiB of float32).
"""
from __future__ import annotations

from pathlib import Path

import torch

from formats.artifact import (
    FORMAT_VERSION,
    MAX_ELEMENTS,
    Artifact,
    build_architecture,
    information_report,
    read_artifact,
    rebuild_state_dict,
)
from formats.errors import FormatError, UserError


def load_state_dict(path: str | Path, max_elements: int = MAX_ELEMENTS, factored: bool = False) -> dict[str, torch.Tensor]:
    """The rebuilt state dict of an artifact (frozen weights regenerated from the seed and hash-checked).

    Interspace layers come as plain convolution weights W = lam F, as in ``load``; ``factored=True``
    returns their stored coefficients and bases instead (bit-identical to the run's model.safetensors).
    """
    from compress.interspace import to_standard_state_dict

    artifact = read_artifact(path)
    state = rebuild_state_dict(artifact, max_elements=max_elements)
    layers = artifact.schema["architecture"].get("interspace", {}).get("layers", [])
    return state if factored or not layers else to_standard_state_dict(state, layers)


def load(path: str | Path, max_elements: int = MAX_ELEMENTS) -> torch.nn.Module:
    """The rebuilt model, in eval mode: plain parameters, no hooks, no mask buffers."""
    from compress.interspace import to_standard_state_dict

    artifact = read_artifact(path)
    state = rebuild_state_dict(artifact, max_elements=max_elements)
    layers = artifact.schema["architecture"].get("interspace", {}).get("layers", [])
    if layers:
        state = to_standard_state_dict(state, layers)
    model = build_architecture(artifact.schema["architecture"], device="meta")
    model.load_state_dict(state, strict=True, assign=True)
    leftover = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:  # tensors outside the state dict (non-persistent buffers): build them for real
        model = build_architecture(artifact.schema["architecture"])
        model.load_state_dict(state, strict=True)
    return model.eval()


def read_info(path: str | Path) -> dict:
    """Header, manifest and the byte-by-byte storage report, without rebuilding any weight."""
    return information_report(read_artifact(path))


def export_onnx(artifact: str | Path, path: str | Path, **options):
    """Export an artifact to ONNX, verified with onnxruntime (see ``formats.onnx_export.export_onnx``)."""
    from formats.onnx_export import export_onnx as _export

    return _export(artifact, path, **options)


__all__ = ["export_onnx", "FormatError", "UserError", "MAX_ELEMENTS", "FORMAT_VERSION", "Artifact", "load", "load_state_dict", "read_info", "read_artifact"]
