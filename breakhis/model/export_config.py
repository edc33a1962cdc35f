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

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("--model is required: the model artifact folder")
        if self.format not in FORMATS:
            raise ValueError(f"--format {self.format!r} unknown; accepted: {', '.join(FORMATS)}")

    @property
    def out_uri(self) -> str:
        """Where the files go: ``out``, else the artifact's folder."""
        return self.out or self.model
