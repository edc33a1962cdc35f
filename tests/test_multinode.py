"""Jobs on a real multi-node Ray cluster on this machine (breakhis.dev.localcluster: a head and
two worker nodes, each its own `ray start`), submitted through the Ray Jobs API the way the
README tells, with the embedded S3 server, and with faults injected mid-job:

- a worker node lost mid-job (its raylet and every process of it SIGKILLed);
- S3 unreachable for 10 s mid-job: the nodes reach the embedded server through a TCP relay
  that is shut for that time, so every request gets what a stopped server gives (connection
  refused, open connections reset), and opened again on the same port.

This process never joins the cluster (no ray.init): it talks to it only through the Jobs
and State APIs, like a user's laptop.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.parquet as pq
import pytest
from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

from breakhis import storage
from breakhis.data.dest import read_manifest
from breakhis.dev.localcluster import LocalCluster, LocalClusterConfig
from breakhis.dev.s3server import S3Server
from breakhis.synth.dataset import synthesize

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.s3]

REPO = Path(__file__).resolve().parents[1]
JOB_TIMEOUT_S = 300
# Worker nodes of 3 logical CPUs: a 2-CPU training worker fits once per node (so two of
# them are spread over both nodes) with a CPU left on each for Ray Data.
WORKER_CPUS = 3
WORKERS = 2
OUTAGE_S = 10


class TcpRelay:
    """Forwards connections to 127.0.0.1:``port`` to ``target``; ``down()`` closes the port
    and resets every open connection, ``up()`` listens on the same port again."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(256)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        if self._listener is not None:
            # shutdown() first: a bare close() leaves the port listening until the thread
            # blocked in accept() returns.
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        with self._lock:
            sockets, self._open = self._open, set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                # Linger 0: closing sends a reset, as from a server that died; SHUT_RD wakes
                # the relay thread blocked reading it.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.shutdown(socket.SHUT_RD)
                sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by down()
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open |= {client, server}
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        with self._lock:
            self._open -= {source, sink}


@pytest.fixture(scope="module")
def s3_relay(s3_server: S3Server) -> Iterator[TcpRelay]:
    endpoint = urlparse(s3_server.endpoint_url)
    relay = TcpRelay((endpoint.hostname, endpoint.port))
    relay.up()
    yield relay
    relay.down()


@pytest.fixture(scope="module")
def cluster(s3_server: S3Server, s3_relay: TcpRelay) -> Iterator[LocalCluster]:
    env = {**s3_server.env(), "AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_relay.port}"}
    config = LocalClusterConfig(workers=WORKERS, head_cpus=0, worker_cpus=WORKER_CPUS, env=env)
    with LocalCluster(config) as local:
        yield local


@pytest.fixture
def full_cluster(cluster: LocalCluster) -> LocalCluster:
    """The cluster with its two worker nodes, replacing any a previous test killed."""
    while len(cluster.workers) < WORKERS:
        cluster.add_worker()
    return cluster


@pytest.fixture(scope="module")
def raw(s3_server: S3Server) -> tuple[str, int]:
    """A small generated BreakHis tree in S3 (156 images of 31 patients: enough for a
    patient-disjoint train/validation/test split) and its number of images."""
    uri = f"s3://test/{uuid.uuid4().hex}/raw"
    summary = synthesize(uri, scale=0.02, seed=1, width=64, height=48, workers=1)
    return uri, summary.images


@pytest.fixture(scope="module")
def tiles(s3_server: S3Server) -> str:
    """45 generated tiles in S3 to score (fewer than ``raw``: scoring is the slow part)."""
    uri = f"s3://test/{uuid.uuid4().hex}/tiles"
    synthesize(uri, scale=0.005, seed=3, width=64, height=48, workers=1)
    return uri


