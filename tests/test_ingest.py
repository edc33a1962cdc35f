"""Ray Data ingest on generated data in the embedded SeaweedFS (tiny 64x42 tiles, S = 32)."""

from __future__ import annotations

import io
import os
import uuid
from collections import Counter
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from breakhis import storage
from breakhis.data.dest import PreparedDest
from breakhis.data.geometry import TileGeometry, canonical_width
from breakhis.data.ingest import IngestConfig, IngestData, TileCollate, build_datasets
from breakhis.data.splits import SplitSpec, select_split
from breakhis.data.transforms import normalize

pytestmark = [pytest.mark.ray, pytest.mark.s3]

SIZE = 32
SPLIT = SplitSpec.parse("fold:0", val_fraction=0.3, seed=0)


@pytest.fixture(scope="module")
def ray_session(s3_server) -> Iterator[None]:
    """A private local Ray for this module, started after the S3 server so its workers
    see the AWS_* variables (an instance another module left running is reused)."""
    import ray
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    if ray.is_initialized():
        yield
        return
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def dest(ray_session, s3_server) -> str:
    """78 generated tiles of 14 patients, prepared into S3 in several small shards."""
    from breakhis.data.prepare import PrepareConfig, prepare
    from breakhis.synth.dataset import synthesize

    root = f"s3://test/{uuid.uuid4().hex}"
    synthesize(f"{root}/raw", scale=0.01, seed=0, width=64, height=42, workers=1)
    prepare(
        PrepareConfig(
            src=f"{root}/raw", dest=f"{root}/prepared", folds=3, shard_mb=0.03, row_group_rows=8
        )
    )
    return f"{root}/prepared"


@pytest.fixture(scope="module")
def manifest(dest: str) -> pa.Table:
    from breakhis.data.dest import read_manifest

    return read_manifest(dest)


@pytest.fixture(scope="module")
def cached(dest: str) -> IngestData:
    return build_datasets(
        PreparedDest.open(dest), SPLIT, IngestConfig(image_size=SIZE, oversample=True, seed=5)
    )


def _epoch(ds, columns=("image", "label", "tile_id", "patient_id", "magnification")) -> dict:
    """One pass over a dataset: numpy columns concatenated."""
    parts: dict[str, list] = {c: [] for c in columns}
    for batch in ds.iter_batches(batch_size=16, batch_format="numpy"):
        for c in columns:
            parts[c].append(batch[c])
    return {c: np.concatenate(v) for c, v in parts.items()}


def _by_tile(epoch: dict) -> dict[str, list[bytes]]:
    images: dict[str, list[bytes]] = {}
    for tile, image in zip(epoch["tile_id"], epoch["image"], strict=True):
        images.setdefault(str(tile), []).append(image.tobytes())
    return {t: sorted(v) for t, v in images.items()}


def test_batches_have_the_contract_shapes_dtypes_ranges_and_manifest_labels(
    cached: IngestData, manifest: pa.Table
) -> None:
    assert set(cached.datasets) == {"train", "val", "test"}
    labels = dict(
        zip(
            manifest.column("tile_id").to_pylist(),
            manifest.column("label").to_pylist(),
            strict=True,
        )
    )
    for side in ("val", "test"):
        epoch = _epoch(cached.datasets[side])
        # Evaluation sides: the whole aspect-kept tile (breakhis.data.geometry).
        whole = (3, SIZE, canonical_width(SIZE))
        assert epoch["image"].dtype == np.uint8 and epoch["image"].shape[1:] == whole
        assert len(epoch["tile_id"]) == cached.num_rows[side]
        assert [labels[t] for t in epoch["tile_id"]] == epoch["label"].tolist()
    seen = 0
    batches = cached.datasets["train"].iter_torch_batches(
        batch_size=8, prefetch_batches=2, collate_fn=TileCollate()
    )
    for batch in batches:
        assert set(batch) == {"image", "label", "magnification"}
        assert batch["image"].dtype == torch.uint8 and batch["image"].shape[1:] == (3, SIZE, SIZE)
        assert batch["label"].dtype == torch.int64 and set(batch["label"].tolist()) <= {0, 1}
        assert set(batch["magnification"].tolist()) <= {40, 100, 200, 400}
        assert int(batch["image"].max()) > 0  # not a blank tile
        x = normalize(batch["image"])
        assert x.dtype == torch.float32 and float(x.min()) > -2.2 and float(x.max()) < 2.7
        seen += len(batch["label"])
    assert seen == cached.num_rows["train"]


