"""ExportConfig: the options of ``breakhis export`` (breakhis.model.export runs it). No torch
here: the command's ``--help`` reads it."""

from __future__ import annotations

from dataclasses import dataclass, field

FORMATS: tuple[str, ...] = ("torchscript", "onnx")
"""Accepted values of --format."""


@dataclass(frozen=True)
class ExportConfig:
    """Options of the export job."""

    model: str
    """Model artifact directory (local or s3://) written by training (breakhis.model.artifact)."""
    format: str = field(default="onnx", metadata={"choices": FORMATS})
    """``torchscript`` or ``onnx``."""
    out: str | None = None
    """Folder (local or s3://) for the exported model and its contract; default: the
    artifact's own folder."""
    task: str | None = field(default=None, metadata={"choices": ("binary", "subtype")})
    """``subtype``: the graph outputs the eight subtype probabilities (a model trained with
    ``--task subtype``); ``binary``: benign and malignant only (a subtype model's reduced to
    P(benign), P(malignant), the sums of its four and four); default (none): the model's
    own task. The contract names the classes either way."""

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("--model is required: the model artifact folder")
        if self.format not in FORMATS:
            raise ValueError(f"--format {self.format!r} unknown; accepted: {', '.join(FORMATS)}")
        if self.task not in ("binary", "subtype", None):
            raise ValueError(f"--task {self.task!r} unknown; accepted: binary, subtype")

    @property
    def out_uri(self) -> str:
        """Where the files go: ``out``, else the artifact's folder."""
        return self.out or self.model