@pytest.fixture(scope="module")
def model(s3_server: S3Server) -> str:
    """A tiny untrained model artifact in S3 (scoring needs a model, not a good one)."""
    import torch

    from breakhis.model.artifact import ModelCard, save_artifact
    from breakhis.model.networks import build_model

    uri = f"s3://test/{uuid.uuid4().hex}/model"
    torch.manual_seed(0)
    card = ModelCard(
        architecture="smallcnn", image_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)
    )
    save_artifact(uri, build_model("smallcnn").eval(), card)
    return uri


def _ray_cli(cluster: LocalCluster, *args: str, timeout: float = JOB_TIMEOUT_S):
    """Run the `ray` command of this environment from the repository root."""
    ray = shutil.which("ray", path=os.path.dirname(sys.executable))
    assert ray, "no `ray` command beside this Python"
    return subprocess.run(
        [ray, *args],
        cwd=REPO,
        env=cluster.cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _plain(text: str) -> str:
    """Text without the terminal colour codes the `ray` command prints."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _placement(cluster: LocalCluster, submission_id: str, resource, name: str) -> Counter:
    """On which worker nodes the job's tasks or actors whose name contains ``name`` ran."""
    from ray.util.state.common import ListApiOptions

    job_id = cluster.job_client().get_job_info(submission_id).job_id
    names = {node_id: node for node, node_id in cluster.node_ids().items()}
    # Task and actor events reach the state API a moment after they happen.
    for _ in range(20):
        entries = cluster.state_client().list(
            resource,
            options=ListApiOptions(filters=[("job_id", "=", job_id)], detail=True),
            raise_on_missing_output=False,
        )
        placed = Counter(
            names.get(e.node_id, e.node_id)
            for e in entries
            if e.node_id
            and any(
                name in (getattr(e, field, None) or "")
                for field in ("name", "class_name", "repr_name")
            )
        )
        if placed:
            return placed
        time.sleep(1)
    return Counter()


def _files(uri: str) -> list[str]:
    return [e.uri for e in storage.walk(uri)] if storage.exists(uri) else []


def _wait_for(cluster: LocalCluster, submission_id: str, condition, what: str) -> None:
    """Poll ``condition()`` until true; fail if the job ends or time runs out first."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not condition():
        status = cluster.job_client().get_job_status(submission_id)
        assert not status.is_terminal(), (
            f"job ended {status} before {what}:\n{cluster.logs(submission_id)[-3000:]}"
        )
        assert time.monotonic() < deadline, f"no {what} after {JOB_TIMEOUT_S} s"
        time.sleep(0.2)


def _why(cluster: LocalCluster, submission_id: str) -> str:
    """The lines of a job's logs that tell why it ended as it did, for an assertion."""
    logs = _plain(cluster.logs(submission_id))
    lines = logs.splitlines()
    telling = [
        line
        for line in lines
        if re.search(r"Error|error:|FailurePolicy|Exception:|resum|epoch \d", line)
    ]
    return "\n".join([*telling[:60], "...", *lines[-40:]])


def _read_table(uri: str, columns: list[str] | None = None):
    fs, path = storage.resolve(uri)
    return pq.read_table(path, filesystem=fs, columns=columns)


# --- submitting as the README says --------------------------------------------------------


@dataclass(frozen=True)
class Submitted:
    """A job submitted with the `ray` command and what the command printed."""

    submission_id: str
    output: str
    dest: str


@pytest.fixture(scope="module")
def prepared(cluster: LocalCluster, raw: tuple[str, int]) -> Submitted:
    """The prepare job, submitted exactly as the README says (`ray job submit` from the
    repository root with cluster/runtime_env.yaml), into a fresh S3 prefix."""
    src, _ = raw
    dest = f"s3://test/{uuid.uuid4().hex}/prepared"
    submit = _ray_cli(
        cluster,
        "job",
        "submit",
        "--address",
        cluster.dashboard_url,
        "--runtime-env",
        "cluster/runtime_env.yaml",
        "--working-dir",
        ".",
        "--",
        "python",
        "jobs/prepare.py",
        src,
        dest,
        "--shard-mb",
        "0.05",
    )
    output = _plain(submit.stdout + submit.stderr)
    assert submit.returncode == 0, output[-3000:]
    submission_id = re.search(r"raysubmit_\w+", output).group(0)
    return Submitted(submission_id=submission_id, output=output, dest=dest)


def test_prepare_submitted_as_the_readme_says_runs_on_both_worker_nodes(cluster, raw, prepared):
    from ray.util.state.common import StateResource

    _, images = raw
    assert f"prepared {images} images" in prepared.output
    status = _ray_cli(cluster, "job", "status", prepared.submission_id)
    assert "succeeded" in _plain(status.stdout + status.stderr).lower()
    logs = _ray_cli(cluster, "job", "logs", prepared.submission_id)
    assert f"prepared {images} images" in logs.stdout
    listed = _ray_cli(cluster, "job", "list")
    assert prepared.submission_id in listed.stdout

    assert read_manifest(prepared.dest).num_rows == images
    placed = _placement(cluster, prepared.submission_id, StateResource.TASKS, "write_shard")
    assert set(placed) == set(cluster.workers), f"shards written on {dict(placed)}"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "the following arguments are required: src, dest"),
        (["s3://test/raw", "s3://test/prepared", "--folds", "1"], "--folds must be >= 2, got 1"),
    ],
    ids=["missing-arguments", "bad-option"],
)
def test_a_job_with_bad_arguments_fails_fast_with_a_clear_message(cluster, args, message):
    started = time.monotonic()
    submission_id = cluster.submit(" ".join(["python", "jobs/prepare.py", *args]))
    status = cluster.wait(submission_id, timeout_s=120)
    elapsed = time.monotonic() - started
    logs = cluster.logs(submission_id)

    assert str(status) == "FAILED", logs
    assert message in logs
    assert "Traceback" not in logs, logs
    info = cluster.job_client().get_job_info(submission_id)
    assert "exit code 2" in (info.message or ""), info.message
    # Seconds, not minutes: it never waits on the cluster's resources or data.
    assert elapsed < 60, f"took {elapsed:.0f} s to fail"