def test_each_side_holds_exactly_its_patients_tiles(
    cached: IngestData, dest: str, manifest: pa.Table
) -> None:
    patients = select_split(manifest, SPLIT)
    assert cached.split == patients
    rows = manifest.to_pylist()
    for side in ("train", "val", "test"):
        members = getattr(patients, side)
        epoch = _epoch(cached.datasets[side], columns=("tile_id", "patient_id"))
        assert set(epoch["patient_id"]) == set(members)
        assert set(epoch["tile_id"]) == {r["tile_id"] for r in rows if r["patient_id"] in members}
    one_mag = build_datasets(
        PreparedDest.open(dest), SPLIT, IngestConfig(image_size=SIZE, magnification=100)
    )
    epoch = _epoch(one_mag.datasets["test"], columns=("tile_id", "magnification", "patient_id"))
    assert set(epoch["magnification"]) == {100}
    assert set(epoch["patient_id"]) <= patients.test
    assert len(epoch["tile_id"]) == sum(
        r["magnification"] == 100 and r["patient_id"] in patients.test for r in rows
    )


def test_oversampling_and_class_weights_follow_the_train_counts(
    cached: IngestData, manifest: pa.Table
) -> None:
    train_labels = [
        r["label"] for r in manifest.to_pylist() if r["patient_id"] in cached.split.train
    ]
    counts = (train_labels.count(0), train_labels.count(1))
    assert cached.class_counts == counts
    factor = cached.oversample_factor
    assert factor[0] == max(1, round(counts[1] / counts[0])) and factor[1] == 1
    seen = (counts[0] * factor[0], counts[1] * factor[1])
    assert cached.class_weights[0] * seen[0] == pytest.approx(cached.class_weights[1] * seen[1])
    epoch = _epoch(cached.datasets["train"], columns=("tile_id", "label"))
    assert Counter(epoch["label"].tolist()) == {0: seen[0], 1: seen[1]}
    per_tile = Counter(epoch["tile_id"].tolist())
    assert {
        per_tile[t] for t, lab in zip(epoch["tile_id"], epoch["label"], strict=True) if lab == 0
    } == {factor[0]}


def test_augmentation_changes_pixels_not_labels_differs_per_epoch_and_repeats_for_a_seed(
    dest: str,
) -> None:
    # Fresh datasets: the module's `cached` one has run epochs in other tests already, and
    # the epoch number is the dataset's own execution count.
    plain = build_datasets(
        PreparedDest.open(dest), SPLIT, IngestConfig(image_size=SIZE, augment_strength=0.0)
    )
    base = _by_tile(_epoch(plain.datasets["train"]))
    run = build_datasets(
        PreparedDest.open(dest), SPLIT, IngestConfig(image_size=SIZE, oversample=True, seed=5)
    )
    again = build_datasets(
        PreparedDest.open(dest), SPLIT, IngestConfig(image_size=SIZE, oversample=True, seed=5)
    )
    other_seed = build_datasets(
        PreparedDest.open(dest), SPLIT, IngestConfig(image_size=SIZE, oversample=True, seed=6)
    )

    first = _epoch(run.datasets["train"])
    second = _epoch(run.datasets["train"])
    repeat = _epoch(again.datasets["train"])
    labels = dict(zip(first["tile_id"], first["label"], strict=True))
    assert dict(zip(second["tile_id"], second["label"], strict=True)) == labels

    first_images, second_images = _by_tile(first), _by_tile(second)
    assert set(first_images) == set(base)
    assert all(base[t][0] not in first_images[t] for t in base)
    assert all(first_images[t] != second_images[t] for t in base)
    assert _by_tile(repeat) == first_images  # same seed, same first epoch
    assert _by_tile(_epoch(other_seed.datasets["train"])) != first_images
    # Strength 0 is the evaluation transform: the train tiles equal the decoded ones.
    assert _by_tile(_epoch(plain.datasets["train"])) == base


