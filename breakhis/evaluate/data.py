"""The data side of an evaluation: which patients the model saw (read from the manifest
it was trained on), the split in words, and the images per class, subtype and
magnification of each side (with the training job's balancing)."""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from breakhis.data.dest import PreparedDest
from breakhis.data.splits import LeakageError, SplitPatients, SplitSpec
from breakhis.model.artifact import ModelCard
from breakhis.names import CLASS_NAMES, MAGNIFICATIONS

log = logging.getLogger(__name__)


def _split_params(manifest: pa.Table) -> dict[str, Any]:
    raw = (manifest.schema.metadata or {}).get(b"breakhis.split")
    return json.loads(raw) if raw else {}


def describe_scheme(manifest: pa.Table, scheme: str, columns: tuple[str, ...] = ()) -> str:
    """A split scheme of a manifest in words, from the parameters prepare stored
    (``columns``: the split columns of the ``column`` scheme)."""
    params = _split_params(manifest)
    seed = params.get("seed", "?")
    if scheme == "column":
        sources = params.get("columns", {})
        named = ", ".join(
            f"{c!r}" + (f" (test patients from {sources[c]})" if c in sources else "")
            for c in columns
        )
        plural = "s" if len(columns) > 1 else ""
        return (
            f"user-defined split{plural} in manifest column{plural} {named}: train, val or "
            "test per patient; no patient on both sides of a split"
        )
    if scheme == "rep":
        share = float(params.get("test_fraction", 0.3))
        return (
            f"{params.get('repetitions', '?')} random splits of the patients, "
            f"{1 - share:.0%} train / {share:.0%} test, stratified by class (seed {seed}); "
            "no patient on both sides of a split (the protocol of Spanhol et al. 2016)"
        )
    return (
        f"{params.get('folds', '?')}-fold cross-validation grouped by patient, stratified by "
        f"class (seed {seed}); no patient on both sides of a split"
    )


def describe_split(manifest: pa.Table, spec: SplitSpec) -> str:
    """One split of a manifest in words, e.g. "repetition 0 of 5 random splits ..."."""
    if spec.scheme == "column":
        return describe_scheme(manifest, "column", (spec.column or "",))
    what = "repetition" if spec.scheme == "rep" else "fold"
    return f"{what} {spec.index} of {describe_scheme(manifest, spec.scheme)}"


def _counts(rows: pa.Table) -> dict[str, dict[str, float]]:
    labels = rows.column("label").to_pylist()
    return {
        "class": {c: float(labels.count(i)) for i, c in enumerate(CLASS_NAMES)},
        "subtype": {
            k: float(v) for k, v in sorted(Counter(rows.column("subtype").to_pylist()).items())
        },
        "magnification": {
            str(m): float(rows.column("magnification").to_pylist().count(m)) for m in MAGNIFICATIONS
        },
    }


