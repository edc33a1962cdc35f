"""A model other tools can run: TorchScript or ONNX, with its preprocessing contract.

    breakhis export --model s3://bucket/runs/rn50-fold0/model --format onnx
    breakhis export --model runs/rn50-fold0/model --format torchscript --out exported/

writes ``model.onnx`` (or ``model.torchscript.pt``) and its contract
``model.onnx.json`` (``model.torchscript.json``) beside the artifact's
``model.pt``, or into ``--out``.

The exported graph does what scoring does to a decoded tile, so a caller only
decodes and resizes:

- input ``image``: uint8 RGB, (N, 3, H, W): the model's evaluation view of the tile
  (breakhis.data.geometry; aspect kept: S x round(S * 700 / 460), or its centre S x S crop;
  models trained before 2026-12-07: the whole tile squashed to S x S). The contract's
  ``input.resize`` says which; ``card.tile_geometry.eval_pixels(decode_rgb(data))``
  then a transpose to channels first gives exactly the job's pixels;
- inside: the model's stain normalisation when it has one (breakhis.data.stain, fitted when it
  was trained; breakhis.model.stain_graph), scale to [0, 1], subtract ``mean`` and divide by
  ``std`` per channel, the network, then ``softmax(logits / temperature)``;
- outputs ``probabilities`` (N, classes; column ``class_names.index("malignant")``
  is the job's ``prob``, a tile is called malignant at or above ``threshold``) and
  ``logits`` (N, classes; before the temperature, for whoever calibrates anew).

A subtype model (``--task subtype``) outputs its eight classes, named in the contract's
``class_names`` (benign four then malignant four); the job's ``prob`` (P(malignant)) is the
sum of the columns the contract lists in ``malignant_classes``. Exported with ``--task
binary`` it outputs two columns, benign and malignant: the sums of its probabilities over
the benign and the malignant four, and as logits the logsumexp of each four (before the
temperature).

Normalisation and temperature are in the graph rather than left to the caller:
a caller who forgets the temperature still gets numbers in [0, 1] that look
right and are not the job's. The contract lists them all the same (with
``applied_in_graph: true``), so the graph can be checked against it.
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from breakhis import storage
from breakhis.data.transforms import normalize
from breakhis.model.artifact import ModelCard, load_artifact
from breakhis.model.export_config import ExportConfig
from breakhis.model.stain_graph import stain_graph

log = logging.getLogger(__name__)

FILE_NAMES: dict[str, str] = {"torchscript": "model.torchscript.pt", "onnx": "model.onnx"}
"""The exported model's file name per format (the contract is the same name, ``.json``)."""
INPUT_NAME = "image"
OUTPUT_NAMES: tuple[str, ...] = ("probabilities", "logits")
CONTRACT_VERSION = 1
ONNX_OPSET = 18


class ProbabilityModel(nn.Module):
    """A classifier with the scoring job's preprocessing and calibration inside.

    ``forward(image)``: uint8 RGB (N, 3, S, S) -> ``(probabilities, logits)``, both
    float32 (N, classes), probabilities = softmax(logits / temperature).
    """

    def __init__(
        self, net: nn.Module, card: ModelCard, *, script_stain: bool = True, binary: bool = False
    ) -> None:
        super().__init__()
        self.net = net
        stain = card.stain_normalizer
        # Macenko's port is TorchScript (scripted: data-dependent steps); the others trace.
        self.stain = None if stain is None else stain_graph(stain, script=script_stain)
        self.mean = tuple(card.mean)
        self.std = tuple(card.std)
        self.temperature = float(card.temperature)
        # A subtype model reduced to benign/malignant (--task binary): sums of its classes.
        self.reduce = binary and card.task == "subtype"
        malignant = card.malignant_indices
        self.malignant = malignant
        self.benign = [i for i in range(card.num_classes) if i not in malignant]

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.stain is not None:
            image = self.stain(image)
        # The normalisation training and scoring use, so the graph sees the jobs' pixels.
        x = normalize(image, self.mean, self.std)
        logits = self.net(x).float()
        probabilities = torch.softmax(logits / self.temperature, dim=1)
        if not self.reduce:
            return probabilities, logits
        sides = (self.benign, self.malignant)
        reduced = torch.stack([probabilities[:, side].sum(dim=1) for side in sides], dim=1)
        side_logits = torch.stack([torch.logsumexp(logits[:, side], dim=1) for side in sides], 1)
        return reduced, side_logits