def test_later_epochs_never_decode_when_cached_and_always_do_when_streaming(dest: str) -> None:
    data = build_datasets(PreparedDest.open(dest), SPLIT, IngestConfig(image_size=SIZE))
    decoded_at_build = data.decode_stats().decoded
    assert decoded_at_build == sum(data.num_rows.values())
    for _ in range(2):
        _epoch(data.datasets["train"], columns=("label",))
        _epoch(data.datasets["val"], columns=("label",))
    assert data.decode_stats().decoded == decoded_at_build

    streaming = build_datasets(
        PreparedDest.open(dest), SPLIT, IngestConfig(image_size=SIZE, cache=False)
    )
    assert streaming.decode_stats().decoded == 0
    for epoch in (1, 2):
        rows = len(_epoch(streaming.datasets["train"], columns=("label",))["label"])
        assert rows == streaming.num_rows["train"] == data.num_rows["train"]
        assert streaming.decode_stats().decoded == epoch * rows


def test_a_training_run_never_decodes_the_test_patients(dest: str, manifest: pa.Table) -> None:
    whole = build_datasets(PreparedDest.open(dest), SPLIT, IngestConfig(image_size=SIZE))
    # The plan's path: DEST opened and the split selected once, handed down.
    prepared = PreparedDest.open(dest)
    data = build_datasets(
        prepared,
        SPLIT,
        IngestConfig(image_size=SIZE),
        sides=("train", "val"),
        patients=prepared.split(SPLIT),
    )
    assert set(data.datasets) == {"train", "val"} and data.split == whole.split
    assert whole.decode_stats().decoded == sum(whole.num_rows.values())
    assert data.decode_stats().decoded == data.num_rows["train"] + data.num_rows["val"]
    assert data.decode_stats().decoded == whole.decode_stats().decoded - whole.num_rows["test"]
    with pytest.raises(ValueError, match="sides .*accepted: train"):
        build_datasets(
            PreparedDest.open(dest), SPLIT, IngestConfig(image_size=SIZE), sides=("val", "test")
        )


def test_the_decode_runs_inside_the_read_one_task_per_shard(dest: str, manifest: pa.Table) -> None:
    from breakhis.data.ingest import new_ledger, read_tiles

    prepared = PreparedDest.open(dest)
    shards = prepared.shard_uris
    assert len(shards) > 2
    patients = frozenset(manifest.column("patient_id").to_pylist())
    tiles = read_tiles(
        prepared, patients, IngestConfig(image_size=SIZE), new_ledger()
    ).materialize()
    stats = tiles.stats()
    # A separate decode operator waits on the reads' CPUs (see read_tiles).
    assert f"ReadParquet->MapBatches(decode_tiles): {len(shards)} tasks executed" in stats, stats
    assert tiles.count() == manifest.num_rows


def test_workers_shards_cover_the_train_set_once_per_epoch_with_fresh_augmentation(
    cached: IngestData,
) -> None:
    """What Ray Train does: streaming_split into one shard per worker, epochs in lockstep."""
    import ray

    @ray.remote(num_cpus=0)
    def consume(shard, epochs: int) -> list[list[tuple[str, bytes]]]:
        return [
            [
                (str(tile), image.tobytes())
                for batch in shard.iter_batches(batch_size=8, batch_format="numpy")
                for tile, image in zip(batch["tile_id"], batch["image"], strict=True)
            ]
            for _ in range(epochs)
        ]

    shards = cached.datasets["train"].streaming_split(2, equal=False)
    workers = ray.get([consume.remote(s, 2) for s in shards])
    epochs = []
    for epoch in range(2):
        rows = [row for worker in workers for row in worker[epoch]]
        assert len(rows) == cached.num_rows["train"]
        images: dict[str, list[bytes]] = {}
        for tile, image in rows:
            images.setdefault(tile, []).append(image)
        epochs.append({t: sorted(v) for t, v in images.items()})
    first, second = epochs
    assert set(first) == set(second)
    assert all(first[t] != second[t] for t in first)