def data_distribution(
    manifest: pa.Table,
    sides: dict[str, frozenset[str]],
    *,
    magnification: int | None,
    oversample: bool = False,
    class_weighted: bool = False,
    task: str = "binary",
) -> dict[str, dict[str, dict[str, float]]]:
    """Images per class, subtype and magnification of each named side (patients).

    Only images of ``magnification`` count (all when None). When ``sides`` has
    ``train``, ``train_balanced`` follows it: the training images as the loss
    weighs them, with the training job's own balancing (breakhis.data.ingest): each
    image counts its class's oversampling copies times its class weight
    n / (2 n_c), so with class weights both classes weigh n / 2; for a subtype model
    (``task`` subtype) the weight is its subtype's, n / (8 n_c), so that each subtype
    present weighs the same. Returns
    {side: {"class"|"subtype"|"magnification": {value: images}}}.
    """
    from breakhis.data.ingest import class_weights, oversample_factor

    if magnification is not None:
        manifest = manifest.filter(pc.equal(manifest.column("magnification"), magnification))

    def rows_of(patients: frozenset[str]) -> pa.Table:
        return manifest.filter(
            pc.is_in(manifest.column("patient_id"), pa.array(sorted(patients), pa.string()))
        )

    out = {side: _counts(rows_of(patients)) for side, patients in sides.items()}
    if "train" not in sides:
        return out
    train = rows_of(sides["train"])
    counts = (int(out["train"]["class"]["benign"]), int(out["train"]["class"]["malignant"]))
    copies = oversample_factor(counts) if oversample else (1, 1)
    seen = (counts[0] * copies[0], counts[1] * copies[1])
    weights = class_weights(seen) if class_weighted else (1.0, 1.0)
    per_image = [copies[c] * weights[c] for c in (0, 1)]
    balanced: dict[str, dict[str, float]] = {
        "class": {name: counts[c] * per_image[c] for c, name in enumerate(CLASS_NAMES)},
        "subtype": {},
        "magnification": {str(m): 0.0 for m in MAGNIFICATIONS},
    }
    labels = train.column("label").to_pylist()
    subtypes = train.column("subtype").to_pylist()
    weight_of = [per_image[label] for label in labels]
    if task == "subtype":
        from breakhis.subtypes import SUBTYPE_CLASS_NAMES
        from breakhis.subtypes import class_weights as subtype_weights

        seen_per = dict.fromkeys(SUBTYPE_CLASS_NAMES, 0)
        for label, subtype in zip(labels, subtypes, strict=True):
            seen_per[subtype] = seen_per.get(subtype, 0) + copies[label]
        names = list(seen_per)
        weights8 = dict(zip(names, subtype_weights([seen_per[n] for n in names]), strict=True))
        weight_of = [
            copies[label] * (weights8[subtype] if class_weighted else 1.0)
            for label, subtype in zip(labels, subtypes, strict=True)
        ]
        balanced["class"] = {name: 0.0 for name in CLASS_NAMES}
        for label, weight in zip(labels, weight_of, strict=True):
            balanced["class"][CLASS_NAMES[label]] += weight
    for subtype, mag, weight in zip(
        subtypes, train.column("magnification").to_pylist(), weight_of, strict=True
    ):
        balanced["subtype"][subtype] = balanced["subtype"].get(subtype, 0.0) + weight
        balanced["magnification"][str(mag)] += weight
    balanced["subtype"] = dict(sorted(balanced["subtype"].items()))
    return {"train": out.pop("train"), "train_balanced": balanced, **out}


@dataclass(frozen=True)
class ModelPatients:
    """The patients a model saw, read from the manifest it was trained on."""

    seen: frozenset[str]
    split: SplitPatients  # train/val/test of the model's split in that manifest
    source: str  # the data root of that manifest


def model_patients(card: ModelCard, dest: PreparedDest) -> ModelPatients:
    """The patients whose images the model saw (its split's training and validation side).

    Reads them from ``dest``'s manifest when the card's manifest hash is
    its hash, else from the manifest at the card's training data URI. Raises
    LeakageError when the card records no split or manifest, or when neither
    manifest is the one the model was trained on (which patients it saw cannot
    be known, so no test set can be shown to be unseen).
    """
    if not card.split or not card.manifest_hash:
        raise LeakageError(
            f"the model card records no training split/manifest hash (split {card.split!r}, "
            f"manifest_hash {card.manifest_hash!r}); evaluation cannot tell which patients the "
            "model saw. Evaluate only models written by `breakhis train`"
        )
    data = dest.uri
    source = dest
    if dest.hash != card.manifest_hash:
        trained_on = str(card.config.get("data") or "")
        candidate = None
        if trained_on and trained_on.rstrip("/") != data.rstrip("/"):
            try:
                candidate = PreparedDest.open(trained_on)
            except (FileNotFoundError, OSError) as err:
                log.warning("cannot read the model's training manifest: %s", err)
        if candidate is None or candidate.hash != card.manifest_hash:
            changed = candidate is not None or trained_on.rstrip("/") == data.rstrip("/")
            raise LeakageError(
                f"the model was trained on manifest {card.manifest_hash} (data "
                f"{trained_on or 'unknown'}), not on {data}'s manifest "
                f"{dest.hash}, and that manifest "
                f"{'has changed since' if changed else 'cannot be read'}; evaluation cannot "
                "prove the test patients are unseen. Evaluate on the data the model was "
                "trained on, as prepared then"
            )
        source = candidate
    spec = SplitSpec.parse(
        card.split,
        val_fraction=float(card.config.get("val_fraction", 0.0) or 0.0),
        seed=int(card.config.get("seed", 0) or 0),
    )
    sides = source.split(spec)
    return ModelPatients(seen=source.patients - sides.test, split=sides, source=source.uri)