def contract(
    card: ModelCard, *, file_name: str, format: str, source: str, task: str | None = None
) -> dict[str, Any]:
    """The preprocessing contract of an exported model (JSON-ready): input, outputs,
    normalisation, class names, temperature and threshold, and where it came from; for a
    subtype model (``task`` its own) also the task and which classes are malignant, and
    exported as ``binary`` the two classes its outputs were reduced to."""
    terms = _contract(card, file_name=file_name, format=format, source=source)
    task = task or card.task
    if card.task != "subtype":
        return terms
    from breakhis.names import CLASS_NAMES

    if task == "binary":
        terms["task"] = "binary"
        terms["class_names"] = list(CLASS_NAMES)
        terms["reduced_from"] = {
            "class_names": list(card.class_names),
            "malignant_classes": [card.class_names[i] for i in card.malignant_indices],
            "probabilities": "the sums of softmax(logits / temperature) over the benign and "
            "the malignant classes",
            "logits": "logsumexp of the benign and of the malignant classes' logits",
        }
        for output in ("probabilities", "logits"):
            terms["outputs"][output]["shape"] = ["N", len(CLASS_NAMES)]
        return terms
    terms["task"] = "subtype"
    terms["malignant_classes"] = [card.class_names[i] for i in card.malignant_indices]
    terms["decision"] = (
        "malignant when the sum of probabilities[:, class_names.index(c)] over c in "
        "malignant_classes >= threshold; the subtype is class_names[argmax(probabilities)]"
    )
    return terms


def _contract(card: ModelCard, *, file_name: str, format: str, source: str) -> dict[str, Any]:
    size = card.image_size
    geometry = card.tile_geometry
    height, width = geometry.eval_hw
    if geometry.geometry == "square":
        resize = (
            f"the whole tile squashed to {size}x{size}, bilinear (PIL "
            "Image.resize(BILINEAR, reducing_gap=2.0), as breakhis.data.imaging.decode_rgb)"
        )
    else:
        resize = (
            f"resized keeping the aspect ratio to cover {size}x{geometry.canonical_hw[1]} "
            "(height x width) and centre-cropped to it, bilinear (PIL Image.resize(BILINEAR, "
            "reducing_gap=2.0)), "
            + ("then its centre square" if geometry.view == "centre" else "the whole tile")
            + " (breakhis.data.geometry.TileGeometry.eval_pixels)"
        )
    return {
        "contract_version": CONTRACT_VERSION,
        "format": format,
        "file": file_name,
        "input": {
            "name": INPUT_NAME,
            "dtype": "uint8",
            "shape": ["N", 3, height, width],
            "layout": "NCHW",
            "channels": "RGB",
            "image_size": size,
            "geometry": geometry.geometry,
            "view": geometry.view,
            "resize": resize,
        },
        "stain_normalization": (
            {**card.stain, "applied_in_graph": True, "applied_to": "the uint8 input, first"}
            if card.stain
            else {"method": "none"}
        ),
        "normalization": {
            "scale": 1.0 / 255.0,
            "mean": list(card.mean),
            "std": list(card.std),
            "applied_in_graph": True,
        },
        "outputs": {
            "probabilities": {
                "shape": ["N", card.num_classes],
                "meaning": "softmax(logits / temperature): the scoring job's probabilities",
            },
            "logits": {"shape": ["N", card.num_classes], "meaning": "before the temperature"},
        },
        "class_names": list(card.class_names),
        "positive_class": "malignant",
        "temperature": card.temperature,
        "temperature_applied_in_graph": True,
        "threshold": card.threshold,
        "threshold_rule": card.threshold_rule,
        "decision": "malignant when probabilities[:, class_names.index('malignant')] >= threshold",
        "model": {
            "source": source,
            "model_id": card.model_id,
            "architecture": card.architecture,
            "magnification": card.magnification,
            "split": card.split,
            "manifest_hash": card.manifest_hash,
            "epoch": card.epoch,
        },
    }