def test_a_corrupt_tile_is_skipped_logged_and_counted(dest: str, manifest: pa.Table) -> None:
    broken = f"s3://test/{uuid.uuid4().hex}/prepared"
    shards = [e.uri for e in storage.walk(storage.join(dest, "shards"), (".parquet",))]
    storage.write_bytes(
        storage.join(broken, "manifest.parquet"),
        storage.read_bytes(storage.join(dest, "manifest.parquet")),
    )
    patients = select_split(manifest, SPLIT)
    victim = None
    for uri in shards:
        table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
        if victim is None:
            test_rows = [
                i
                for i, p in enumerate(table.column("patient_id").to_pylist())
                if p in patients.test
            ]
            if test_rows:
                i = test_rows[0]
                victim = (table.column("tile_id")[i].as_py(), table.column("uri")[i].as_py())
                png = table.column("png").to_pylist()
                png[i] = png[i][: len(png[i]) // 3]  # a truncated PNG
                table = table.set_column(
                    table.schema.get_field_index("png"), "png", pa.array(png, pa.binary())
                )
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        storage.write_bytes(
            storage.join(broken, "shards", uri.rsplit("/", 1)[-1]), buffer.getvalue()
        )
    assert victim is not None

    data = build_datasets(PreparedDest.open(broken), SPLIT, IngestConfig(image_size=SIZE))
    stats = data.decode_stats()
    assert stats.failed == 1
    assert stats.failures[0][0] == victim[1] and stats.failures[0][1]
    expected = sum(p in patients.test for p in manifest.column("patient_id").to_pylist())
    tiles = _epoch(data.datasets["test"], columns=("tile_id",))["tile_id"]
    assert data.num_rows["test"] == len(tiles) == expected - 1
    assert victim[0] not in set(tiles)


def test_missing_data_and_unknown_split_fail_with_the_place(dest: str, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="manifest"):
        build_datasets(
            PreparedDest.open(str(tmp_path / "nothing")), SPLIT, IngestConfig(image_size=SIZE)
        )
    with pytest.raises(ValueError, match="fold:7"):
        build_datasets(
            PreparedDest.open(dest), SplitSpec.parse("fold:7"), IngestConfig(image_size=SIZE)
        )


# ------------------------------------------------------------------------- stored pixels


@pytest.fixture(scope="module")
def stored_dest(dest: str) -> str:
    """The same generated tiles prepared again, with pixels stored at SIZE."""
    from breakhis.data.prepare import PrepareConfig, prepare

    root = dest.rsplit("/", 1)[0]
    prepare(
        PrepareConfig(
            src=f"{root}/raw",
            dest=f"{root}/prepared-pixels",
            folds=3,
            shard_mb=0.03,
            row_group_rows=8,
            pixels=(SIZE,),
        )
    )
    return f"{root}/prepared-pixels"


def test_stored_pixels_are_the_decoded_pixels_and_are_never_decoded_again(
    dest: str, stored_dest: str, caplog
) -> None:
    import logging

    config = IngestConfig(image_size=SIZE, oversample=True, seed=5)
    with caplog.at_level(logging.INFO, logger="breakhis.data.ingest"):
        stored = build_datasets(PreparedDest.open(stored_dest), SPLIT, config)
    assert f"ingest reads stored {SIZE}x{SIZE} pixels" in caplog.text
    decoded = build_datasets(PreparedDest.open(dest), SPLIT, config)
    assert stored.num_rows == decoded.num_rows and stored.class_counts == decoded.class_counts
    # Same tiles, same pixels, bit for bit: unaugmented (val, test) and augmented (train).
    for side in ("val", "test"):
        assert _by_tile(_epoch(stored.datasets[side])) == _by_tile(_epoch(decoded.datasets[side]))
    assert _by_tile(_epoch(stored.datasets["train"])) == _by_tile(_epoch(decoded.datasets["train"]))
    assert decoded.decode_stats().decoded == sum(decoded.num_rows.values()) - (
        decoded.num_rows["train"] - sum(decoded.class_counts)  # oversampled copies
    )
    # Not one PNG decoded: at build (the cache), in later epochs, or streaming.
    _epoch(stored.datasets["train"], columns=("label",))
    streaming = build_datasets(
        PreparedDest.open(stored_dest), SPLIT, IngestConfig(image_size=SIZE, cache=False)
    )
    first = _epoch(streaming.datasets["val"])
    assert _by_tile(first) == _by_tile(_epoch(decoded.datasets["val"]))
    _epoch(streaming.datasets["train"], columns=("label",))
    assert stored.decode_stats().decoded == streaming.decode_stats().decoded == 0


def test_a_size_not_stored_or_a_lost_pixel_file_decodes_and_says_so(
    stored_dest: str, caplog
) -> None:
    import logging

    other = SIZE - 8
    with caplog.at_level(logging.INFO, logger="breakhis.data.ingest"):
        data = build_datasets(
            PreparedDest.open(stored_dest), SPLIT, IngestConfig(image_size=other), sides=("train",)
        )
    assert f"ingest decodes PNGs to {other}x{other} (stored pixel sizes: {SIZE};" in caplog.text
    assert data.decode_stats().decoded == data.num_rows["train"]

    victim = next(storage.walk(storage.join(stored_dest, "pixels", str(SIZE)))).uri
    kept = storage.read_bytes(victim)
    storage.delete(victim)
    try:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="breakhis.data.ingest"):
            data = build_datasets(
                PreparedDest.open(stored_dest),
                SPLIT,
                IngestConfig(image_size=SIZE),
                sides=("train",),
            )
        assert "stored pixel file(s) at 32 px missing" in caplog.text
        assert f"ingest decodes PNGs to {SIZE}x{SIZE}" in caplog.text
        assert data.decode_stats().decoded == data.num_rows["train"]
    finally:
        storage.write_bytes(victim, kept)


