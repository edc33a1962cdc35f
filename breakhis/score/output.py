"""The scoring job's output folder: one job per output, and unit files written exactly once.

**One job per output.** A job claims its output before any work, in three steps:

1. it writes ``_claims/<token>.json`` (its record and a token unique to this run);
2. it creates ``_job.json`` (the record) *exclusively*: locally a hard link of a complete
   temp file (``os.link`` fails when the name exists), on S3 a conditional PUT
   (``If-None-Match: *``, honoured by AWS S3 and SeaweedFS: a second PUT gets 412). When
   ``_job.json`` is already there, its record must equal this job's (a rerun), else the
   job is refused (JobMismatchError, naming the differences);
3. it lists ``_claims/``: any other live claim, whatever its record, means another job is
   running on the output (or claiming it right now); the job withdraws its claim, waits a
   random moment and claims again, and is refused when the rival is still there after a few
   tries. Two jobs with the same options are rivals too: each plans from its own listing of
   the input, so while the input grows they would write different units into one output.

Step 3 is what keeps a store without exclusive creates safe (an S3 server that answers
501 to the condition; ``conditional=False`` does the same): there it comes before step 2,
and ``_job.json`` is written only by a claimer that saw no rival claim. Of two claimers
the one that lists last sees the other's claim (S3 lists are strongly consistent), so at
most one proceeds (both may be refused in a race; neither leaves a claim behind). Before
``_SUCCESS`` the job checks the claim again (``verify_claim``: ``_job.json`` still holds
its record and its claim is there) and the scoring job checks that every row
carries its ``model_id``. A claim is removed when its job ends (``release_claim``). A
running job rewrites its claim every CLAIM_REFRESH_S (``keeping_claim``, a thread, from the
claim to its release); a claim not rewritten for CLAIM_DEAD_S is a dead job's (a killed
driver's): no rival any more, and the next job deletes it with that job's plan
(``sweep_dead_jobs``). Ages are measured on the store's clock (against the claimer's own
claim, just written), never the local one. A job whose claim was deleted (it looked dead to
another job, e.g. through a long outage of the store) does not write it again, and fails
before ``_SUCCESS``.

**Unit files.** ``write_unit`` writes a whole file in one piece: locally a temp file
``.<name>.<token>.tmp`` beside it, then a rename; on S3 one PUT. ``unit_files`` lists the
complete units and deletes a temp file only when it is provably not being written: older
than STALE_TEMP_S (a write takes seconds), so a live job's temp file is never deleted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import threading
import time
import uuid
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.fs as pafs

from breakhis import storage
from breakhis.data.inputs import s3_client
from breakhis.names import CLASS_NAMES

log = logging.getLogger(__name__)

STALE_TEMP_S = 600.0
"""Age (s since last modified) past which a temp unit file belongs to no live writer."""
CLAIM_REFRESH_S = 15.0
"""Seconds between two rewrites of a running job's claim."""
CLAIM_DEAD_S = 120.0
"""Age (s since last rewritten, on the store's clock) past which a claim is a dead job's."""
CLAIMS = "_claims"


class JobMismatchError(ValueError):
    """The output already holds (or is being claimed by) a job with another model or other
    output-changing options."""


def new_token() -> str:
    """A token unique to one run of a job (names its claim and its temp files)."""
    return uuid.uuid4().hex


# --------------------------------------------------------------------------- the claim


def claim_output(output: str, record: dict, token: str, *, conditional: bool = True) -> None:
    """Claim ``output`` for the job of ``record`` (module docstring); ``conditional`` False
    skips the exclusive create's condition on S3 (what a server that ignores it does).

    Raises JobMismatchError when the output holds or is being claimed by another job.
    """
    claim = storage.join(output, CLAIMS, f"{token}.json")
    storage.write_bytes(claim, json.dumps({"token": token, "record": record}).encode())
    job_uri = storage.join(output, "_job.json")
    body = json.dumps(record, indent=2, sort_keys=True).encode()
    try:
        created = _create_exclusive(job_uri, body, token, conditional)
        if created is None:
            # No exclusive create here: only a claimer that saw no rival writes _job.json.
            _check_no_rival(output, record, token)
            if not storage.exists(job_uri):
                storage.write_bytes(job_uri, body)
            _check_same(output, job_uri, record)
            return
        if not created:
            _check_same(output, job_uri, record)
        _check_no_rival(output, record, token)
    except BaseException:
        release_claim(output, token)
        raise


