import pyarrow as pa
import pytest

from breakhis.data.splits import (
    LeakageError,
    SplitSpec,
    add_split_columns,
    carve_validation,
    check_no_leakage,
    holdout_splits,
    kfold_assignment,
    read_patient_list,
    select_split,
    user_split_column,
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


# --------------------------------------------------------------------------- column:NAME


def _with_column(table: pa.Table, name: str, side_of: dict[str, str]) -> pa.Table:
    """``table`` with a split column ``name``: each patient's side from ``side_of``, "train"
    for the others."""
    sides = [side_of.get(p, "train") for p in table["patient_id"].to_pylist()]
    return table.append_column(name, pa.array(sides, pa.string()))


def _patients(table: pa.Table, label: int) -> list[str]:
    return sorted({r["patient_id"] for r in table.to_pylist() if r["label"] == label})


def test_column_split_takes_its_sides_and_named_validation_patients():
    table = _table()
    benign, malignant = _patients(table, 0), _patients(table, 1)
    test = set(benign[:5] + malignant[:10])
    val = set(benign[5:8] + malignant[10:14])
    side_of = {p: "test" for p in test} | {p: "val" for p in val}
    manifest = _with_column(table, "site", side_of)
    everyone = set(table["patient_id"].to_pylist())

    split = select_split(manifest, SplitSpec.parse("column:site", val_fraction=0.2, seed=3))
    assert str(SplitSpec.parse("column:site")) == "column:site"
    assert (split.test, split.val) == (test, val)  # the column's val rows: no carve-out
    assert split.train == everyone - test - val
    # No validation asked for (a refit, or evaluation): the validation patients train.
    refit = select_split(manifest, SplitSpec.parse("column:site"))
    assert (refit.test, refit.val, refit.train) == (test, frozenset(), everyone - test)


def test_column_split_without_val_rows_carves_validation_from_train():
    table = _table()
    test = set(_patients(table, 0)[:4] + _patients(table, 1)[:8])
    manifest = _with_column(table, "heldout", {p: "test" for p in test})
    spec = SplitSpec.parse("column:heldout", val_fraction=0.2, seed=1)
    split = select_split(manifest, spec)
    assert split.test == test and split.val and not split.val & test
    assert split.train | split.val == set(table["patient_id"].to_pylist()) - test
    labels = {r["patient_id"]: r["label"] for r in table.to_pylist()}
    assert {labels[p] for p in split.val} == {0, 1}  # stratified, as for fold and rep
    assert select_split(manifest, spec) == split  # deterministic for the seed


def test_column_split_patient_on_two_sides_is_one_line_naming_it():
    rows = _with_column(_table(), "site", {"14-00003": "test"}).to_pylist()
    for row in rows:
        if row["patient_id"] == "14-13412":
            row["site"] = "test"
    # One image of a patient moved to another side, as a hand edit or a bad script makes.
    moved = next(i for i, r in enumerate(rows) if r["patient_id"] == "14-13412")
    rows[moved]["site"] = "val"
    with pytest.raises(ValueError) as info:
        select_split(pa.Table.from_pylist(rows), SplitSpec.parse("column:site", val_fraction=0.2))
    message = str(info.value)
    assert "patient 14-13412 has images on val and test in column 'site'" in message
    assert "\n" not in message and "other patient" not in message


def test_column_split_bad_values_and_missing_columns_are_one_line():
    table = _table().append_column("tile_id", pa.array([f"t{i}" for i in range(_table().num_rows)]))
    rows = _with_column(table, "site", {"14-00003": "test"}).to_pylist()
    rows[7]["site"] = "Test"
    with pytest.raises(ValueError) as info:
        select_split(pa.Table.from_pylist(rows), SplitSpec.parse("column:site"))
    assert str(info.value) == (
        f"split column:site: column 'site', row 7 (tile t7, patient {rows[7]['patient_id']}) "
        "holds 'Test'; accepted: train, val, test"
    )
    rows[7]["site"] = None
    with pytest.raises(ValueError, match="row 7 .* holds None; accepted: train, val, test"):
        select_split(pa.Table.from_pylist(rows), SplitSpec.parse("column:site"))

    with pytest.raises(ValueError) as info:
        select_split(table, SplitSpec.parse("column:sites"))
    assert str(info.value) == (
        "split column:sites: the manifest has no column 'sites'; its columns: "
        "patient_id, label, tile_id"
    )
    with pytest.raises(ValueError, match="column 'label' holds int64 values; a split column"):
        select_split(table, SplitSpec.parse("column:label"))
    everyone_trains = _with_column(table, "site", {})
    with pytest.raises(ValueError, match="column 'site' puts no patient on 'test'"):
        select_split(everyone_trains, SplitSpec.parse("column:site"))
    for text, message in [
        ("column:", "column name ''"),
        ("column:a b", "column name 'a b'"),
        ("columns:1", "accepted: fold, rep, column"),
        ("columns:x", "expected fold:K or rep:K .* or column:NAME"),
    ]:
        with pytest.raises(ValueError, match=message):
            SplitSpec.parse(text)
    with pytest.raises(ValueError, match="takes no column name"):
        SplitSpec("fold", 0, column="site")


def test_column_split_leakage_check_runs_as_for_fold_and_rep(monkeypatch):
    import breakhis.data.splits as splits

    manifest = _with_column(_table(), "site", {"14-00003": "test", "14-10001": "val"})
    checked: list[dict] = []
    real = splits.check_no_leakage

    def recording(**sides):
        checked.append({k: set(v) for k, v in sides.items()})
        real(**sides)

    monkeypatch.setattr(splits, "check_no_leakage", recording)
    select_split(manifest, SplitSpec.parse("column:site", val_fraction=0.2))
    assert checked and all(set(c) == {"train", "val", "test"} for c in checked)
    assert checked[0]["test"] == {"14-00003"} and checked[0]["val"] == {"14-10001"}


def test_split_file_lists_and_the_column_they_make():
    text = "# held-out patients\n14-22549AB\n\n  14-13412  # the DC/LC slide\n14-22549AB\n"
    assert read_patient_list(text) == ["14-22549AB", "14-13412"]
    column = user_split_column(
        ["a", "b", "a", "c"], {"b"}, known={"a", "b", "c"}, source="--split-file x=f.txt"
    )
    assert column.to_pylist() == ["train", "test", "train", "train"]
    with pytest.raises(ValueError) as info:
        user_split_column(["a"], {"b", "zz", "a"}, known={"a", "c"}, source="--split-file x=f.txt")
    assert str(info.value) == (
        "--split-file x=f.txt: 2 patient id(s) not in the data: b, zz; "
        "the data has 2 patients (ids like a)"
    )
    with pytest.raises(ValueError, match="lists no patient"):
        user_split_column(["a"], set(), known={"a", "c"}, source="f.txt")
    with pytest.raises(ValueError, match="lists every patient as test"):
        user_split_column(["a"], {"a", "c"}, known={"a", "c"}, source="f.txt")


def test_split_files_cannot_take_a_column_prepare_writes():
    from breakhis.data.dest import SHARD_SCHEMA
    from breakhis.data.prepare_config import BUILT_IN_COLUMNS, parse_split_files

    # prepare_config names the columns without pyarrow (for a fast --help): the same ones.
    assert set(BUILT_IN_COLUMNS) == {*SHARD_SCHEMA.names, "fold"}
    for name in (*BUILT_IN_COLUMNS, "rep3"):
        with pytest.raises(ValueError, match="a column prepare writes itself"):
            parse_split_files((f"{name}=patients.txt",))
    assert parse_split_files(("heldout=patients.txt",)) == {"heldout": "patients.txt"}
