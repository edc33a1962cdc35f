import pyarrow as pa
import pytest

from breakhis.splits import (
    LeakageError,
    SplitSpec,
    add_split_columns,
    carve_validation,
    check_no_leakage,
    holdout_splits,
    kfold_assignment,
    select_split,
)


def _table(n_benign: int = 24, n_malignant: int = 58, images: int = 6) -> pa.Table:
    rows = []
    for label, n in ((0, n_benign), (1, n_malignant)):
        for p in range(n):
            patient = f"14-{label}{p:04d}"
            rows += [{"patient_id": patient, "label": label}] * (images + p % 5)
    # The real quirk: one malignant patient under two subtypes stays one patient.
    rows += [{"patient_id": "14-13412", "label": 1}] * 4
    return pa.Table.from_pylist(rows)


def test_holdout_is_stratified_70_30_and_deterministic():
    table = _table()
    labels = dict(zip(table["patient_id"].to_pylist(), table["label"].to_pylist(), strict=True))
    reps = holdout_splits(labels, repetitions=5, test_fraction=0.3, seed=1)
    assert len(reps) == 5
    assert reps == holdout_splits(labels, repetitions=5, test_fraction=0.3, seed=1)
    assert reps != holdout_splits(labels, repetitions=5, test_fraction=0.3, seed=2)
    assert len(set(reps)) == 5  # the repetitions differ from each other
    for test in reps:
        benign = [p for p in test if labels[p] == 0]
        malignant = [p for p in test if labels[p] == 1]
        assert len(benign) == round(24 * 0.3)
        assert len(malignant) == round(59 * 0.3)


def test_kfold_covers_every_patient_once_and_balances():
    table = _table()
    labels = dict(zip(table["patient_id"].to_pylist(), table["label"].to_pylist(), strict=True))
    counts: dict[str, int] = {}
    for p in table["patient_id"].to_pylist():
        counts[p] = counts.get(p, 0) + 1
    fold_of = kfold_assignment(labels, counts, folds=5, seed=0)
    assert set(fold_of) == set(labels)
    for label in (0, 1):
        per_fold = [
            sum(1 for p, f in fold_of.items() if f == k and labels[p] == label) for k in range(5)
        ]
        assert max(per_fold) - min(per_fold) <= 1
        images = [
            sum(counts[p] for p, f in fold_of.items() if f == k and labels[p] == label)
            for k in range(5)
        ]
        assert max(images) / min(images) < 1.3
    assert fold_of == kfold_assignment(labels, counts, folds=5, seed=0)
    assert fold_of != kfold_assignment(labels, counts, folds=5, seed=3)


def test_kfold_needs_enough_patients_per_label():
    with pytest.raises(ValueError, match="fewer than 5 folds"):
        kfold_assignment({"a": 0, "b": 0, "c": 1}, {"a": 1, "b": 1, "c": 1}, folds=5)


def test_add_columns_keep_each_patient_on_one_side():
    out = add_split_columns(_table(), folds=5, repetitions=3, seed=0)
    assert {"fold", "rep0", "rep1", "rep2"} <= set(out.column_names)
    sides: dict[str, set] = {}
    for row in out.to_pylist():
        sides.setdefault(row["patient_id"], set()).add((row["fold"], row["rep0"], row["rep2"]))
    assert all(len(s) == 1 for s in sides.values())


def test_select_split_with_validation_is_disjoint_and_complete():
    out = add_split_columns(_table(), folds=5, repetitions=2, seed=0)
    everyone = set(out["patient_id"].to_pylist())
    for text in ("fold:0", "fold:4", "rep:1"):
        split = select_split(out, SplitSpec.parse(text, val_fraction=0.2, seed=5))
        assert split.train | split.val | split.test == everyone
        assert not (split.train & split.val or split.train & split.test or split.val & split.test)
        assert split.val and split.test
    assert select_split(out, SplitSpec("fold", 1, 0.2, 9)) == select_split(
        out, SplitSpec("fold", 1, 0.2, 9)
    )


def test_select_split_bad_specs():
    out = add_split_columns(_table(), folds=5, repetitions=2, seed=0)
    with pytest.raises(ValueError, match="folds 0..4"):
        select_split(out, SplitSpec("fold", 5))
    with pytest.raises(ValueError, match="rep7"):
        select_split(out, SplitSpec("rep", 7))
    with pytest.raises(ValueError, match="fold:K or rep:K"):
        SplitSpec.parse("fold")
    with pytest.raises(ValueError, match="accepted: fold, rep"):
        SplitSpec.parse("random:1")


def test_leakage_is_loud_and_names_patients():
    check_no_leakage(train={"a", "b"}, test={"c"})
    with pytest.raises(LeakageError, match=r"b \(train\+test\)"):
        check_no_leakage(train={"a", "b"}, test={"b", "c"})


def test_hand_edited_manifest_with_leakage_is_refused():
    out = add_split_columns(_table(), folds=5, repetitions=1, seed=0).to_pylist()
    out[0]["fold"] = (out[0]["fold"] + 1) % 5  # one image of a patient moved to another fold
    with pytest.raises(LeakageError, match=out[0]["patient_id"]):
        select_split(pa.Table.from_pylist(out), SplitSpec("fold", out[0]["fold"]))


def test_carve_validation_takes_from_each_label():
    labels = {f"b{i}": 0 for i in range(10)} | {f"m{i}": 1 for i in range(10)}
    val = carve_validation(sorted(labels), labels, fraction=0.2, seed=0)
    assert sum(labels[p] == 0 for p in val) == 2
    assert sum(labels[p] == 1 for p in val) == 2
    assert carve_validation(sorted(labels), labels, fraction=0.0, seed=0) == frozenset()
