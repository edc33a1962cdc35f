"""The benchmark harness: what every benchmark needs beside its own measurement (the
device's name, the memory of a process tree, generated and prepared data, a local Ray instance,
and the result files next to the run)."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from breakhis import storage

SAMPLE_EVERY_S = 0.2
"""How often peak_memory samples the process tree."""


def device_name(gpus: int = 0) -> str:
    """What the figures were measured on: the first CUDA GPU's name when ``gpus`` > 0, the
    CPU's model name and core count otherwise (Linux /proc; a generic name elsewhere)."""
    if gpus:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)} x{gpus}"
        return f"GPU cluster ({gpus} GPUs)"
    cores = os.cpu_count() or 1
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({cores} cores)"
    except OSError:
        pass
    return f"CPU ({cores} cores)"


def _children() -> dict[int, list[int]]:
    """{parent pid: child pids} of every process visible in /proc."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # ended meanwhile
            continue
        tree.setdefault(parent, []).append(int(entry))
    return tree


def _pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # ended meanwhile, or not ours to read
        pass
    return 0


def tree_pss(root: int, exclude: frozenset[int] = frozenset()) -> int:
    """Proportional set size in bytes (shared pages split between the processes that map
    them) summed over process ``root`` and its descendants, skipping the subtrees of the
    ``exclude`` pids. Linux /proc; 0 elsewhere."""
    if not os.path.isdir("/proc"):
        return 0
    tree = _children()
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        if pid in exclude:
            continue
        total += _pss(pid)
        stack.extend(tree.get(pid, ()))
    return total


@contextmanager
def peak_memory(
    root: int | None = None, exclude: frozenset[int] = frozenset()
) -> Iterator[list[int]]:
    """Sample tree_pss(``root``, default this process) in a thread while the block runs;
    yields a one-item list holding the peak in bytes so far (final when the block ends)."""
    pid = os.getpid() if root is None else root
    peak = [tree_pss(pid, exclude)]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(SAMPLE_EVERY_S):
            peak[0] = max(peak[0], tree_pss(pid, exclude))

    thread = threading.Thread(target=sample, name="pss-sampler", daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], tree_pss(pid, exclude))


def pillow_decode(data: bytes, side: int) -> np.ndarray:
    """A tile decoded as a user's own loop would (Pillow; the pipeline's libspng is its own
    advantage) and resized as the pipeline resizes: RGB uint8 (side, side, 3). The plain
    loops' decode."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB").resize((side, side), Image.BILINEAR, reducing_gap=2.0)
        return np.asarray(image)


def prepared_dest(workdir: str, *, scale: float, side: int, seed: int) -> str:
    """Where prepared_data() puts the data of these arguments (the prepared DEST)."""
    return os.path.join(os.path.abspath(workdir), f"data-{scale:g}-{side}px-seed{seed}", "prepared")


def prepared_data(workdir: str, *, scale: float, side: int, seed: int) -> str:
    """Generated tiles of ``side`` x ``side`` px, prepared, in a folder of ``workdir`` named by
    the arguments (made once, then reused by later runs; needs Ray). Returns the prepared
    DEST, prepared_dest() of the same arguments."""
    from breakhis.data.prepare import PrepareConfig, prepare
    from breakhis.synth.dataset import synthesize

    dest = prepared_dest(workdir, scale=scale, side=side, seed=seed)
    root = os.path.dirname(dest)
    if not os.path.exists(os.path.join(dest, "manifest.parquet")):
        synthesize(os.path.join(root, "raw"), scale=scale, seed=seed, width=side, height=side)
        prepare(PrepareConfig(src=os.path.join(root, "raw"), dest=dest))
    return dest


def start_local_ray(cpus: int) -> None:
    """A local Ray instance of ``cpus`` CPUs, unless Ray is already initialised here (then the
    benchmark measures on that cluster)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, configure_logging=False)


def save_result(workdir: str, name: str, figures: dict[str, Any], table: str) -> None:
    """Write ``benchmark-NAME.json`` (the figures) and ``benchmark-NAME.md`` (the table)
    into ``workdir``."""
    stem = os.path.join(workdir, f"benchmark-{name}")
    storage.write_bytes(f"{stem}.json", json.dumps(figures, indent=2).encode())
    storage.write_bytes(f"{stem}.md", (table + "\n").encode())