# --- faults -------------------------------------------------------------------------------


def _score_command(model: str, src: str, out: str) -> str:
    # Units of 5 of the 45 tiles, so that the job is part-way when the fault comes.
    return (
        f"python jobs/score.py --model {model} --input {src} --out {out} "
        "--attribution gradcam --unit-size 5 --batch-size 5 --num-actors 2"
    )


def _check_one_row_per_tile(out: str, src: str) -> None:
    tiles = _read_table(f"{out}/predictions", ["uri", "tile_id"])
    inputs = {e.uri for e in storage.walk(src, (".png",))}
    uris = tiles.column("uri").to_pylist()
    assert len(uris) == len(set(uris)), "a tile was scored twice"
    assert set(uris) == inputs, f"missing: {sorted(inputs - set(uris))[:5]}"
    assert storage.exists(f"{out}/_SUCCESS")


def test_scoring_survives_s3_down_for_10_seconds_then_a_lost_worker_node_scoring_each_tile_once(
    full_cluster, s3_relay, tiles, model, s3_prefix
):
    """Both faults in one scoring job (each job costs most of a minute on 2 cores): S3
    unreachable for 10 s once a unit is in S3, then, once another unit is in after it came
    back, the loss of a worker node holding a model actor. The job must still be running at
    each fault, end SUCCEEDED, and leave one row per tile."""
    from ray.util.state.common import StateResource

    src = tiles
    out = f"{s3_prefix}/scores"
    submission_id = full_cluster.submit(_score_command(model, src, out))
    _wait_for(full_cluster, submission_id, lambda: _files(f"{out}/_units"), "a scored unit in S3")
    # Tiles are decoded on both nodes; the model actors run where Ray Data's pool put them.
    decoded = _placement(full_cluster, submission_id, StateResource.TASKS, "decode_tiles")
    actors = _placement(full_cluster, submission_id, StateResource.ACTORS, "TilePredictor")
    assert set(decoded) | set(actors) == set(full_cluster.workers), (
        f"decoding on {dict(decoded)}, model actors on {dict(actors)}"
    )

    # S3 down for 10 s, mid-job.
    units = len(_files(f"{out}/_units"))
    s3_relay.down()
    try:
        time.sleep(OUTAGE_S)
    finally:
        s3_relay.up()
    assert str(full_cluster.job_client().get_job_status(submission_id)) == "RUNNING"
    _wait_for(
        full_cluster,
        submission_id,
        lambda: len(_files(f"{out}/_units")) > units,
        "a unit written after the outage",
    )

    # Lose a node that holds a model actor, mid-job.
    full_cluster.kill_worker(min(actors))
    assert str(full_cluster.job_client().get_job_status(submission_id)) == "RUNNING", (
        "the job ended before the node was lost"
    )
    status = full_cluster.wait(submission_id, timeout_s=JOB_TIMEOUT_S)
    assert str(status) == "SUCCEEDED", _why(full_cluster, submission_id)
    _check_one_row_per_tile(out, src)


