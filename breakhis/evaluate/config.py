"""What ``breakhis evaluate`` and ``breakhis protocol`` are asked to do: EvaluateOptions
(how to evaluate, shared by both) and EvaluateConfig (one model on one split)."""

from __future__ import annotations

from dataclasses import dataclass, field

from breakhis.data.split_spec import SplitSpec
from breakhis.score.predict_config import PredictOptions
from breakhis.stats.calibration import PATIENT_RULES
from breakhis.subtypes import TASKS


@dataclass(frozen=True)
class EvaluateOptions:
    """How to evaluate (shared by ``breakhis evaluate`` and ``breakhis protocol``)."""

    predict: PredictOptions = field(default_factory=PredictOptions)
    """How the model runs over the test tiles (breakhis.score.predict); its attribution is the map
    shown over the wrong predictions."""
    patient_rule: str = field(default="mean", metadata={"choices": PATIENT_RULES})
    """How a patient's tiles become one call (patient_accuracy): ``mean`` (mean probability
    >= threshold) or ``majority`` (at least half of the tiles called malignant). The
    paper's patient recognition rate is reported whatever the rule."""
    cross_magnification: bool = True
    """Also run a model trained at one magnification on the other magnifications."""
    bootstrap: int = 1000
    """Patient resamples for the confidence intervals."""
    confidence: float = 0.95
    """Level of the bootstrap intervals."""
    seed: int = 0
    """Seed of the bootstrap and of the choice of correct examples shown."""
    correct_examples: int = 16
    """Correct predictions shown in the report's grid (half per class when possible)."""
    thumbnail_size: int = 160
    """Side in pixels of the tiles shown in the report."""

    def __post_init__(self) -> None:
        if self.patient_rule not in PATIENT_RULES:
            raise ValueError(
                f"--patient-rule {self.patient_rule!r}; accepted: {', '.join(PATIENT_RULES)}"
            )
        if self.bootstrap < 1:
            raise ValueError(f"--bootstrap must be >= 1, got {self.bootstrap}")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"--confidence must be in (0, 1), got {self.confidence}")
        if self.correct_examples < 0:
            raise ValueError(f"--correct-examples must be >= 0, got {self.correct_examples}")
        if not 16 <= self.thumbnail_size <= 1024:
            raise ValueError(f"--thumbnail-size must be in 16..1024, got {self.thumbnail_size}")

    @property
    def method(self) -> str | None:
        """The canonical attribution method, or None for ``none``."""
        return self.predict.method


@dataclass(frozen=True)
class EvaluateConfig:
    """Options of ``breakhis evaluate``."""

    model: str
    """Model artifact directory (local or s3://), as written by the training job."""
    data: str
    """Prepared data root (``breakhis prepare`` DEST)."""
    out: str | None
    """Report folder (local or s3://); None computes the result without writing files."""
    split: str | None = None
    """``fold:K``, ``rep:K`` or ``column:NAME`` of DEST's manifest; None: the split the model
    was trained on."""
    options: EvaluateOptions = field(default_factory=EvaluateOptions)
    """How to evaluate."""
    task: str | None = field(default=None, metadata={"choices": TASKS})
    """``binary``: benign vs malignant metrics only; ``subtype``: also the eight-subtype
    metrics (confusion matrix, per-class recall, balanced accuracy), which need a model
    trained with ``--task subtype``; default (none): the model's own task. A subtype
    model's binary metrics come from P(malignant), the sum of its malignant four."""

    def __post_init__(self) -> None:
        for name in ("model", "data"):
            if not getattr(self, name):
                raise ValueError(f"--{name} is required")
        if self.task is not None and self.task not in TASKS:
            raise ValueError(f"--task {self.task!r} unknown; accepted: {', '.join(TASKS)}")
        if self.split is not None:
            SplitSpec.parse(self.split)

    def check_out(self) -> None:
        """Raises ValueError when the report folder ``--out`` is a file."""
        from breakhis import storage

        if self.out and storage.is_file(self.out):
            raise ValueError(f"--out {self.out} is a file; give a folder for the report")

    def check_inputs(self) -> None:
        """What run_evaluation checks first that needs no torch and no Ray: ``--out``, the
        model's card (not its weights), the manifest and the split (leakage within it; the
        leakage against the model's own patients is checked by the job). Raises as
        run_evaluation does."""
        from breakhis.data.dest import PreparedDest
        from breakhis.model.card import read_card

        self.check_out()
        card = read_card(self.model)
        PreparedDest.open(self.data).split(SplitSpec.parse(self.split or card.split))