def _example(card: ModelCard) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    size = (2, 3, *card.tile_geometry.eval_hw)
    return torch.randint(0, 256, size, dtype=torch.uint8, generator=generator)


def to_torchscript(model: ProbabilityModel, card: ModelCard) -> bytes:
    """The model traced to TorchScript (any batch size). Returns the saved file's bytes."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # TorchScript is deprecated upstream in favour of torch.export (ONNX here); it is
        # still what many C++ and Java runtimes load, so it stays, without the warnings.
        warnings.simplefilter("ignore", FutureWarning)
        with torch.no_grad():
            traced = torch.jit.trace(model, (_example(card),))
        torch.jit.save(traced, buffer)
    return buffer.getvalue()


def to_onnx(model: ProbabilityModel, card: ModelCard) -> bytes:
    """The model as ONNX (opset ONNX_OPSET, dynamic batch), through torch.export.
    Returns the file's bytes. Raises RuntimeError when the graph cannot be exported."""
    if card.stain.get("method") == "macenko":
        raise ValueError(
            "--format onnx: this model normalises stains with Macenko, whose "
            "eigendecomposition ONNX has no operator for; export it with --format torchscript"
        )
    try:
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
    except ImportError as err:
        raise ValueError(
            "--format onnx needs the onnx and onnxscript packages: pip install 'breakhis[export]'"
        ) from err
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.onnx.export(
        model,
        (_example(card),),
        dynamo=True,
        input_names=[INPUT_NAME],
        output_names=list(OUTPUT_NAMES),
        dynamic_shapes={"image": {0: batch}},
        opset_version=ONNX_OPSET,
        verbose=False,
    )
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / FILE_NAMES["onnx"]
        program.save(str(path))
        return path.read_bytes()


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote."""

    model_uri: str
    """The exported model file."""
    contract_uri: str
    """Its preprocessing contract (JSON)."""
    format: str
    model_id: str
    """The artifact's model_id (the weights exported)."""
    size_bytes: int

    def format_table(self) -> str:
        """A plain-text summary for the terminal."""
        return (
            f"model {self.model_id} exported as {self.format} ({self.size_bytes / 1e6:.1f} MB) "
            f"to {self.model_uri}; contract (input size, mean, std, class names, threshold, "
            f"temperature) at {self.contract_uri}"
        )


def export_model(config: ExportConfig) -> ExportResult:
    """Export the artifact ``config.model`` as ``config.format`` with its contract.

    Returns the ExportResult. Raises FileNotFoundError and ValueError as
    breakhis.model.artifact.load_artifact does (no artifact, a damaged one).
    """
    net, card = load_artifact(config.model)
    if config.task == "subtype" and card.task != "subtype":
        raise ValueError(
            f"--task subtype: {config.model} is a {card.task} model (classes "
            f"{', '.join(card.class_names)}); train one with --task subtype"
        )
    model = ProbabilityModel(
        net, card, script_stain=config.format == "torchscript", binary=config.task == "binary"
    ).eval()
    file_name = FILE_NAMES[config.format]
    data = to_onnx(model, card) if config.format == "onnx" else to_torchscript(model, card)
    model_uri = storage.join(config.out_uri, file_name)
    contract_uri = storage.join(config.out_uri, f"{file_name.removesuffix('.pt')}.json")
    terms = contract(
        card, file_name=file_name, format=config.format, source=config.model, task=config.task
    )
    storage.write_bytes(model_uri, data)
    storage.write_bytes(contract_uri, json.dumps(terms, indent=2).encode())
    log.info("model %s exported as %s to %s", card.model_id, config.format, model_uri)
    return ExportResult(
        model_uri=model_uri,
        contract_uri=contract_uri,
        format=config.format,
        model_id=card.model_id,
        size_bytes=len(data),
    )
