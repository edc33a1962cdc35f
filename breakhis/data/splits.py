"""Patient-disjoint splits, and the leakage check every job calls.

The patient, not the image, is the unit of independence in BreakHis: images
of one patient on both sides of a split inflate accuracy by several points.
Two schemes ``breakhis prepare`` writes, both stratified by label and
deterministic for a seed:

- ``rep``: the paper's protocol, ``k`` repetitions of a random 70/30 split of
  patients (manifest columns ``rep0`` .. ``rep{k-1}``, "train"/"test");
- ``fold``: k-fold cross-validation grouped by patient (manifest column
  ``fold``: the fold in which the patient is tested);

and one the user defines:

- ``column:NAME``: the manifest column NAME holds ``train``, ``val`` or
  ``test`` for each image, the same for every image of a patient.
  ``breakhis prepare SRC DEST --split-file NAME=patients.txt`` writes such a
  column from a list of test patients (the others train); see
  user_split_column.

A validation set, when asked for, is carved from the training patients of
the chosen split, also by patient and stratified by label; a column with
``val`` rows names its validation patients itself.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from breakhis.data.split_spec import (  # noqa: F401 (SCHEMES, SplitSpec re-exported)
    SCHEMES,
    SIDES,
    SplitSpec,
    check_column_name,
)


class LeakageError(RuntimeError):
    """A patient appears on two sides of a split."""


@dataclass(frozen=True)
class SplitPatients:
    """The patients on each side of one split."""

    train: frozenset[str]
    val: frozenset[str]
    test: frozenset[str]

    def side_of(self, patient_id: str) -> str | None:
        for name in ("train", "val", "test"):
            if patient_id in getattr(self, name):
                return name
        return None


def check_no_leakage(**sides: Iterable[str]) -> None:
    """Raise LeakageError if any patient is in more than one of the named sets.

    Call as ``check_no_leakage(train=..., val=..., test=...)``. The message
    names every leaked patient and the sides it is on.
    """
    owner: dict[str, list[str]] = {}
    for side, patients in sides.items():
        for patient in set(patients):
            owner.setdefault(patient, []).append(side)
    leaked = {p: s for p, s in owner.items() if len(s) > 1}
    if leaked:
        listing = ", ".join(f"{p} ({'+'.join(s)})" for p, s in sorted(leaked.items()))
        raise LeakageError(
            f"{len(leaked)} patient(s) on more than one side of the split: {listing}. "
            "Splits must be patient-disjoint."
        )


def patient_labels(table: pa.Table) -> dict[str, int]:
    """Map patient_id -> label from a catalog or manifest table.

    Raises ValueError naming the patient if one patient has both labels.
    """
    labels: dict[str, int] = {}
    for patient, label in zip(
        table.column("patient_id").to_pylist(), table.column("label").to_pylist(), strict=True
    ):
        if labels.setdefault(patient, label) != label:
            raise ValueError(f"patient {patient} has images labelled both benign and malignant")
    return labels


def _by_label(labels: dict[str, int]) -> dict[int, list[str]]:
    groups: dict[int, list[str]] = {}
    for patient in sorted(labels):
        groups.setdefault(labels[patient], []).append(patient)
    return groups


def holdout_splits(
    labels: dict[str, int], *, repetitions: int = 5, test_fraction: float = 0.3, seed: int = 0
) -> list[frozenset[str]]:
    """The paper's protocol: ``repetitions`` random splits of patients.

    Within each label, round(n * test_fraction) patients (at least one when
    the label has two or more) go to test. Returns the test patients of each
    repetition; the rest are training patients.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    splits = []
    for _ in range(repetitions):
        test: set[str] = set()
        for patients in _by_label(labels).values():
            n_test = int(round(len(patients) * test_fraction))
            if len(patients) >= 2:
                n_test = min(max(n_test, 1), len(patients) - 1)
            order = rng.permutation(len(patients))
            test.update(patients[i] for i in order[:n_test])
        splits.append(frozenset(test))
    return splits


