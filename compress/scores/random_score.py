"""Random score: uniform noise from the portable generator (the sanity baseline)."""
from __future__ import annotations

from formats.rng import uniform
from compress.scores import SCORES


@SCORES.register("random")
def random_score(model, batches, params, context):
    """U[0, 1) per entry, keyed by (seed, "score/random/<name>") so it is the same on every machine."""
    shapes = dict(model.named_parameters())
    return {p: uniform(context.seed, f"score/random/{p}", shapes[p].shape, 0.5) + 0.5 for p in params}