def test_scoring_reads_a_prepared_dests_stored_pixels_instead_of_decoding(
    dest: str, stored_dest: str, monkeypatch
) -> None:
    """predict.decode_tiles (score, evaluate) on tiles of prepared shards: stored pixels
    at the model's size, the very pixels a decode gives; PNGs at any other size."""
    from breakhis.data import imaging
    from breakhis.score import predict

    decodes: list[int] = []
    original = imaging.decode_rgb

    def counted(data, size=None):
        decodes.append(size)
        return original(data, size)

    monkeypatch.setattr(imaging, "decode_rgb", counted)

    def batch(prepared: str) -> dict[str, np.ndarray]:
        shards = [e.uri for e in storage.walk(storage.join(prepared, "shards"))][:2]
        rows = [
            (uri, tile, shard)
            for shard in shards
            for uri, tile in zip(
                *pq.read_table(storage.resolve(shard)[1], filesystem=storage.resolve(shard)[0])
                .select(["uri", "tile_id"])
                .to_pydict()
                .values(),
                strict=True,
            )
        ]
        uri, tile, shard = (np.asarray(c, dtype=object) for c in zip(*rows, strict=True))
        return {"uri": uri, "tile_id": tile, "unit": tile, "shard": shard}

    geometry = TileGeometry(size=SIZE)
    plain = predict.decode_tiles(batch(dest), geometry=geometry)
    assert decodes == [None] * len(plain["uri"]) and set(plain["error"]) == {""}
    decodes.clear()
    stored = predict.decode_tiles(batch(stored_dest), geometry=geometry)
    assert decodes == [] and set(stored["error"]) == {""}
    by_tile = dict(zip(plain["tile_id"], plain["image"], strict=True))
    for tile, image in zip(stored["tile_id"], stored["image"], strict=True):
        np.testing.assert_array_equal(image, by_tile[tile])
    other = predict.decode_tiles(batch(stored_dest), geometry=TileGeometry(size=SIZE - 8))
    assert decodes == [None] * len(other["uri"])
    assert other["image"].shape[1:] == (SIZE - 8, canonical_width(SIZE - 8), 3)
    # A squashing model never reads the stored (aspect-kept) pixels.
    decodes.clear()
    square = predict.decode_tiles(
        batch(stored_dest), geometry=TileGeometry(size=SIZE, geometry="square")
    )
    assert decodes == [None] * len(square["uri"]) and square["image"].shape[1:] == (SIZE, SIZE, 3)


# ------------------------------------------------------------------- streaming without cache