def verify_claim(output: str, record: dict, token: str) -> None:
    """Check, before ``_SUCCESS``, that the output is still this job's. Raises
    JobMismatchError otherwise."""
    _check_same(output, storage.join(output, "_job.json"), record)
    if not storage.exists(storage.join(output, CLAIMS, f"{token}.json")):
        raise JobMismatchError(f"{output}: this job's claim {CLAIMS}/{token}.json is gone")


def refresh_claim(output: str, record: dict, token: str) -> None:
    """Rewrite this job's claim, so that its age says the job is alive."""
    claim = storage.join(output, CLAIMS, f"{token}.json")
    storage.write_bytes(claim, json.dumps({"token": token, "record": record}).encode())


def sweep_dead_jobs(output: str, token: str, plans: str = "_plan") -> None:
    """Delete the claims not rewritten for CLAIM_DEAD_S (their jobs were killed) and the plan
    folders ``<output>/<plans>/<token>`` of tokens without a live claim; ``token`` is this
    job's (its claim's age is the store's now)."""
    claims = claim_ages(output, token)
    live = {other for other, age in claims.items() if age <= CLAIM_DEAD_S}
    for other in sorted(set(claims) - live):
        storage.delete(storage.join(output, CLAIMS, f"{other}.json"))
    fs, path = storage.resolve(storage.join(output, plans))
    if not storage.is_s3(output):
        for entry in os.scandir(path) if os.path.isdir(path) else ():
            if entry.name not in live:
                shutil.rmtree(entry.path, ignore_errors=True)
        return
    selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
    for info in fs.get_file_info(selector):
        owner = info.path[len(path) + 1 :].split("/", 1)[0]
        if info.type == pafs.FileType.File and owner not in live:
            storage.delete(storage.to_uri(fs, info.path))


def claim_ages(output: str, token: str) -> dict[str, float]:
    """token -> seconds since its claim was last written, on the store's clock (against
    this job's own claim; the local clock when it is not there)."""
    fs, path = storage.resolve(storage.join(output, CLAIMS))
    selector = pafs.FileSelector(path, recursive=False, allow_not_found=True)
    modified = {
        info.base_name[: -len(".json")]: info.mtime.timestamp() if info.mtime else 0.0
        for info in fs.get_file_info(selector)
        if info.type == pafs.FileType.File and info.base_name.endswith(".json")
    }
    now = modified.get(token, time.time())
    return {other: now - when for other, when in modified.items()}


@contextlib.contextmanager
def keeping_claim(output: str, record: dict, token: str) -> Iterator[None]:
    """Rewrite this job's claim every CLAIM_REFRESH_S from a thread while the block runs, so
    that its age says the job is alive. A claim found deleted is not written again (another
    job judged this one dead; ``verify_claim`` then fails)."""
    stop = threading.Event()
    claim = storage.join(output, CLAIMS, f"{token}.json")

    def beat() -> None:
        while not stop.wait(CLAIM_REFRESH_S):
            try:
                if not storage.exists(claim):
                    log.error("%s was deleted: another job took this output over", claim)
                    return
                refresh_claim(output, record, token)
            except OSError as err:  # e.g. S3 away for a while: try again next time
                log.warning("could not refresh the output's claim: %s", err)

    thread = threading.Thread(target=beat, name="score-claim", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def release_claim(output: str, token: str) -> None:
    """Remove this job's claim (its record stays in ``_job.json``), and locally the claims
    folder when no other claim is left in it."""
    storage.delete(storage.join(output, CLAIMS, f"{token}.json"))
    if not storage.is_s3(output):
        with contextlib.suppress(OSError):  # another claim is there, or no folder
            os.rmdir(storage.join(storage.resolve(output)[1], CLAIMS))


def _create_exclusive(uri: str, body: bytes, token: str, conditional: bool) -> bool | None:
    """Create ``uri`` holding ``body`` unless it exists: True when this call created it,
    False when it existed, None when the store cannot create exclusively (nothing done)."""
    if storage.is_s3(uri):
        if storage.exists(uri):
            return False
        return _put_if_absent(uri, body) if conditional else None
    path = storage.resolve(uri)[1]
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}.{token}.tmp")
    with open(tmp, "wb") as out:
        out.write(body)
    try:
        os.link(tmp, path)  # atomic, complete, and fails when the name exists
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
    return True