def kfold_assignment(
    labels: dict[str, int], image_counts: dict[str, int], *, folds: int = 5, seed: int = 0
) -> dict[str, int]:
    """Stratified k-fold grouped by patient: patient_id -> test fold.

    Within each label, patients are shuffled, then placed largest first into
    the fold with the fewest images of that label so far, so folds balance
    both patients and images per class. Raises ValueError when a label has
    fewer patients than folds.
    """
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    rng = np.random.default_rng(seed)
    assignment: dict[str, int] = {}
    for label, patients in sorted(_by_label(labels).items()):
        if len(patients) < folds:
            raise ValueError(
                f"label {label} has {len(patients)} patient(s), fewer than {folds} folds"
            )
        shuffled = [patients[i] for i in rng.permutation(len(patients))]
        shuffled.sort(key=lambda p: -image_counts[p])  # stable: ties keep the shuffled order
        images = [0] * folds
        members = [0] * folds
        for patient in shuffled:
            fold = min(range(folds), key=lambda f: (images[f], members[f], f))
            assignment[patient] = fold
            images[fold] += image_counts[patient]
            members[fold] += 1
    return assignment


def carve_validation(
    train: Iterable[str], labels: dict[str, int], *, fraction: float, seed: int
) -> frozenset[str]:
    """Pick validation patients from ``train``, stratified by label.

    Takes round(n * fraction) of each label's patients, at least one per
    label that has two or more. Returns the validation patients.
    """
    if fraction <= 0:
        return frozenset()
    rng = np.random.default_rng(seed)
    subset = {p: labels[p] for p in train}
    val: set[str] = set()
    for patients in _by_label(subset).values():
        if len(patients) < 2:
            continue
        n_val = min(max(int(round(len(patients) * fraction)), 1), len(patients) - 1)
        order = rng.permutation(len(patients))
        val.update(patients[i] for i in order[:n_val])
    return frozenset(val)


def add_split_columns(
    table: pa.Table,
    *,
    folds: int = 5,
    repetitions: int = 5,
    test_fraction: float = 0.3,
    seed: int = 0,
) -> pa.Table:
    """Add ``fold`` (int8) and ``rep0..rep{k-1}`` ("train"/"test") columns.

    Every image of a patient gets that patient's assignment; the result is
    checked for leakage before it is returned.
    """
    labels = patient_labels(table)
    patients = table.column("patient_id").to_pylist()
    counts: dict[str, int] = {}
    for patient in patients:
        counts[patient] = counts.get(patient, 0) + 1
    fold_of = kfold_assignment(labels, counts, folds=folds, seed=seed)
    out = table.append_column("fold", pa.array([fold_of[p] for p in patients], pa.int8()))
    for i, test in enumerate(
        holdout_splits(labels, repetitions=repetitions, test_fraction=test_fraction, seed=seed)
    ):
        sides = ["test" if p in test else "train" for p in patients]
        out = out.append_column(f"rep{i}", pa.array(sides, pa.string()))
    for spec in [SplitSpec("fold", f) for f in range(folds)] + [
        SplitSpec("rep", r) for r in range(repetitions)
    ]:
        select_split(out, spec)  # runs the leakage check on every split written
    return out


def select_split(manifest: pa.Table, spec: SplitSpec) -> SplitPatients:
    """The train/val/test patients of one split of a manifest.

    Raises ValueError when the manifest lacks the split or a split column is
    malformed (see column_sides), and LeakageError when a patient falls on two
    sides (e.g. a hand-edited manifest).
    """
    named_val: frozenset[str] = frozenset()
    if spec.scheme == "column":
        sides = column_sides(manifest, spec)
        train_rows, named_val, test_rows = sides["train"], sides["val"], sides["test"]
        check_no_leakage(train=train_rows, val=named_val, test=test_rows)
    else:
        train_rows, test_rows = _prepared_sides(manifest, spec)
        check_no_leakage(train=train_rows, test=test_rows)
    if named_val and spec.val_fraction > 0:
        val = named_val
    elif named_val:  # no validation asked for: the column's validation patients train
        train_rows, val = train_rows | named_val, frozenset()
    else:
        val = carve_validation(
            sorted(train_rows),
            patient_labels(manifest),
            fraction=spec.val_fraction,
            seed=spec.seed,
        )
    split = SplitPatients(train=frozenset(train_rows - val), val=val, test=frozenset(test_rows))
    check_no_leakage(train=split.train, val=split.val, test=split.test)
    return split