def test_the_cache_is_chosen_from_the_data_size_and_streaming_mixes_patients(
    dest: str,
) -> None:
    from breakhis.data.ingest import CACHE_FRACTION, choose_cache, shuffle_buffer_rows

    assert choose_cache(40, 100) and not choose_cache(int(CACHE_FRACTION * 100) + 1, 100)
    auto = build_datasets(
        PreparedDest.open(dest), SPLIT, IngestConfig(image_size=SIZE), sides=("train",)
    )
    assert auto.config.cache is True  # 78 tiny tiles fit
    # Cached: each epoch's pools mix the cache's blocks, no local buffer.
    assert auto.shuffle_buffer == 0
    assert auto.decode_stats().decoded == auto.num_rows["train"]

    streaming = build_datasets(
        PreparedDest.open(dest), SPLIT, IngestConfig(image_size=SIZE, cache=False), sides=("train",)
    )
    assert streaming.config.cache is False and streaming.decode_stats().decoded == 0
    assert streaming.shuffle_buffer == shuffle_buffer_rows(SIZE) >= 4 * 64
    train = streaming.datasets["train"].select_columns(["patient_id"])

    def patients_per_batch(buffer: int | None) -> float:
        counts = [
            len(set(batch["patient_id"]))
            for batch in train.iter_batches(
                batch_size=8,
                batch_format="numpy",
                local_shuffle_buffer_size=buffer,
                local_shuffle_seed=0 if buffer else None,
                drop_last=True,
            )
        ]
        return float(np.mean(counts))

    # A read block is a shard of a few patients (shards hold patients in name order).
    blockwise, buffered = patients_per_batch(None), patients_per_batch(streaming.shuffle_buffer)
    assert buffered >= blockwise + 1.0, (blockwise, buffered)


_STREAM_CHILD = """
import json, sys
import numpy as np, ray
from ray.data import DataContext
from breakhis.data.dest import PreparedDest
from breakhis.data.ingest import IngestConfig, build_datasets
from breakhis.data.prepare import PrepareConfig, prepare
from breakhis.data.splits import SplitSpec
from breakhis.synth.dataset import synthesize

root, size = sys.argv[1], int(sys.argv[2])
ray.init(address="local", num_cpus=2, object_store_memory=100 * 1024**2,
         include_dashboard=False, configure_logging=False, log_to_driver=False)
DataContext.get_current().enable_progress_bars = False
synthesize(f"{root}/raw", scale=0.05, seed=0, width=64, height=42, workers=1)
prepare(PrepareConfig(src=f"{root}/raw", dest=f"{root}/prepared", shard_mb=0.25,
                      row_group_rows=16, pixels=(size,)))
split = SplitSpec.parse("fold:0", val_fraction=0.0)
data = build_datasets(PreparedDest.open(f"{root}/prepared"), split, IngestConfig(image_size=size), sides=("train",))
ds = data.datasets["train"].select_columns(["image", "patient_id"])
rows, mixes = 0, []
for batch in ds.iter_batches(batch_size=32, batch_format="numpy",
                             local_shuffle_buffer_size=data.shuffle_buffer):
    rows += len(batch["image"])
    mixes.append(len(set(batch["patient_id"])))
stats = ds.stats()
cached = build_datasets(PreparedDest.open(f"{root}/prepared"), split, IngestConfig(image_size=size, cache=True),
                        sides=("train",))
print(json.dumps({"cache": data.config.cache, "rows": rows, "expected": data.num_rows["train"],
                  "decoded_gib": rows * 3 * size * size / 1024**3,
                  "streamed_spilled": "Spilled to disk" in stats,
                  "cached_spilled": "Spilled to disk" in cached.datasets["train"].stats(),
                  "patients_per_batch": float(np.mean(mixes))}))
"""


@pytest.mark.slow
def test_a_data_set_larger_than_the_object_store_streams_without_spilling(tmp_path) -> None:
    """Own Ray with a 100 MiB object store, ~1.8x that many decoded training tiles (314,
    stored at 448 px): the automatic choice streams, every tile arrives, and nothing
    overflows to disk; the cache of the same data would (the check can fail)."""
    import json
    import subprocess
    import sys

    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, "-c", _STREAM_CHILD, str(tmp_path), "448"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["cache"] is False, result
    # Half as much again as the object store holds (100 MiB = 0.098 GiB).
    assert result["rows"] == result["expected"] and result["decoded_gib"] > 0.15, result
    assert not result["streamed_spilled"] and result["cached_spilled"], result
    assert result["patients_per_batch"] >= 3, result