def _put_if_absent(uri: str, body: bytes) -> bool | None:
    import botocore.exceptions

    bucket, key = uri[len("s3://") :].split("/", 1)
    try:
        s3_client().put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")
    except botocore.exceptions.ClientError as err:
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status in (409, 412):  # 412: it exists; 409: a concurrent conditional write
            return False
        if status == 501:  # the server does not implement conditions: the claims decide
            log.warning("%s: the S3 server refuses conditional writes; relying on %s", uri, CLAIMS)
            return None
        raise
    return True


def _check_same(output: str, job_uri: str, record: dict) -> None:
    try:
        previous = json.loads(storage.read_bytes(job_uri))
    except json.JSONDecodeError as err:
        raise JobMismatchError(
            f"{job_uri}: not valid JSON ({err}); delete it or pick another --out"
        ) from err
    differences = _differences(previous, record)
    if differences:
        raise JobMismatchError(
            f"{output} holds the output of another scoring job ("
            + "; ".join(differences)
            + "). Rerun with the same model and options to finish it, or pick another "
            "--out (or delete that output first)"
        )


def _check_no_rival(output: str, record: dict, token: str, tries: int = 6) -> None:
    """Return once a look at ``_claims/`` after this job's claim was written shows no rival
    (another live claim, whatever its record). After a look that shows one, withdraw the
    claim, wait a random 0.05-0.5 s and claim again (two claimers that keep seeing each other
    fall out of step); raise JobMismatchError after ``tries`` looks."""
    claim = storage.join(output, CLAIMS, f"{token}.json")
    for attempt in range(tries):
        if attempt:
            storage.write_bytes(claim, json.dumps({"token": token, "record": record}).encode())
        rival = _rival(output, record, token)
        if rival is None:
            return
        if attempt == tries - 1:
            uri, differences, age = rival
            raise JobMismatchError(
                f"{output} is being claimed by another scoring job ({uri}, written {age:.0f} s "
                "ago: " + "; ".join(differences) + "); one job at a time per output, even "
                f"with the same options. If no such job runs (it was killed), delete {uri} or "
                f"rerun once it is {CLAIM_DEAD_S:.0f} s old"
            )
        storage.delete(claim)
        time.sleep(random.uniform(0.05, 0.5))


def _rival(output: str, record: dict, token: str) -> tuple[str, list[str], float] | None:
    """(URI, differences, age in s) of another live claim (module docstring), or None."""
    for other, age in sorted(claim_ages(output, token).items()):
        if other == token or age > CLAIM_DEAD_S:
            continue
        uri = storage.join(output, CLAIMS, f"{other}.json")
        try:
            rival = json.loads(storage.read_bytes(uri))["record"]
        except OSError:  # FileNotFoundError, or on S3 a read cut short by the delete
            if not storage.exists(uri):
                continue  # released meanwhile
            raise
        except (json.JSONDecodeError, KeyError, TypeError):
            rival = {}
        return uri, _differences(rival, record) or ["the same model and options"], age
    return None


def _differences(previous: dict, record: dict) -> list[str]:
    return [
        f"{key}: {previous.get(key)!r} there, {record.get(key)!r} now"
        for key in sorted(set(previous) | set(record))
        if previous.get(key) != record.get(key)
    ]


# --------------------------------------------------------------------------- unit files


def write_unit(uri: str, data: bytes, token: str) -> None:
    """Write one unit file in one piece (module docstring)."""
    fs, path = storage.resolve(uri)
    if isinstance(fs, pafs.S3FileSystem):
        storage.write_bytes(uri, data)  # one PUT: atomic by itself
        return
    folder, name = os.path.split(path)
    storage.replace_durably(os.path.join(folder, f".{name}.{token}.tmp"), path, data)


