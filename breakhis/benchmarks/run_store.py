"""The accuracy benchmark's finished runs, one JSON file each, so that a long comparison
survives a stop and spans sessions: a rerun with the same options loads a run that is done
instead of training it again.

A run is one side (the reference loop or a variant of the job) on one split with one seed.
Its RunKey holds everything that changes its result (the side and what defines it, the
split, the seed, the shared training options and the prepared manifest's hash); the file is
named by the side, split, seed and a hash of the whole key, and holds the key beside the
result, so a file is only reused for the very same key. Options that do not change a result
(the workdir, the CPUs, the other splits, seeds and variants) are not in the key. A change of
the code is not either: start a fresh workdir after one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from breakhis.benchmarks.accuracy_result import SideResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunKey:
    """What one run's result depends on."""

    side: str
    """``reference`` or the variant's name."""
    split: int
    """The manifest's repetition K (rep:K)."""
    seed: int
    recipe: dict[str, Any] = field(default_factory=dict)
    """What defines the side: the reference loop's name, or the variant's TrainConfig
    overrides."""
    options: dict[str, Any] = field(default_factory=dict)
    """The options both sides share (architecture, image size, epochs, batch size, lr)."""
    manifest: str = ""
    """breakhis.data.prepare.manifest_hash of the prepared data."""

    def digest(self) -> str:
        """A hash of the whole key (hex, 16 characters)."""
        text = json.dumps(asdict(self), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def file_name(self) -> str:
        """``SIDE-repK-seedS-HASH.json``."""
        return f"{self.side}-rep{self.split}-seed{self.seed}-{self.digest()}.json"


class RunStore:
    """Finished runs in a local folder; counts what it ran and what it loaded."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.computed = 0
        """Runs done in this session (and saved)."""
        self.resumed = 0
        """Runs loaded from an earlier session's file."""

    def path(self, key: RunKey) -> Path:
        """Where the run of ``key`` is (or will be) saved."""
        return self.folder / key.file_name()

    def load(self, key: RunKey) -> SideResult | None:
        """The saved result of ``key``, or None when it was not saved (or the file holds
        another key, or is unreadable: the run is then done again)."""
        path = self.path(key)
        try:
            saved = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            log.warning("%s: unreadable (%s); running it again", path, err)
            return None
        if saved.get("key") != json.loads(json.dumps(asdict(key), default=str)):
            log.warning("%s: holds another run's key; running it again", path)
            return None
        return SideResult(**saved["result"])

    def save(self, key: RunKey, result: SideResult) -> Path:
        """Write ``result`` under ``key`` (atomically: a stop leaves no half file). Returns
        the file's path."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        partial = path.with_suffix(".json.partial")
        body = {"key": asdict(key), "result": asdict(result)}
        partial.write_text(json.dumps(body, indent=2, default=str))
        os.replace(partial, path)
        return path

    def get_or_run(self, key: RunKey, run: Callable[[], SideResult]) -> SideResult:
        """The saved result of ``key``, else ``run()``'s, saved as soon as it returns."""
        saved = self.load(key)
        if saved is not None:
            log.info("%s: done in an earlier run, loaded", self.path(key).name)
            self.resumed += 1
            return saved
        result = run()
        self.save(key, result)
        self.computed += 1
        return result