def _prepared_sides(manifest: pa.Table, spec: SplitSpec) -> tuple[frozenset[str], frozenset[str]]:
    """The training and test patients of a ``fold`` or ``rep`` split (not yet checked)."""
    patients = manifest.column("patient_id")
    if spec.scheme == "fold":
        if "fold" not in manifest.column_names:
            raise ValueError("manifest has no 'fold' column; re-run `breakhis prepare`")
        n_folds = pc.max(manifest.column("fold")).as_py() + 1
        if spec.index >= n_folds:
            raise ValueError(f"split {spec}: the manifest has folds 0..{n_folds - 1}")
        is_test = pc.equal(manifest.column("fold"), spec.index)
    else:
        column = f"rep{spec.index}"
        if column not in manifest.column_names:
            reps = [c for c in manifest.column_names if c.startswith("rep")]
            raise ValueError(f"split {spec}: manifest has no {column!r}; it has {reps}")
        is_test = pc.equal(manifest.column(column), "test")
    test_rows = frozenset(pc.filter(patients, is_test).to_pylist())
    train_rows = frozenset(pc.filter(patients, pc.invert(is_test)).to_pylist())
    return train_rows, test_rows


def column_sides(manifest: pa.Table, spec: SplitSpec) -> dict[str, frozenset[str]]:
    """The patients on each side ("train", "val", "test") of a ``column:NAME`` split.

    Raises ValueError, in one line: naming the columns the manifest has when
    NAME is not one; naming the row, its patient and the accepted values for
    a value other than train/val/test; naming the patient and the sides found
    when a patient's images are not all on one side; and when no patient is
    on the train or the test side.
    """
    name = spec.column or ""
    if name not in manifest.column_names:
        raise ValueError(
            f"split {spec}: the manifest has no column {name!r}; its columns: "
            f"{', '.join(manifest.column_names)}"
        )
    values = manifest.column(name)
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        raise ValueError(
            f"split {spec}: column {name!r} holds {values.type} values; a split column "
            f"holds one of {', '.join(SIDES)} per image"
        )
    patients = manifest.column("patient_id").to_pylist()
    found: dict[str, set[str]] = {}
    for row, (patient, side) in enumerate(zip(patients, values.to_pylist(), strict=True)):
        if side not in SIDES:
            tile = (
                f"tile {manifest.column('tile_id')[row].as_py()}, "
                if "tile_id" in manifest.column_names
                else ""
            )
            raise ValueError(
                f"split {spec}: column {name!r}, row {row} ({tile}patient {patient}) holds "
                f"{side!r}; accepted: {', '.join(SIDES)}"
            )
        found.setdefault(patient, set()).add(side)
    mixed = sorted(p for p, s in found.items() if len(s) > 1)
    if mixed:
        others = f" ({len(mixed) - 1} other patient(s) too)" if len(mixed) > 1 else ""
        raise ValueError(
            f"split {spec}: patient {mixed[0]} has images on "
            f"{' and '.join(s for s in SIDES if s in found[mixed[0]])} in column {name!r}"
            f"{others}; every image of a patient must be on one side"
        )
    sides = {s: frozenset(p for p, f in found.items() if s in f) for s in SIDES}
    for needed in ("train", "test"):
        if not sides[needed]:
            raise ValueError(
                f"split {spec}: column {name!r} puts no patient on {needed!r}; a split needs "
                "training and test patients"
            )
    return sides


def read_patient_list(text: str) -> list[str]:
    """The patient ids of a split file: one per line; blank lines and ``#`` comments (whole
    lines or after an id) are ignored. Returns them in file order, without repeats."""
    patients: dict[str, None] = {}
    for line in text.splitlines():
        patient = line.split("#", 1)[0].strip()
        if patient:
            patients[patient] = None
    return list(patients)


def user_split_column(
    patients: Iterable[str], test: Collection[str], *, known: Collection[str], source: str
) -> pa.Array:
    """A split column for rows of ``patients``: "test" for the patients in ``test``, "train"
    for the others.

    ``known`` is every patient of the data set and ``source`` names the list in messages.
    Raises ValueError, in one line, naming the ids in ``test`` that are not ``known``
    (and how many are), and when ``test`` is empty or holds every known patient.
    """
    unknown = sorted(set(test) - set(known))
    if unknown:
        shown = ", ".join(unknown[:10]) + (" ..." if len(unknown) > 10 else "")
        example = f" (ids like {min(known)})" if known else ""
        raise ValueError(
            f"{source}: {len(unknown)} patient id(s) not in the data: {shown}; "
            f"the data has {len(set(known))} patients{example}"
        )
    if not test:
        raise ValueError(f"{source}: lists no patient; list the test patients, one per line")
    if set(known) <= set(test):
        raise ValueError(f"{source}: lists every patient as test; no patient would train")
    return pa.array(["test" if p in test else "train" for p in patients], pa.string())
