"""A real multi-node Ray cluster on this machine, for trying the cluster jobs locally and
for the fault-tolerance tests.

    python -m breakhis.dev.localcluster --workers 2 --s3   # up until Ctrl-C; prints an `export`
    # in another shell, after that `export` line (Jobs API address and the cluster's token):
    ray job submit --runtime-env cluster/runtime_env.yaml --working-dir . \\
        -- python jobs/prepare.py s3://breakhis/raw s3://breakhis/prepared

In code (the tests): ``with LocalCluster(LocalClusterConfig(workers=2)) as cluster:``, then
``cluster.submit(...)``, ``cluster.wait(...)``, ``cluster.logs(...)``,
``cluster.kill_worker("worker-1")``, ``cluster.add_worker()``.

What it starts: a head node and ``workers`` worker nodes, each its own ``ray start --block``
process (its own raylet, object store and agents), all joined to the head's GCS, exactly
as on separate machines except that they share this machine's CPUs and file system. The
head offers ``head_cpus`` CPUs (0 by default: like the cloud configs in ``cluster/``, it
only runs job drivers, so tasks and training workers land on worker nodes); each worker
node offers ``worker_cpus`` CPUs and one unit of a custom resource naming it
(``localcluster:worker-1``...), so a test can tell the nodes apart.

What stays private to it:

- a fresh temp folder per cluster, removed at ``stop()``, with one ``--temp-dir`` (session,
  sockets, logs, unpacked job code) per node below it, so it never meets the default
  ``/tmp/ray`` session or another cluster (its address file goes there too, so a bare
  ``ray.init()`` elsewhere never attaches to it);
- free ports for the GCS, the dashboard (the Jobs API) and each node's dashboard agent,
  instead of Ray's fixed defaults (6379, 8265, 52365) that a second cluster would clash on;
- its own Ray authentication token, made at ``start()``: every node gets it (and
  ``RAY_AUTH_MODE=token``) through its environment, and this object's clients send it as a
  header, so neither the user's ``~/.ray/auth_token`` nor this process's environment is
  read or changed. ``cli_env()`` gives the variables a ``ray job submit`` process needs;
- the dashboard (Jobs API) binds 127.0.0.1. Ray's own gRPC servers listen on all
  interfaces and advertise the host's address whatever ``--node-ip-address`` says (Ray
  resolves 127.0.0.1 to it); the token guards them;
- ``stop()`` and ``kill_worker()`` signal only processes this object started (each node's
  ``ray start`` and the processes below it), by PID.

A busy machine (2 shared cores) is the normal case here, and Ray's startup has fixed
windows sized for idle ones: the raylet aborts when its agents have not announced their
ports within ~15 s. Nodes are therefore started one at a time, their agents' ports are
chosen here and announced to the raylet at once (``_announce_agent_ports``), Ray's agent
and worker registration timeouts are raised, and a node whose ``ray start`` still exits
while starting is started again after a pause, until ``start_timeout_s``.

``env`` reaches every node's processes (the job drivers, tasks and actors included), which
is how the embedded S3 server's AWS_* variables get to the jobs:
``LocalClusterConfig(env=server.env())``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
RESOURCE_PREFIX = "localcluster:"
"""Each worker node offers one unit of ``localcluster:<name>``."""

# Ray's port file name -> the `ray start` option that sets that port.
_AGENT_PORT_FLAGS = {
    "dashboard_agent_listen_port": "dashboard-agent-listen-port",
    "metrics_agent_port": "dashboard-agent-grpc-port",
    "runtime_env_agent_port": "runtime-env-agent-port",
    "metrics_export_port": "metrics-export-port",
}
# Variables that would point the nodes at another cluster or another token.
_INHERITED_RAY_ENV = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH")
_RUNTIME_ENV_FILE = Path("cluster") / "runtime_env.yaml"
_LOG_TAIL_LINES = 30
_STOP_GRACE_S = 15.0
_MIN_OBJECT_STORE_MB = 80  # Ray refuses less than 75 MiB


class LocalClusterError(RuntimeError):
    """A node of the local cluster could not be started or did not join in time."""


class JobFailedError(RuntimeError):
    """A submitted job ended in a state other than the one expected."""


@dataclass(frozen=True)
class LocalClusterConfig:
    """Shape of the local cluster.

    workers: worker nodes started with the head (more can be added with ``add_worker``).
    head_cpus: logical CPUs the head offers to tasks (0: it runs job drivers only).
    worker_cpus: logical CPUs each worker node offers. Logical: Ray schedules by them,
        they do not pin cores, so 2 per node on a 2-core machine is fine for small jobs.
    object_store_mb: each node's object store (shared memory), in MB.
    env: extra environment for every node's processes, e.g. ``S3Server.env()``.
    start_timeout_s: how long each node may take to start and join, retries included.
    keep_temp: keep the temp folder (sessions, logs) after ``stop()``, for debugging.
    """

    workers: int = 2
    head_cpus: int = 0
    worker_cpus: int = 2
    object_store_mb: int = 128
    env: Mapping[str, str] = field(default_factory=dict)
    start_timeout_s: float = 300.0
    keep_temp: bool = False

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise ValueError(f"workers={self.workers}: must be >= 0")
        if self.head_cpus < 0 or self.worker_cpus < 0:
            raise ValueError(
                f"head_cpus={self.head_cpus}, worker_cpus={self.worker_cpus}: must be >= 0"
            )
        if self.object_store_mb < _MIN_OBJECT_STORE_MB:
            raise ValueError(
                f"object_store_mb={self.object_store_mb}: Ray needs at least "
                f"{_MIN_OBJECT_STORE_MB} MB per node"
            )
        if self.start_timeout_s <= 0:
            raise ValueError(f"start_timeout_s={self.start_timeout_s}: must be > 0")
        bad = [k for k, v in self.env.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise ValueError(f"env: names and values must be strings; bad entries: {bad}")


@dataclass(eq=False)
class RayNode:
    """One ``ray start --block`` process and what it started."""

    name: str
    """``head``, ``worker-1``, ``worker-2``..."""
    process: subprocess.Popen = field(repr=False)
    log_path: Path
    """Output of ``ray start``; Ray's own logs are in ``session_latest/logs`` beside it."""
    agent_ports: dict[str, int] = field(default_factory=dict)
    """Ports of the node's agents, by the name of Ray's port file."""
    ip_address: str = ""
    """The address Ray bound the node's servers to (known once its raylet runs)."""

    @property
    def pid(self) -> int:
        """PID of the ``ray start`` process (also its process group id)."""
        return self.process.pid

    def is_running(self) -> bool:
        """True while ``ray start`` has not exited (it exits when its raylet dies)."""
        return self.process.poll() is None

    def processes(self) -> list[tuple[int, int]]:
        """``(pid, start time)`` of ``ray start`` and every process below it, workers included.

        Ray starts its workers in their own process groups, so signalling the node's group
        would miss them; the process tree does not. The start time guards against a PID
        reused after the process ended.
        """
        if not self.is_running():
            return []
        return [(self.pid, _start_time(self.pid)), *_descendants(self.pid)]