def unit_files(folder: str) -> set[str]:
    """Names of the complete unit files in ``folder``; temp files older than STALE_TEMP_S
    (left by a killed writer) are deleted, younger ones (maybe a live job's) kept. A local
    unit file without a Parquet footer (a crash of a machine whose writes had not reached the
    disk before write_unit fsynced them) is deleted, so its unit is scored again instead of
    blocking the output."""
    if not storage.exists(folder):
        return set()
    names, kept = set(), 0
    fs, path = storage.resolve(folder)
    now = time.time()
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=False)):
        name = info.base_name
        if name.startswith(".unit-") and name.endswith(".tmp"):
            modified = info.mtime.timestamp() if info.mtime else 0.0
            if now - modified > STALE_TEMP_S:
                storage.delete(storage.to_uri(fs, info.path))
            else:
                kept += 1
        elif name.startswith("unit-") and name.endswith(".parquet"):
            if isinstance(fs, pafs.LocalFileSystem) and not _has_footer(info.path, info.size):
                log.warning(
                    "%s: unit file %s is torn (no Parquet footer); rescoring it", folder, name
                )
                storage.delete(storage.to_uri(fs, info.path))
                continue
            names.add(name)
    if kept:
        log.info("%s: %d recent temp file(s) kept (maybe another job's write)", folder, kept)
    return names


def _has_footer(path: str, size: int | None) -> bool:
    """Whether a local file ends as a Parquet file does (its footer's magic ``PAR1``)."""
    if not size or size < 12:
        return False
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        return f.read(4) == b"PAR1"


# --------------------------------------------------------------------------- patients.parquet


PATIENT_SCHEMA = pa.schema(
    [
        ("patient_id", pa.string()),
        ("label", pa.int8()),  # true label from the names; null when unknown
        ("tiles", pa.int32()),  # input tiles of the patient
        ("scored", pa.int32()),
        ("errors", pa.int32()),
        ("mean_prob_malignant", pa.float32()),  # over scored tiles
        ("frac_predicted_malignant", pa.float32()),
        ("patient_call", pa.string()),  # "malignant" when mean_prob_malignant >= threshold
    ]
)
"""``patients.parquet``: one row per patient; null statistics when no tile of it scored."""


class PatientTotals:
    """Running per-patient totals over tile rows (any number of batches)."""

    def __init__(self) -> None:
        # patient -> [tiles, scored, sum of prob, tiles called malignant, known labels]
        self.by_patient: dict[str, list] = {}

    def add(self, tiles) -> None:
        """Add rows with patient_id, label, prob_malignant, predicted_label and error; rows
        without a patient id are skipped."""
        columns = [
            tiles.column(name).to_pylist()
            for name in ("patient_id", "label", "prob_malignant", "predicted_label", "error")
        ]
        for patient, label, prob, predicted, error in zip(*columns, strict=True):
            if patient is None:
                continue
            total = self.by_patient.setdefault(patient, [0, 0, 0.0, 0, set()])
            total[0] += 1
            if error is None:
                total[1] += 1
                total[2] += prob
                total[3] += predicted
            if label is not None:
                total[4].add(label)

    def table(self, threshold: float, rule: str) -> pa.Table:
        """PATIENT_SCHEMA rows, sorted by patient_id (patient_table's docstring)."""
        rows = []
        for patient in sorted(self.by_patient):
            tiles, scored, prob_sum, called, labels = self.by_patient[patient]
            mean = prob_sum / scored if scored else None
            share = called / scored if scored else None
            if mean is None:
                call = None
            else:
                call = CLASS_NAMES[int(mean >= threshold if rule == "mean" else share >= 0.5)]
            rows.append(
                {
                    "patient_id": patient,
                    "label": next(iter(labels)) if len(labels) == 1 else None,
                    "tiles": tiles,
                    "scored": scored,
                    "errors": tiles - scored,
                    "mean_prob_malignant": mean,
                    "frac_predicted_malignant": share,
                    "patient_call": call,
                }
            )
        return pa.Table.from_pylist(rows, schema=PATIENT_SCHEMA)


def patient_table(tiles: pa.Table, threshold: float, rule: str = "mean") -> pa.Table:
    """Per-patient summary (PATIENT_SCHEMA, sorted by patient_id) of tile rows.

    ``tiles`` needs patient_id, label, prob_malignant, predicted_label and
    error. The patient call follows ``rule`` (breakhis.stats.calibration.PATIENT_RULES):
    ``mean``, malignant when the mean probability of the patient's scored tiles
    is at least ``threshold``; ``majority``, when at least half of them are
    called malignant. The label is the true label when all the patient's names
    agree, else null.
    """
    totals = PatientTotals()
    totals.add(tiles)
    return totals.table(threshold, rule)
