"""Magnitude score |theta|: keep the largest weights at initialisation."""
from __future__ import annotations

from compress.scores import SCORES, parameters_by_name


@SCORES.register("magnitude")
def magnitude_score(model, batches, params, context):
    """|theta| of each compressible parameter."""
    return {p: w.detach().abs() for p, w in zip(params, parameters_by_name(model, params))}
