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
chosen here and announced to the raylet at once (``raynode.announce_agent_ports``), Ray's agent
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
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from breakhis.dev.clusterconfig import (
    RESOURCE_PREFIX,
    JobFailedError,
    LocalClusterConfig,
    LocalClusterError,
    load_runtime_env,
    repo_root,
)
from breakhis.dev.raynode import (
    HOST,
    RayNode,
    agents_listening,
    command_name,
    free_port,
    kill,
    launch_node,
    node_env,
    read_address,
    start_with_retries,
    stop_node,
    tail,
    wait_until_up,
)

__all__ = [
    "JobFailedError",
    "LocalCluster",
    "LocalClusterConfig",
    "LocalClusterError",
    "load_runtime_env",
    "repo_root",
    "wait_for_job",
]

logger = logging.getLogger(__name__)


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
            stop_node(node)
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

        start_with_retries(name, launch, self._wait_worker, forget, self.config.start_timeout_s)
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
        raylets = [(pid, st) for pid, st in processes if command_name(pid) == "raylet"]
        for pid, started in raylets:
            kill(pid, started, signal.SIGKILL)
        for pid, started in processes:
            kill(pid, started, signal.SIGKILL)
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
                f"its logs end with:\n{tail(logs)}"
            )
        return logs

    # --- internals ------------------------------------------------------------------------

    def _auth_header(self) -> dict[str, str]:
        return {"Content-Type": "application/json", "Authorization": f"Bearer {self._token}"}

    def _launch(self, name: str, args: Sequence[str]) -> RayNode:
        assert self.temp_dir is not None
        return launch_node(
            name,
            self.temp_dir / name,
            args,
            env=node_env(self.config.env, self._token),
            object_store_mb=self.config.object_store_mb,
        )

    def _start_head(self) -> None:
        def launch() -> RayNode:
            self._launch_head()
            assert self.head is not None
            return self.head

        def forget(node: RayNode) -> None:
            self.head = None

        start_with_retries("head", launch, self._wait_head, forget, self.config.start_timeout_s)

    def _launch_head(self) -> None:
        gcs_port, dashboard_port = free_port(), free_port()
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
            args.append(f"--ray-client-server-port={free_port()}")
        self.head = self._launch("head", args)
        self.dashboard_url = f"http://{HOST}:{dashboard_port}"
        self._client = None

    def _wait_head(self, head: RayNode, deadline: float) -> None:
        assert self.temp_dir is not None
        head_dir = self.temp_dir / "head"

        def ready() -> bool:
            address = read_address(head_dir)
            if address and agents_listening(head) and self._jobs_api_ready():
                self.gcs_address = address
                return True
            return False

        failure = f"the head node did not serve the Jobs API at {self.dashboard_url}"
        wait_until_up(head, ready, deadline, failure, self.config.start_timeout_s)

    def _launch_worker(self, name: str) -> RayNode:
        args = [
            f"--address={self.gcs_address}",
            f"--num-cpus={self.config.worker_cpus}",
            "--num-gpus=0",
            f"--resources={json.dumps({RESOURCE_PREFIX + name: 1})}",
        ]
        return self._launch(name, args)

    def _wait_worker(self, node: RayNode, deadline: float) -> None:
        def ready() -> bool:
            with contextlib.suppress(LocalClusterError):
                return agents_listening(node) and node.name in self.node_ids()
            return False

        failure = f"worker node {node.name} did not join"
        wait_until_up(node, ready, deadline, failure, self.config.start_timeout_s)

    def _jobs_api_ready(self) -> bool:
        try:
            self.job_client().list_jobs()
        except Exception:  # connection refused, HTTP 5xx while the dashboard starts
            self._client = None
            return False
        return True


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
                f"with:\n{tail(client.get_job_logs(submission_id))}"
            )
        time.sleep(poll_s)


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
