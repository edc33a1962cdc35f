"""Test-only fault injection: storage errors and worker deaths on chosen tiles, so the tests
can prove how a job behaves under faults that a real store and real data rarely produce on
demand (a throttled S3, a tile whose decoder kills its process).

Inert unless one of its environment variables is set; nothing in the package sets them, and
the tests set them only for the process (or the Ray job, through its runtime environment)
they exercise. Reading them costs one dictionary lookup per call.

- ``BREAKHIS_TEST_READ_FAULTS``: JSON ``{"<part of a URI>": "<kind>"}`` or
  ``{"<part>": ["<kind>", <times>]}``: breakhis.storage.read_bytes raises, for every URI
  containing the part (the first ``times`` reads of this process; always without it), the
  OSError the S3 SDK raises for ``kind``: ``slowdown`` (HTTP 503), ``unreachable`` (no
  answer) or ``denied`` (HTTP 403).
- ``BREAKHIS_TEST_KILL_ON``: ``decode:<tile id>`` or ``score:<tile id>``: the process that
  is about to decode (breakhis.data.tile_decode.decode_tiles) or score (TilePredictor) that tile
  exits at once (``os._exit``), as a segfaulting decoder or an OOM kill would.
"""

from __future__ import annotations

import json
import os
from collections import Counter

READ_FAULTS_ENV = "BREAKHIS_TEST_READ_FAULTS"
KILL_ENV = "BREAKHIS_TEST_KILL_ON"

# What pyarrow's S3 filesystem says for each kind (the text, as breakhis.storage classifies it).
_MESSAGES = {
    "slowdown": "AWS Error UNKNOWN (HTTP status 503) during GetObject operation: "
    "Please reduce your request rate.",
    "unreachable": "AWS Error NETWORK_CONNECTION during HeadObject operation: "
    "curlCode: 7, Couldn't connect to server",
    "denied": "AWS Error ACCESS_DENIED during HeadObject operation: No response body.",
}
_raised: Counter[str] = Counter()


def before_read(uri: str) -> None:
    """Raise the injected OSError for ``uri``, if any (module docstring)."""
    spec = os.environ.get(READ_FAULTS_ENV)
    if not spec:
        return
    for part, rule in json.loads(spec).items():
        if part not in uri:
            continue
        kind, times = (rule, None) if isinstance(rule, str) else rule
        if times is not None and _raised[uri] >= times:
            return
        _raised[uri] += 1
        raise OSError(f"When reading information for key {uri!r} (injected): {_MESSAGES[kind]}")


def before(stage: str, tile_ids) -> None:
    """Exit the process at once when one of ``tile_ids`` is the one to die on at ``stage``
    (``decode`` or ``score``)."""
    target = os.environ.get(KILL_ENV)
    if target and target.startswith(f"{stage}:"):
        victim = target[len(stage) + 1 :]
        if any(str(tile_id) == victim for tile_id in tile_ids):
            os._exit(77)
