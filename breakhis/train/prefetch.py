"""The training batches of one epoch after another, the next epoch's first batches fetched
while the current epoch ends.

Ray Data starts an execution per epoch: on the worker, the first batch of every epoch waits
for it (0.1-0.15 s on the 2-core CPU machines, a whole pool of tiles; more on a GPU node, where
an epoch is a few seconds). ``EpochPrefetcher`` iterates each epoch's source in a background
thread and, as soon as one epoch's source is exhausted (the caller still has its last batches
to train on, then BatchNorm recalibration, validation and the checkpoint), opens the next
epoch's and fetches its first ``depth`` batches, so that wait overlaps with the end of the
previous epoch. What an epoch contains does not change: the same source, opened with the same
epoch number, in the same order (Ray Data's execution counter, which numbers the epochs for
the augmentation draws, counts the same executions).

It is also the worker's only look-ahead within an epoch: the job iterates Ray Data with
``prefetch_batches=0`` (breakhis.train.loop.training_batches), because Ray's own window hands
a block on only once the next one has arrived, so each pool of tiles reached the worker one
pool late and an epoch of two or three pools gave its first batch only when the whole epoch
had been made. ``lookahead_batches`` sizes ``depth`` to about one pool of bytes instead; the
batches of a cached epoch are views of its blocks in the object store, so looking ahead holds
those blocks, not copies.

On a GPU the same thread copies each batch to the device (``DeviceTransfer``): through
page-locked memory on a CUDA stream of its own, so the copy of the next batches overlaps the
step on the current one instead of queueing behind it on the default stream; the caller's
stream waits for a batch's copy (a CUDA event) only when it takes the batch.

    prefetcher = EpochPrefetcher(lambda e: training_batches(shard, ..., epoch=e), first=1, last=E)
    try:
        for epoch in range(1, E + 1):
            for batch in prefetcher.batches(epoch):
                ...
    finally:
        prefetcher.close()      # early stop: the next epoch's source is closed, not drained
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

log = logging.getLogger(__name__)
_DONE = object()
_JOIN_S = 10.0
LOOKAHEAD_BYTES = 256 * 1024**2
"""Bytes of batches fetched ahead of the training step: about one mixing pool of tiles
(breakhis.data.ingest.SHUFFLE_BUFFER_BYTES), time enough to pull the next block from another
node while the step trains on this one."""
MOST_BATCHES_AHEAD = 16


def lookahead_batches(batch_bytes: int) -> int:
    """EpochPrefetcher's ``depth`` for batches of ``batch_bytes`` bytes: LOOKAHEAD_BYTES of
    them, at least 2 and at most MOST_BATCHES_AHEAD (4 batches of 256 tiles at 224 x 341)."""
    if batch_bytes < 1:
        raise ValueError(f"batch_bytes must be >= 1, got {batch_bytes}")
    return max(2, min(MOST_BATCHES_AHEAD, LOOKAHEAD_BYTES // batch_bytes))


class _InFlight:
    """A batch whose copy to the GPU was queued on DeviceTransfer's stream, and the event that
    marks its end."""

    def __init__(self, batch: dict[str, Any], event: torch.cuda.Event) -> None:
        self.batch, self.event = batch, event


class DeviceTransfer:
    """Moves batches (mappings of tensors) to ``device``: ``send`` in the fetching thread,
    ``receive`` in the thread that uses them. On the CPU both return the batch as it is. On a
    CUDA device ``send`` copies each tensor into page-locked memory and from there to the
    device on a stream of its own, without waiting; ``receive`` makes the caller's current
    stream wait for that copy and records the tensors as used on it (so the caching
    allocator does not reuse their memory while the caller's kernels still read it)."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if cuda else None

    def send(self, batch: Any) -> Any:
        if self._stream is None:
            return batch
        with torch.cuda.stream(self._stream):
            moved = {
                key: value.pin_memory().to(self.device, non_blocking=True)
                if isinstance(value, torch.Tensor)
                else value
                for key, value in batch.items()
            }
            event = torch.cuda.Event()
            event.record(self._stream)
        return _InFlight(moved, event)

    def receive(self, item: Any) -> Any:
        if not isinstance(item, _InFlight):
            return item
        current = torch.cuda.current_stream(self.device)
        current.wait_event(item.event)
        for value in item.batch.values():
            if isinstance(value, torch.Tensor):
                value.record_stream(current)
        return item.batch


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class EpochPrefetcher:
    """Batches of epochs ``first``..``last`` from ``open_epoch(epoch)`` (an iterable of one
    epoch's batches), fetched by one background thread at most ``depth`` batches ahead of the
    caller, the next epoch opened as soon as the current one's source is exhausted.

    batches(epoch) must be asked in order, each epoch once; an error of a source is raised by
    batches() of its epoch, in the caller's thread. close() stops the thread and closes the
    source it holds (call it when training stops early, or fails). ``transfer`` (a
    DeviceTransfer) moves each batch to its device as it is fetched."""

    def __init__(
        self,
        open_epoch: Callable[[int], Iterable[Any]],
        *,
        first: int,
        last: int,
        depth: int = 2,
        transfer: DeviceTransfer | None = None,
    ) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if last < first:
            raise ValueError(f"no epochs: first {first} > last {last}")
        self._open = open_epoch
        self._first, self._last, self._depth = first, last, depth
        self._queues: dict[int, deque[Any]] = {e: deque() for e in range(first, last + 1)}
        self._changed = threading.Condition()
        self._next = first
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._transfer = transfer

    def batches(self, epoch: int) -> Iterator[Any]:
        """An iterator over the batches of ``epoch``; it raises what the epoch's source raised.
        Raises ValueError when ``epoch`` is not the next in order, RuntimeError after close()."""
        if epoch != self._next:
            raise ValueError(f"epoch {epoch} asked; the next epoch is {self._next}")
        if self._stopped:
            raise RuntimeError("the prefetcher is closed")
        self._next += 1
        if self._thread is None:
            self._thread = threading.Thread(target=self._fetch, name="epoch-prefetch", daemon=True)
            self._thread.start()
        return self._drain(self._queues[epoch])

    def close(self) -> None:
        """Stop fetching and close the source being read (waits up to _JOIN_S for the thread).
        Idempotent."""
        with self._changed:
            self._stopped = True
            self._changed.notify_all()
        if self._thread is not None:
            # A source blocked in Ray (a worker of the group gone) must not hold up the worker's
            # exit: the thread is a daemon and ends with the process.
            self._thread.join(timeout=_JOIN_S)
            if self._thread.is_alive():
                log.warning("the epoch prefetch thread did not stop within %.0f s", _JOIN_S)

    def _drain(self, batches: deque[Any]) -> Iterator[Any]:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: batches or self._stopped)
                if not batches:
                    raise RuntimeError("the prefetcher was closed during an epoch")
                item = batches.popleft()
                self._changed.notify_all()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item if self._transfer is None else self._transfer.receive(item)

    def _put(self, batches: deque[Any], item: Any) -> bool:
        """Queue ``item`` once fewer than ``depth`` batches wait (the end marker and a failure
        at once: the next epoch opens without waiting); False when closed."""
        with self._changed:
            if item is not _DONE and not isinstance(item, _Failure):
                self._changed.wait_for(lambda: len(batches) < self._depth or self._stopped)
            if self._stopped:
                return False
            batches.append(item)
            self._changed.notify_all()
            return True

    def _fetch(self) -> None:
        for epoch in range(self._first, self._last + 1):
            batches = self._queues[epoch]
            source: Iterator[Any] | None = None
            try:
                source = iter(self._open(epoch))
                for batch in source:
                    sent = batch if self._transfer is None else self._transfer.send(batch)
                    if not self._put(batches, sent):
                        return
            except BaseException as error:  # noqa: BLE001 - handed to the caller's thread
                self._put(batches, _Failure(error))
                return
            finally:
                close = getattr(source, "close", None)
                if close is not None:
                    close()
            if not self._put(batches, _DONE):
                return
