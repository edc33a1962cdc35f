"""breakhis.train.prefetch: every epoch's batches, in order, each epoch opened once and while
the previous epoch's last batches are still being trained on; errors and early stops."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from breakhis.train.prefetch import (
    LOOKAHEAD_BYTES,
    DeviceTransfer,
    EpochPrefetcher,
    lookahead_batches,
)


class Sources:
    """open_epoch for the prefetcher: epoch e gives batches (e, 0..n-1); records when each epoch
    was opened and what had been consumed by then, and closes."""

    def __init__(self, n: int, fail_at: tuple[int, int] | None = None) -> None:
        self.n, self.fail_at = n, fail_at
        self.consumed: list[tuple[int, int]] = []
        self.opened: list[tuple[int, int]] = []  # (epoch, batches consumed when opened)
        self.closed: list[int] = []
        self.lock = threading.Lock()

    def __call__(self, epoch: int):
        with self.lock:
            self.opened.append((epoch, len(self.consumed)))
        return self._epoch(epoch)

    def _epoch(self, epoch: int):
        try:
            for i in range(self.n):
                if (epoch, i) == self.fail_at:
                    raise OSError(f"block of epoch {epoch} lost")
                yield (epoch, i)
        finally:
            self.closed.append(epoch)

    def consume(self, batch: tuple[int, int]) -> None:
        with self.lock:
            self.consumed.append(batch)


def _wait_for(condition, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_every_epoch_in_order_and_the_next_opened_before_the_current_ends() -> None:
    sources = Sources(n=6)
    prefetcher = EpochPrefetcher(sources, first=3, last=5, depth=2)
    try:
        for epoch in (3, 4, 5):
            batches = prefetcher.batches(epoch)
            for i, batch in enumerate(batches):
                if epoch < 5 and i == 4:  # two batches left of this epoch
                    _wait_for(lambda e=epoch: any(o == e + 1 for o, _ in sources.opened))
                sources.consume(batch)
    finally:
        prefetcher.close()
    assert sources.consumed == [(e, i) for e in (3, 4, 5) for i in range(6)]
    assert [e for e, _ in sources.opened] == [3, 4, 5]  # each once, never past the last
    # Epoch 4 opened while epoch 3 had batches left to train on: before its 6th was consumed.
    assert dict(sources.opened)[4] < 6 and dict(sources.opened)[5] < 12
    assert sources.closed == [3, 4, 5]


def test_fetches_at_most_depth_batches_ahead() -> None:
    pulled: list[int] = []

    def source(epoch: int):
        for i in range(10):
            pulled.append(i)
            yield i

    prefetcher = EpochPrefetcher(source, first=1, last=1, depth=2)
    try:
        batches = prefetcher.batches(1)
        assert next(batches) == 0
        time.sleep(0.3)
        # One taken, two queued (depth), one more pulled and waiting for room.
        assert len(pulled) <= 4
        assert list(batches) == list(range(1, 10))
    finally:
        prefetcher.close()


def test_a_source_error_is_raised_by_its_epoch_in_the_callers_thread() -> None:
    sources = Sources(n=4, fail_at=(2, 1))
    prefetcher = EpochPrefetcher(sources, first=1, last=3)
    try:
        assert list(prefetcher.batches(1)) == [(1, i) for i in range(4)]
        batches = prefetcher.batches(2)
        assert next(batches) == (2, 0)
        with pytest.raises(OSError, match="block of epoch 2 lost"):
            next(batches)
    finally:
        prefetcher.close()
    assert [e for e, _ in sources.opened] == [1, 2]  # nothing opened after the failure


def test_close_after_an_early_stop_closes_the_prefetched_epoch() -> None:
    sources = Sources(n=50)
    prefetcher = EpochPrefetcher(sources, first=1, last=9)
    assert len(list(prefetcher.batches(1))) == 50
    _wait_for(lambda: [e for e, _ in sources.opened] == [1, 2])
    started = time.monotonic()
    prefetcher.close()
    assert time.monotonic() - started < 2.0
    assert sources.closed == [1, 2] and [e for e, _ in sources.opened] == [1, 2]
    with pytest.raises(RuntimeError, match="closed"):
        prefetcher.batches(2)


def test_refuses_epochs_out_of_order_and_bad_arguments() -> None:
    prefetcher = EpochPrefetcher(Sources(n=1), first=1, last=2)
    with pytest.raises(ValueError, match="epoch 2 asked; the next epoch is 1"):
        prefetcher.batches(2)
    prefetcher.close()
    with pytest.raises(ValueError, match="depth"):
        EpochPrefetcher(Sources(n=1), first=1, last=2, depth=0)
    with pytest.raises(ValueError, match="no epochs"):
        EpochPrefetcher(Sources(n=1), first=3, last=2)


def test_lookahead_is_about_one_pool_of_bytes_within_bounds() -> None:
    tile = 3 * 224 * 341  # a canonical 224 px tile
    assert lookahead_batches(256 * tile) == 4  # 4 x 58.7 MB <= 256 MiB < 5 x
    assert lookahead_batches(64 * tile) == 16  # capped
    assert lookahead_batches(32 * 3 * 64 * 97) == 16
    assert lookahead_batches(LOOKAHEAD_BYTES) == 2  # at least two
    assert lookahead_batches(10 * LOOKAHEAD_BYTES) == 2
    with pytest.raises(ValueError, match="batch_bytes"):
        lookahead_batches(0)


class RecordingTransfer:
    """A transfer that tags each batch and records which thread sent and received it."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, object]] = []
        self.received: list[tuple[str, object]] = []

    def send(self, batch):
        self.sent.append((threading.current_thread().name, batch))
        return ("sent", batch)

    def receive(self, item):
        tag, batch = item
        assert tag == "sent"
        self.received.append((threading.current_thread().name, batch))
        return batch


def test_a_transfer_sends_in_the_fetching_thread_and_receives_in_the_callers() -> None:
    sources, transfer = Sources(n=3), RecordingTransfer()
    prefetcher = EpochPrefetcher(sources, first=1, last=2, depth=2, transfer=transfer)
    try:
        got = [b for e in (1, 2) for b in prefetcher.batches(e)]
    finally:
        prefetcher.close()
    expected = [(e, i) for e in (1, 2) for i in range(3)]
    assert got == expected
    assert [b for _, b in transfer.sent] == expected
    assert {name for name, _ in transfer.sent} == {"epoch-prefetch"}
    assert [b for _, b in transfer.received] == expected
    assert {name for name, _ in transfer.received} == {threading.current_thread().name}


def test_on_the_cpu_a_device_transfer_hands_the_batch_on_as_it_is() -> None:
    transfer = DeviceTransfer("cpu")
    batch = {"image": torch.arange(6, dtype=torch.uint8), "label": torch.tensor([0, 1])}
    assert transfer.receive(transfer.send(batch)) is batch