def test_training_over_two_nodes_resumes_from_its_checkpoint_after_losing_one(
    full_cluster, prepared, s3_prefix
):
    from ray.util.state.common import StateResource

    runs, name = f"{s3_prefix}/runs", "node-lost"
    run = f"{runs}/{name}"
    # A spare node, as an autoscaling group keeps or brings: the run needs two nodes (one
    # 2-CPU worker fits on each) to go on once one is lost.
    full_cluster.add_worker()
    submission_id = full_cluster.submit(
        f"python jobs/train.py --data {prepared.dest} --storage {runs} --name {name} "
        "--fold 0 --arch smallcnn --weights none --image-size 32 --epochs 4 --batch-size 16 "
        "--freeze-epochs 0 --no-cache --keep-checkpoints 4 --num-workers 2 --cpus-per-worker 2 "
        "--max-failures 3"
    )
    first = f"{run}/epoch_0001/checkpoint.pt"

    def first_committed() -> bool:
        # Ray Train commits a checkpoint (the one a restart resumes from) once every worker
        # has reported it, by rewriting this snapshot; the file alone is not yet that.
        snapshot = f"{run}/{CHECKPOINT_MANAGER_SNAPSHOT_FILENAME}"
        return storage.exists(snapshot) and b"epoch_0001" in storage.read_bytes(snapshot)

    _wait_for(full_cluster, submission_id, first_committed, "a first committed checkpoint")
    first_bytes = storage.read_bytes(first)
    placed = _placement(full_cluster, submission_id, StateResource.ACTORS, "RayTrainWorker")
    assert len(placed) == 2 and set(placed) <= set(full_cluster.workers), (
        f"training workers on {dict(placed)}; one on each of two nodes expected"
    )

    # A later epoch is under way: lose a node that holds a training worker.
    full_cluster.kill_worker(min(placed))
    assert str(full_cluster.job_client().get_job_status(submission_id)) == "RUNNING"
    status = full_cluster.wait(submission_id, timeout_s=JOB_TIMEOUT_S)
    assert str(status) == "SUCCEEDED", _why(full_cluster, submission_id)

    # The worker group was started again (two more training workers)...
    started = _placement(full_cluster, submission_id, StateResource.ACTORS, "RayTrainWorker")
    assert sum(started.values()) >= 4, f"training workers: {dict(started)}"
    # ...from the checkpoint, not from scratch: epoch 1 was not trained (nor checkpointed)
    # again, and every epoch appears once in the run's history.
    assert storage.read_bytes(first) == first_bytes
    history = json.loads(storage.read_bytes(f"{run}/curves.json"))["epochs"]
    assert [int(row["epoch"]) for row in history] == [1, 2, 3, 4], history
    assert storage.exists(f"{run}/model/model.json")