class LocalCluster:
    """A head and worker nodes started with ``ray start`` on this machine.

    Use as a context manager, or call ``start()`` and ``stop()``. Jobs go through the Jobs
    API at ``dashboard_url`` (what ``ray job submit --address`` takes).
    """

    def __init__(self, config: LocalClusterConfig | None = None) -> None:
        self.config = config or LocalClusterConfig()
        self.temp_dir: Path | None = None
        self.gcs_address = ""
        """``host:port`` of the head's GCS (what ``ray start --address`` takes)."""
        self.dashboard_url = ""
        """``http://127.0.0.1:port`` of the dashboard and Jobs API."""
        self.head: RayNode | None = None
        self.workers: dict[str, RayNode] = {}
        """Running worker nodes by name."""
        self._next_worker = 1
        self._client = None
        self._token = ""

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> LocalCluster:
        """Start the head, then the worker nodes, and wait until all have joined.

        Returns self. Raises LocalClusterError (with the tail of the failing node's output)
        when a node exits or does not join within ``start_timeout_s``; whatever was started
        is stopped first.
        """
        if self.head is not None:
            raise LocalClusterError("this cluster is already started")
        self.temp_dir = Path(tempfile.mkdtemp(prefix="bhray-"))
        self._token = secrets.token_hex(32)
        try:
            self._start_head()
            # One at a time: on a busy machine, nodes starting together can miss Ray's fixed
            # ~15 s wait for each node's dashboard agent.
            for _ in range(self.config.workers):
                self.add_worker()
        except BaseException:
            self.stop()
            raise
        logger.info(
            "local Ray cluster up: head + %d worker node(s), dashboard %s, temp dir %s",
            len(self.workers),
            self.dashboard_url,
            self.temp_dir,
        )
        return self

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop every node this cluster started, worker nodes first, and remove its temp dir.

        SIGTERM to each ``ray start`` first, then SIGKILL to whatever it left behind among
        the processes recorded below it. Safe to call twice; raises nothing.
        """
        nodes = [*self.workers.values(), *([self.head] if self.head else [])]
        for node in nodes:
            _stop_node(node)
        self.workers.clear()
        self.head = None
        self._client = None
        if self.temp_dir is not None and not self.config.keep_temp:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        elif self.temp_dir is not None:
            logger.info("kept the local cluster's temp dir %s", self.temp_dir)

    # --- nodes ----------------------------------------------------------------------------

    def add_worker(self) -> str:
        """Start one more worker node (what an autoscaler does after losing one) and wait
        until it has joined. Returns its name. Raises LocalClusterError as ``start()``."""
        name = f"worker-{self._next_worker}"
        self._next_worker += 1

        def launch() -> RayNode:
            self.workers[name] = self._launch_worker(name)
            return self.workers[name]

        def forget(node: RayNode) -> None:
            self.workers.pop(name, None)

        self._start_node(name, launch, self._wait_worker, forget)
        return name

    def kill_worker(self, name: str) -> None:
        """Simulate the loss of a worker node: SIGKILL its raylet, then every other process
        of that node (its workers, agents and ``ray start``).

        Returns once they are gone; the head notices on its own (missed health checks),
        as it would a machine that vanished. Raises KeyError naming the running workers
        for an unknown name.
        """
        if name not in self.workers:
            raise KeyError(f"no running worker node {name!r}; running: {sorted(self.workers)}")
        node = self.workers.pop(name)
        processes = node.processes()
        raylets = [(pid, st) for pid, st in processes if _command_name(pid) == "raylet"]
        for pid, started in raylets:
            _kill(pid, started, signal.SIGKILL)
        for pid, started in processes:
            _kill(pid, started, signal.SIGKILL)
        node.process.wait()
        logger.info("killed worker node %s (raylet pid(s) %s)", name, [p for p, _ in raylets])

    def node_ids(self) -> dict[str, str]:
        """Ray node id of each alive node, by name (``head``, ``worker-1``...).

        Raises LocalClusterError when the state API does not answer.
        """
        from ray.util.state.common import ListApiOptions, StateResource

        try:
            nodes = self.state_client().list(
                StateResource.NODES,
                options=ListApiOptions(filters=[("state", "=", "ALIVE")]),
                raise_on_missing_output=False,
            )
        except Exception as err:  # the state API raises plain exceptions for HTTP errors
            raise LocalClusterError(f"state API at {self.dashboard_url}: {err}") from err
        ids = {}
        for node in nodes:
            if node.is_head_node:
                ids["head"] = node.node_id
                continue
            for resource in node.resources_total:
                if resource.startswith(RESOURCE_PREFIX):
                    ids[resource[len(RESOURCE_PREFIX) :]] = node.node_id
        return ids

    # --- jobs -----------------------------------------------------------------------------

    def job_client(self):
        """A ``ray.job_submission.JobSubmissionClient`` for this cluster's Jobs API."""
        from ray.job_submission import JobSubmissionClient

        if self._client is None:
            self._client = JobSubmissionClient(self.dashboard_url, headers=self._auth_header())
        return self._client

    def state_client(self):
        """A ``ray.util.state.StateApiClient`` for this cluster (nodes, tasks, actors)."""
        from ray.util.state import StateApiClient

        return StateApiClient(self.dashboard_url, headers=self._auth_header())

    def cli_env(self) -> dict[str, str]:
        """Environment for a ``ray`` command-line process (``ray job submit``, ``ray job
        logs``, ``ray status``) to reach this cluster: this process's environment plus
        its addresses (Jobs API, GCS) and its token."""
        env = dict(os.environ)
        env.update(
            RAY_ADDRESS=self.gcs_address,
            RAY_API_SERVER_ADDRESS=self.dashboard_url,
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self._token,
        )
        env.pop("RAY_AUTH_TOKEN_PATH", None)
        return env

    def write_token_file(self) -> Path:
        """Write the cluster's token to ``token`` (mode 0600) in its temp dir, removed at
        ``stop()``, for ``ray`` commands in other shells (``RAY_AUTH_TOKEN_PATH``).
        Returns the file's path."""
        assert self.temp_dir is not None, "start the cluster first"
        path = self.temp_dir / "token"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(self._token)
        return path

    def submit(
        self,
        entrypoint: str,
        runtime_env: Mapping | None = None,
        submission_id: str | None = None,
    ) -> str:
        """Submit a job the way ``ray job submit --runtime-env cluster/runtime_env.yaml
        --working-dir . -- ENTRYPOINT`` does from the repository root.

        ``runtime_env`` None uses ``load_runtime_env()``. Returns the submission id.
        """
        env = dict(runtime_env) if runtime_env is not None else load_runtime_env()
        submission_id = self.job_client().submit_job(
            entrypoint=entrypoint, runtime_env=env, submission_id=submission_id
        )
        logger.info("submitted job %s: %s", submission_id, entrypoint)
        return submission_id

    def wait(self, submission_id: str, timeout_s: float = 600.0):
        """Wait until the job reaches a terminal status and return it (a JobStatus).

        Raises TimeoutError (after stopping the job) with the tail of its logs when it is
        still running after ``timeout_s``.
        """
        return wait_for_job(self.job_client(), submission_id, timeout_s)

    def logs(self, submission_id: str) -> str:
        """Everything the job's driver printed so far."""
        return self.job_client().get_job_logs(submission_id)

    def run(self, entrypoint: str, timeout_s: float = 600.0, expect: str = "SUCCEEDED") -> str:
        """Submit a job, wait for it and return its logs.

        Raises JobFailedError with the logs' tail when it ends in a status other than
        ``expect``, TimeoutError as ``wait``.
        """
        submission_id = self.submit(entrypoint)
        status = self.wait(submission_id, timeout_s)
        logs = self.logs(submission_id)
        if str(status) != expect:
            raise JobFailedError(
                f"job {submission_id} ({entrypoint}) ended {status}, expected {expect}; "
                f"its logs end with:\n{_tail(logs)}"
            )
        return logs

    # --- internals ------------------------------------------------------------------------

    def _auth_header(self) -> dict[str, str]:
        return {"Content-Type": "application/json", "Authorization": f"Bearer {self._token}"}

    def _node_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _INHERITED_RAY_ENV}
        # Several nodes start on one shared machine: give Ray's agents and workers more
        # time to come up than its defaults (about 30 s and 60 s), which a busy machine
        # exceeds (the raylet then aborts). `env` may set other values.
        env["RAY_agent_register_timeout_ms"] = "180000"
        env["RAY_worker_register_timeout_seconds"] = "180"
        env.update(self.config.env)
        env["RAY_AUTH_MODE"] = "token"
        env["RAY_AUTH_TOKEN"] = self._token
        # Job entrypoints say `python ...`: make that this environment's Python.
        env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
        # SIGTERM makes a node drain for up to 30 s first; stop() has nothing to drain.
        env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        return env

    def _launch(self, name: str, args: Sequence[str]) -> RayNode:
        assert self.temp_dir is not None
        node_dir = self.temp_dir / name
        if node_dir.exists():
            # Left by an attempt that failed to start: kept aside for its logs, and so that
            # its address file is not taken for the new node's.
            node_dir.rename(node_dir.with_name(f"{name}.failed-{time.monotonic_ns()}"))
        node_dir.mkdir()
        log_path = node_dir / "ray-start.log"
        agent_ports = {name: _free_port() for name in _AGENT_PORT_FLAGS}
        command = [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            "--block",
            f"--node-ip-address={HOST}",
            # Each node its own temp dir, as on separate machines: nodes sharing one would
            # share its runtime_resources folder, where each node's runtime-env agent
            # deletes the unpacked working_dir of jobs it thinks are done.
            f"--temp-dir={node_dir}",
            f"--object-store-memory={self.config.object_store_mb * 1_000_000}",
            # Ports chosen here rather than Ray's fixed defaults (52365 would clash between
            # nodes of this machine), and announced to the raylet by _announce_agent_ports.
            *(f"--{_AGENT_PORT_FLAGS[name]}={port}" for name, port in agent_ports.items()),
            "--disable-usage-stats",
            *args,
        ]
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(
                command,
                env=self._node_env(),
                cwd=node_dir,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        logger.info("started Ray node %s (ray start pid %d)", name, process.pid)
        return RayNode(name=name, process=process, log_path=log_path, agent_ports=agent_ports)

    def _start_node(
        self,
        name: str,
        launch: Callable[[], RayNode],
        wait: Callable[[RayNode, float], None],
        forget: Callable[[RayNode], None],
    ) -> None:
        """Launch a node and wait until it is up. A node whose `ray start` exits while
        starting (a busy machine: Ray gives its agents ~15 s; a port taken meanwhile) is
        launched again after a pause, until ``start_timeout_s`` has passed."""
        deadline = time.monotonic() + self.config.start_timeout_s
        pause = 5.0
        while True:
            node = launch()
            try:
                wait(node, deadline)
                return
            except LocalClusterError as err:
                exited = not node.is_running()
                _stop_node(node)
                forget(node)
                if not exited or time.monotonic() + pause > deadline:
                    raise
                logger.warning(
                    "Ray node %s failed to start (%s); retrying in %.0f s", name, err, pause
                )
                time.sleep(pause)
                pause = min(2 * pause, 30.0)

    def _start_head(self) -> None:
        def launch() -> RayNode:
            self._launch_head()
            assert self.head is not None
            return self.head

        def forget(node: RayNode) -> None:
            self.head = None

        self._start_node("head", launch, self._wait_head, forget)

    def _launch_head(self) -> None:
        gcs_port, dashboard_port = _free_port(), _free_port()
        args = [
            "--head",
            f"--port={gcs_port}",
            "--include-dashboard=True",
            f"--dashboard-host={HOST}",
            f"--dashboard-port={dashboard_port}",
            f"--num-cpus={self.config.head_cpus}",
            "--num-gpus=0",
        ]
        if importlib.util.find_spec("grpc") is not None:
            # With ray[client] installed Ray would take the fixed port 10001 otherwise.
            args.append(f"--ray-client-server-port={_free_port()}")
        self.head = self._launch("head", args)
        self.dashboard_url = f"http://{HOST}:{dashboard_port}"
        self._client = None

    def _wait_head(self, head: RayNode, deadline: float) -> None:
        assert self.temp_dir is not None
        while True:
            _announce_agent_ports(head)
            self._check_running(head)
            address = _read_address(self.temp_dir / "head")
            if address and _agents_listening(head) and self._jobs_api_ready():
                self.gcs_address = address
                return
            if time.monotonic() > deadline:
                raise LocalClusterError(
                    f"the head node did not serve the Jobs API at {self.dashboard_url} within "
                    f"{self.config.start_timeout_s:g} s; `ray start` output ends with:\n"
                    f"{_tail(_read(head.log_path))}"
                )
            time.sleep(0.5)

    def _launch_worker(self, name: str) -> RayNode:
        args = [
            f"--address={self.gcs_address}",
            f"--num-cpus={self.config.worker_cpus}",
            "--num-gpus=0",
            f"--resources={json.dumps({RESOURCE_PREFIX + name: 1})}",
        ]
        return self._launch(name, args)

    def _wait_worker(self, node: RayNode, deadline: float) -> None:
        while True:
            _announce_agent_ports(node)
            self._check_running(node)
            with contextlib.suppress(LocalClusterError):
                if _agents_listening(node) and node.name in self.node_ids():
                    return
            if time.monotonic() > deadline:
                raise LocalClusterError(
                    f"worker node {node.name} did not join within "
                    f"{self.config.start_timeout_s:g} s; its `ray start` output ends with:\n"
                    f"{_tail(_read(node.log_path))}"
                )
            time.sleep(0.5)

    def _check_running(self, node: RayNode) -> None:
        if not node.is_running():
            raise LocalClusterError(
                f"`ray start` for node {node.name} exited with code {node.process.returncode}"
                f"{_raylet_failure(node.log_path.parent)}; its output ends with:\n"
                f"{_tail(_read(node.log_path))}"
            )

    def _jobs_api_ready(self) -> bool:
        try:
            self.job_client().list_jobs()
        except Exception:  # connection refused, HTTP 5xx while the dashboard starts
            self._client = None
            return False
        return True


def repo_root() -> Path:
    """The checkout this package runs from (the folder holding ``jobs/`` and ``cluster/``).

    Raises FileNotFoundError when the package is installed without its checkout.
    """
    root = Path(__file__).resolve().parents[2]
    if not (root / "jobs").is_dir() or not (root / "cluster").is_dir():
        raise FileNotFoundError(
            f"{root}: not a breakhis checkout (no jobs/ and cluster/ folders); the local "
            "cluster submits jobs from a checkout"
        )
    return root


def load_runtime_env(path: str | os.PathLike | None = None) -> dict:
    """The runtime_env that ``ray job submit --runtime-env cluster/runtime_env.yaml
    --working-dir .`` builds when run from the repository root.

    ``path`` None reads ``cluster/runtime_env.yaml`` of ``repo_root()``; a relative
    ``working_dir`` is taken from the repository root, as the CLI takes it from the
    current folder. Returns a plain dict. Raises FileNotFoundError, or ValueError naming
    the file when it is not a YAML mapping.
    """
    root = repo_root()
    file = Path(path) if path is not None else root / _RUNTIME_ENV_FILE
    runtime_env = yaml.safe_load(file.read_text())
    if not isinstance(runtime_env, dict):
        raise ValueError(f"{file}: a runtime_env must be a YAML mapping")
    working_dir = runtime_env.get("working_dir", ".")
    if "://" not in working_dir:
        runtime_env["working_dir"] = str((root / working_dir).resolve())
    return runtime_env


def wait_for_job(client, submission_id: str, timeout_s: float = 600.0, poll_s: float = 1.0):
    """Poll a job through ``client`` (a JobSubmissionClient) until its status is terminal.

    Returns the terminal JobStatus. Raises TimeoutError with the tail of the job's logs
    (after asking the cluster to stop it) when it is not done within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        status = client.get_job_status(submission_id)
        if status.is_terminal():
            return status
        if time.monotonic() > deadline:
            with contextlib.suppress(Exception):
                client.stop_job(submission_id)
            raise TimeoutError(
                f"job {submission_id} still {status} after {timeout_s:g} s; its logs end "
                f"with:\n{_tail(client.get_job_logs(submission_id))}"
            )
        time.sleep(poll_s)


# --- processes -----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _read_address(temp_dir: Path | None) -> str:
    """The GCS address ``ray start --head`` wrote into its temp dir ('' until it has)."""
    if temp_dir is None:
        return ""
    with contextlib.suppress(OSError):
        return (temp_dir / "ray_current_cluster").read_text().strip()
    return ""


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state is [0], ppid [1])."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may itself hold spaces or parentheses.
    return text[text.rindex(")") + 2 :].split()


def _start_time(pid: int) -> int:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else -1


def _command_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _descendants(root: int) -> list[tuple[int, int]]:
    """``(pid, start time)`` of every process below ``root``, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields:
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, queue = [], [root]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append((child, _start_time(child)))
            queue.append(child)
    return found


def _kill(pid: int, started: int, sig: signal.Signals) -> None:
    """Signal ``pid`` only if it is still the process that started at ``started``."""
    if _start_time(pid) != started:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _stop_node(node: RayNode) -> None:
    processes = node.processes()
    if node.is_running():
        with contextlib.suppress(ProcessLookupError):
            node.process.send_signal(signal.SIGTERM)
        try:
            node.process.wait(timeout=_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            logger.warning("Ray node %s ignored SIGTERM; killing it", node.name)
    for pid, started in processes:
        _kill(pid, started, signal.SIGKILL)
    if node.process.poll() is None:
        node.process.wait()


def _announce_agent_ports(node: RayNode) -> None:
    """Write the node's agent port files for its raylet, once the raylet has started.

    The raylet learns its agents' ports from files they write in the session folder
    (``<port name>_<node id hex>``, the port in decimal) and aborts the node when they are
    not there after a fixed ~15 s. The Python agents need longer than that to start on a
    busy machine, so the node would never come up. The ports were chosen here, so the
    files can be written at once, with the content the agents write later; the raylet
    retries reaching them until they listen. Does nothing before the raylet exists.
    """
    if node.ip_address or not node.agent_ports:
        return
    for pid, _ in node.processes():
        if _command_name(pid) != "raylet":
            continue
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        except OSError:
            return
        flags = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
        node_id, session_dir = flags.get("node_id"), flags.get("session_dir")
        if not node_id or not session_dir or not flags.get("node_ip_address"):
            return
        for name, port in node.agent_ports.items():
            target = Path(session_dir) / f"{name}_{node_id}"
            if not target.exists():
                tmp = target.with_name(f".{target.name}.tmp")
                tmp.write_text(str(port))
                tmp.replace(target)
        node.ip_address = flags["node_ip_address"]
        return


def _agents_listening(node: RayNode) -> bool:
    """True once the node's dashboard and runtime-env agents accept connections: before,
    its raylet cannot start workers for jobs that come with a runtime_env."""
    if not node.ip_address:
        return False
    for name in ("dashboard_agent_listen_port", "runtime_env_agent_port"):
        try:
            socket.create_connection((node.ip_address, node.agent_ports[name]), 1).close()
        except OSError:
            return False
    return True


def _raylet_failure(node_dir: Path) -> str:
    """The raylet's fatal log line (why the node did not start), as ' (raylet: ...)', or ''."""
    for log in sorted(node_dir.glob("session_*/logs/raylet*.out")):
        for line in _read(log).splitlines():
            if "Check failed" in line:
                return f" (raylet: {line.split('Check failed', 1)[1].strip(': ')})"
    return ""


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError as err:
        return f"(unreadable: {err})"


def _tail(text: str) -> str:
    return "\n".join(text.splitlines()[-_LOG_TAIL_LINES:])


# --- command line --------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m breakhis.dev.localcluster``: start a local cluster, print how to submit jobs
    to it, and keep it up until Ctrl-C. Returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m breakhis.dev.localcluster",
        description="Start a multi-node Ray cluster on this machine (a head and worker "
        "nodes, each its own `ray start`) and keep it up until Ctrl-C.",
    )
    parser.add_argument("--workers", type=int, default=2, help="worker nodes (default 2)")
    parser.add_argument("--worker-cpus", type=int, default=2, help="CPUs per worker node")
    parser.add_argument("--head-cpus", type=int, default=0, help="CPUs of the head node")
    parser.add_argument(
        "--s3",
        action="store_true",
        help="also start the embedded S3 server (bucket `breakhis`) and give its "
        "endpoint and credentials to every node",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    with contextlib.ExitStack() as stack:
        env: dict[str, str] = {}
        if args.s3:
            from breakhis.dev.s3server import embedded_s3

            server = stack.enter_context(embedded_s3(buckets=("breakhis",), set_env=False))
            env = server.env()
            print(f"embedded S3 at {server.endpoint_url} (its keys are set on every node)")
        config = LocalClusterConfig(
            workers=args.workers,
            head_cpus=args.head_cpus,
            worker_cpus=args.worker_cpus,
            env=env,
        )
        # SIGTERM too must stop the nodes: they run in their own sessions and would outlive
        # this process.
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        cluster = stack.enter_context(LocalCluster(config))
        token_file = cluster.write_token_file()
        print(f"Ray dashboard and Jobs API: {cluster.dashboard_url}")
        print(f"nodes: {cluster.node_ids()}")
        print(
            "in another shell, from the repository root:\n"
            f"  export RAY_API_SERVER_ADDRESS={cluster.dashboard_url} RAY_AUTH_MODE=token "
            f"RAY_AUTH_TOKEN_PATH={token_file}\n"
            "  ray job submit --runtime-env cluster/runtime_env.yaml --working-dir . "
            "-- python jobs/prepare.py SRC DEST"
        )
        print("Ctrl-C stops the cluster.", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while cluster.head is not None and cluster.head.is_running():
                time.sleep(1)
    return 0


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
