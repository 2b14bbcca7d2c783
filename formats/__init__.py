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
    skeleton_differences,
)
from formats.errors import FormatError, UserError


def load_state_dict(path: str | Path, max_elements: int = MAX_ELEMENTS, factored: bool = False,
                    model: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The rebuilt state dict of an artifact (frozen weights regenerated from the seed and hash-checked).

    Interspace layers come as plain convolution weights W = lam F, as in ``load``; ``factored=True``
    returns their stored coefficients and bases instead (bit-identical to the run's model.safetensors).
    ``model``: a fresh instance of the architecture, checked against the artifact (see ``load``).
    """
    from formats.interspace import to_standard_state_dict

    artifact = read_artifact(path)
    _check_skeleton(artifact, model)
    state = rebuild_state_dict(artifact, model=model, max_elements=max_elements)
    layers = artifact.schema["architecture"].get("interspace", {}).get("layers", [])
    return state if factored or not layers else to_standard_state_dict(state, layers)


def load(path: str | Path, max_elements: int = MAX_ELEMENTS, model: torch.nn.Module | None = None) -> torch.nn.Module:
    """The rebuilt model, in eval mode: plain parameters, no hooks, no mask buffers.

    Models of ``formats.models`` (and ``tv:`` torchvision models) are built from the artifact. A model of
    your own (packed by ``compress.save``) is filled into ``model``, a fresh instance you construct: its
    state dict must have exactly the artifact's tensor names, shapes and dtypes, else one ``UserError``
    lists every difference. ``model`` may be given for any artifact without interspace layers.
    """
    from formats.interspace import to_standard_state_dict

    artifact = read_artifact(path)
    if model is not None:
        _check_skeleton(artifact, model)
        state = rebuild_state_dict(artifact, model=model, max_elements=max_elements)
        model.load_state_dict(state, strict=True)
        return model.eval()
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


def _check_skeleton(artifact: Artifact, model: torch.nn.Module | None) -> None:
    if model is None:
        return
    if not isinstance(model, torch.nn.Module):
        raise UserError(f"model= must be a torch.nn.Module (a fresh instance of the packed architecture), got "
                        f"{type(model).__name__}")
    problems = skeleton_differences(artifact, model)
    if problems:
        shown = "; ".join(problems[:12]) + (f"; and {len(problems) - 12} more" if len(problems) > 12 else "")
        raise UserError(f"the model does not fit the artifact ({len(problems)} difference(s): {shown}); build the "
                        "model the artifact was packed from")


def read_info(path: str | Path) -> dict:
    """Header, manifest and the byte-by-byte storage report, without rebuilding any weight."""
    return information_report(read_artifact(path))


def export_onnx(artifact: str | Path, path: str | Path, **options):
    """Export an artifact to ONNX, verified with onnxruntime (see ``formats.onnx_export.export_onnx``)."""
    from formats.onnx_export import export_onnx as _export

    return _export(artifact, path, **options)


__all__ = ["export_onnx", "FormatError", "UserError", "MAX_ELEMENTS", "FORMAT_VERSION", "Artifact", "load", "load_state_dict", "read_info", "read_artifact"]
