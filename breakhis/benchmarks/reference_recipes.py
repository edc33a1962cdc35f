"""The reference loop's recipes by name and the options it shares with the job, without
torch: the accuracy benchmark's config checks them and ``--help`` lists them
(breakhis.benchmarks.reference_loop trains with them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    """How a reference loop trains (module docstring)."""

    keep_aspect: bool
    """Resize to height S keeping the aspect ratio, then crop S x S (random for training,
    the centre for the test); otherwise squash the tile to S x S."""
    quarter_turns: bool
    """Turn each training crop by a random multiple of 90 degrees."""
    class_weighted: bool
    """Weight the cross-entropy by inverse class frequency, n / (2 n_c)."""
    weight_decay: float
    """AdamW's weight decay."""
    one_cycle: bool
    """OneCycleLR over all steps (peak: the lr); otherwise a constant lr."""


RECIPES: dict[str, Recipe] = {
    "strong": Recipe(
        keep_aspect=True, quarter_turns=True, class_weighted=True, weight_decay=1e-4, one_cycle=True
    ),
    "notebook": Recipe(
        keep_aspect=False,
        quarter_turns=False,
        class_weighted=False,
        weight_decay=0.01,  # torch's default
        one_cycle=False,
    ),
}
"""Reference recipes by name; ``strong`` is the benchmark's default."""


@dataclass(frozen=True)
class ReferenceOptions:
    """What the reference shares with the job it is compared with."""

    arch: str
    image_size: int
    epochs: int
    batch_size: int
    lr: float
    seed: int


def check_recipe(name: str) -> Recipe:
    """The recipe called ``name``. Raises ValueError naming the accepted ones."""
    if name not in RECIPES:
        raise ValueError(
            f"--reference {name}: unknown reference loop; accepted: {', '.join(RECIPES)}"
        )
    return RECIPES[name]
