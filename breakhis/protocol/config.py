"""ProtocolConfig: the options of ``breakhis protocol`` (breakhis.protocol.job runs it). No torch
or Ray here: the command's ``--help`` reads it."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from breakhis import storage
from breakhis.data.split_spec import SCHEMES, check_column_name
from breakhis.evaluate.config import EvaluateOptions
from breakhis.names import MAGNIFICATIONS
from breakhis.train.config import TrainConfig

PER_MAGNIFICATION: tuple[int | None, ...] = (None, *MAGNIFICATIONS)
"""Every accepted ``magnifications`` value (``--magnifications all,40,100,200,400``): the
magnification-independent model and one per magnification."""
REPORT_DIR = "report"
_DEFAULT_SPLIT = next(f.default for f in fields(TrainConfig) if f.name == "split")


@dataclass(frozen=True)
class ProtocolConfig:
    """Options of ``breakhis protocol``."""

    train: TrainConfig
    """Training options of every run. Its ``data``, ``storage`` and ``name`` are the
    protocol's: runs live at STORAGE/NAME/<split>-<magnification>. Its ``split`` and
    ``magnification`` are set per run (leave them at their defaults)."""
    scheme: str = field(default="rep", metadata={"choices": SCHEMES})
    """``rep``: the paper's random 70/30 patient splits; ``fold``: k-fold by patient;
    ``column``: user-defined splits, manifest columns of train/val/test (see ``columns``)."""
    splits: tuple[int, ...] = ()
    """Split indices to run (``rep`` and ``fold``); empty: every split of the scheme in the
    manifest."""
    columns: tuple[str, ...] = ()
    """With ``--scheme column``: the manifest's split columns to run, each as the split
    ``column:NAME``; empty: every column ``breakhis prepare --split-file`` added."""
    magnifications: tuple[int | None, ...] = field(
        default=(None,), metadata={"choices": PER_MAGNIFICATION}
    )
    """Models per split, comma-separated: ``all`` (None) is the magnification-independent
    model, 40..400 a model trained at that magnification only (``all,40,100,200,400``: all
    five)."""
    evaluation: EvaluateOptions = field(default_factory=EvaluateOptions)
    """How each run is evaluated."""
    max_concurrent: int = 0
    """Runs at a time; 0: as many as the cluster's CPUs/GPUs hold (see the module doc)."""
    out: str | None = None
    """Protocol report folder; None: STORAGE/NAME/report."""

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"--scheme {self.scheme!r}; accepted: {', '.join(SCHEMES)}")
        if any(i < 0 for i in self.splits) or len(set(self.splits)) != len(self.splits):
            raise ValueError(f"--splits {list(self.splits)}: expected distinct indices >= 0")
        if self.scheme == "column" and self.splits:
            raise ValueError(
                "--splits picks rep or fold splits; with --scheme column use --columns"
            )
        if self.scheme != "column" and self.columns:
            raise ValueError(f"--columns {','.join(self.columns)} needs --scheme column")
        for name in self.columns:
            check_column_name(name, what="--columns")
        if len(set(self.columns)) != len(self.columns):
            raise ValueError(f"--columns {','.join(self.columns)} repeat a column")
        if self.train.split != _DEFAULT_SPLIT:
            raise ValueError(
                f"--split {self.train.split}: the protocol sets each run's split; use --scheme "
                "rep|fold with --splits K,..., or --scheme column with --columns NAME,..."
            )
        given = ",".join("all" if m is None else str(m) for m in self.magnifications)
        if not self.magnifications:
            raise ValueError("--magnifications: give at least one (all: every magnification)")
        for mag in self.magnifications:
            if mag is not None and mag not in MAGNIFICATIONS:
                raise ValueError(
                    f"--magnifications {given}: {mag} not accepted; accepted: all, "
                    f"{', '.join(map(str, MAGNIFICATIONS))}"
                )
        if len(set(self.magnifications)) != len(self.magnifications):
            raise ValueError(f"--magnifications {given} repeats a value")
        if self.train.magnification is not None:
            raise ValueError(
                "the protocol sets each run's magnification: leave --magnification unset and "
                "use --magnifications (e.g. all,40,100,200,400: one model per magnification "
                "and one for all)"
            )
        if self.max_concurrent < 0:
            raise ValueError(f"--max-concurrent must be >= 0, got {self.max_concurrent}")

    @property
    def root(self) -> str:
        """STORAGE/NAME: where the runs and the report live."""
        return self.train.run_uri

    @property
    def report_dir(self) -> str:
        return self.out or storage.join(self.root, REPORT_DIR)
