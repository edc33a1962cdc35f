"""The colours of attribution maps: one diverging, perceptually uniform colour map for the
scoring job's overlays and the evaluation report (breakhis.score.attribution, breakhis.evaluate.figures)."""

from __future__ import annotations

DIVERGING_MAPS: tuple[str, ...] = ("berlin", "managua", "vanimo", "coolwarm")
"""Colour maps for signed attribution maps, in order of preference: matplotlib's
perceptually uniform diverging maps (3.10 and later: lightness changes evenly from the
middle to either end, so equal steps of evidence look equal; ``berlin`` is blue against,
red for the explained class), then ``coolwarm`` (diverging, close to uniform) on an older
matplotlib."""


def map_colours() -> str:
    """The name of the diverging colour map the overlays and the report use: the first of
    DIVERGING_MAPS this matplotlib has."""
    from matplotlib import colormaps

    return next(name for name in DIVERGING_MAPS if name in colormaps)
