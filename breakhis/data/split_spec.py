"""What a split is called: SplitSpec (``fold:K``, ``rep:K`` or ``column:NAME``, with the
share of training patients held out for validation), parsed and checked without reading any
data. breakhis.data.splits selects a split's patients from a manifest."""

from __future__ import annotations

import re
from dataclasses import dataclass

SCHEMES = ("fold", "rep", "column")
SIDES = ("train", "val", "test")
"""The values of a user-defined split column."""
COLUMN_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")
"""Names accepted for a user-defined split column (they also name protocol run folders)."""


@dataclass(frozen=True)
class SplitSpec:
    """Which split of a prepared data set a job uses.

    scheme: "fold" (k-fold by patient), "rep" (the paper's 70/30 repetitions) or
        "column" (a user-defined manifest column of train/val/test).
    index: the fold or repetition number (0 with "column").
    val_fraction: share of the training patients held out for validation when the split
        names none itself (a column without ``val`` rows); 0: no validation patients at
        all (a column's ``val`` patients then train too, as a refit wants).
    seed: seed for carving the validation patients.
    column: with "column", the manifest column that holds each image's side.
    """

    scheme: str = "fold"
    index: int = 0
    val_fraction: float = 0.0
    seed: int = 0
    column: str | None = None

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(
                f"split scheme {self.scheme!r} unknown; accepted: {', '.join(SCHEMES)}"
            )
        if self.index < 0:
            raise ValueError(f"split index must be >= 0, got {self.index}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.scheme == "column":
            check_column_name(self.column or "", what="split column:NAME")
            if self.index:
                raise ValueError(f"split column:{self.column} has no index, got {self.index}")
        elif self.column is not None:
            raise ValueError(f"split {self.scheme}:{self.index} takes no column name")

    @classmethod
    def parse(cls, text: str, *, val_fraction: float = 0.0, seed: int = 0) -> SplitSpec:
        """Parse ``fold:K``, ``rep:K`` or ``column:NAME``. Raises ValueError saying what is
        accepted."""
        scheme, _, index = text.partition(":")
        if scheme == "column":
            return cls(scheme=scheme, column=index, val_fraction=val_fraction, seed=seed)
        if not index.isdigit():
            raise ValueError(
                f"split {text!r}: expected fold:K or rep:K (a split prepare wrote) or "
                "column:NAME (a manifest column of train/val/test), e.g. fold:0"
            )
        return cls(scheme=scheme, index=int(index), val_fraction=val_fraction, seed=seed)

    def __str__(self) -> str:
        if self.scheme == "column":
            return f"column:{self.column}"
        return f"{self.scheme}:{self.index}"


def check_column_name(name: str, *, what: str) -> None:
    """Raise ValueError unless ``name`` can name a user-defined split column."""
    if not COLUMN_NAME.fullmatch(name):
        raise ValueError(
            f"{what}: column name {name!r}: use a letter, then letters, digits and . _ - "
            "(e.g. heldout)"
        )
