"""``oneshot``: score once at init, select, train one level under that fixed plan (SNIP, GraSP, SynFlow,
FreezeNet, COPS, magnitude, random, dense)."""
from __future__ import annotations

from compress.strategies import Strategy, register


@register("oneshot")
class OneShot(Strategy):
    description = "score once at initialisation, then train under that plan"
