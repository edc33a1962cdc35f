"""One node of the local cluster (breakhis.dev.localcluster) as processes: its ``ray start
--block`` process and everything below it, started with ports chosen here, stopped and
killed by PID (checked against the process's start time, so a reused PID is never
signalled), and the files through which its raylet learns its agents' ports."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from breakhis.dev.clusterconfig import LocalClusterError

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
# Ray's port file name -> the `ray start` option that sets that port.
AGENT_PORT_FLAGS = {
    "dashboard_agent_listen_port": "dashboard-agent-listen-port",
    "metrics_agent_port": "dashboard-agent-grpc-port",
    "runtime_env_agent_port": "runtime-env-agent-port",
    "metrics_export_port": "metrics-export-port",
}
_LOG_TAIL_LINES = 30
_STOP_GRACE_S = 15.0
# Variables that would point the nodes at another cluster or another token.
_INHERITED_RAY_ENV = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH")


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


def launch_node(
    name: str, node_dir: Path, args: Sequence[str], *, env: Mapping[str, str], object_store_mb: int
) -> RayNode:
    """Start ``ray start --block`` for node ``name`` in its own temp dir ``node_dir`` (a
    failed attempt's folder is renamed aside first), with agent ports chosen here, the
    extra ``args``, ``env`` as its whole environment, in its own session. Returns the
    RayNode; waits for nothing."""
    if node_dir.exists():
        # Left by an attempt that failed to start: kept aside for its logs, and so that
        # its address file is not taken for the new node's.
        node_dir.rename(node_dir.with_name(f"{name}.failed-{time.monotonic_ns()}"))
    node_dir.mkdir()
    log_path = node_dir / "ray-start.log"
    agent_ports = {name: free_port() for name in AGENT_PORT_FLAGS}
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
        f"--object-store-memory={object_store_mb * 1_000_000}",
        # Ports chosen here rather than Ray's fixed defaults (52365 would clash between
        # nodes of this machine), and announced to the raylet by announce_agent_ports.
        *(f"--{AGENT_PORT_FLAGS[name]}={port}" for name, port in agent_ports.items()),
        "--disable-usage-stats",
        *args,
    ]
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            command,
            env=dict(env),
            cwd=node_dir,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    logger.info("started Ray node %s (ray start pid %d)", name, process.pid)
    return RayNode(name=name, process=process, log_path=log_path, agent_ports=agent_ports)


def node_env(extra: Mapping[str, str], token: str) -> dict[str, str]:
    """The whole environment of a node's processes: this process's, without what would
    point it at another cluster or token, with ``extra`` and the cluster's ``token``."""
    env = {k: v for k, v in os.environ.items() if k not in _INHERITED_RAY_ENV}
    # Several nodes start on one shared machine: give Ray's agents and workers more
    # time to come up than its defaults (about 30 s and 60 s), which a busy machine
    # exceeds (the raylet then aborts). `env` may set other values.
    env["RAY_agent_register_timeout_ms"] = "180000"
    env["RAY_worker_register_timeout_seconds"] = "180"
    env.update(extra)
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN"] = token
    # Job entrypoints say `python ...`: make that this environment's Python.
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    # SIGTERM makes a node drain for up to 30 s first; stop() has nothing to drain.
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


def start_with_retries(
    name: str,
    launch: Callable[[], RayNode],
    wait: Callable[[RayNode, float], None],
    forget: Callable[[RayNode], None],
    timeout_s: float,
) -> None:
    """Launch a node and wait until it is up. A node whose `ray start` exits while
    starting (a busy machine: Ray gives its agents ~15 s; a port taken meanwhile) is
    launched again after a pause, until ``timeout_s`` has passed."""
    deadline = time.monotonic() + timeout_s
    pause = 5.0
    while True:
        node = launch()
        try:
            wait(node, deadline)
            return
        except LocalClusterError as err:
            exited = not node.is_running()
            stop_node(node)
            forget(node)
            if not exited or time.monotonic() + pause > deadline:
                raise
            logger.warning("Ray node %s failed to start (%s); retrying in %.0f s", name, err, pause)
            time.sleep(pause)
            pause = min(2 * pause, 30.0)


def check_running(node: RayNode) -> None:
    """Raise LocalClusterError, with why and the output's tail, when ``ray start`` has exited."""
    if not node.is_running():
        raise LocalClusterError(
            f"`ray start` for node {node.name} exited with code {node.process.returncode}"
            f"{raylet_failure(node.log_path.parent)}; its output ends with:\n"
            f"{tail(read_log(node.log_path))}"
        )


def wait_until_up(
    node: RayNode, ready: Callable[[], bool], deadline: float, failure: str, timeout_s: float
) -> None:
    """Announce the node's agent ports and poll ``ready`` until it is true. Raises
    LocalClusterError when ``ray start`` exits, or with ``failure`` and the tail of its
    output once ``deadline`` (time.monotonic) has passed."""
    while True:
        announce_agent_ports(node)
        check_running(node)
        if ready():
            return
        if time.monotonic() > deadline:
            raise LocalClusterError(
                f"{failure} within {timeout_s:g} s; its `ray start` output ends with:\n"
                f"{tail(read_log(node.log_path))}"
            )
        time.sleep(0.5)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def read_address(temp_dir: Path | None) -> str:
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


def command_name(pid: int) -> str:
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


def kill(pid: int, started: int, sig: signal.Signals) -> None:
    """Signal ``pid`` only if it is still the process that started at ``started``."""
    if _start_time(pid) != started:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def stop_node(node: RayNode) -> None:
    processes = node.processes()
    if node.is_running():
        with contextlib.suppress(ProcessLookupError):
            node.process.send_signal(signal.SIGTERM)
        try:
            node.process.wait(timeout=_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            logger.warning("Ray node %s ignored SIGTERM; killing it", node.name)
    for pid, started in processes:
        kill(pid, started, signal.SIGKILL)
    if node.process.poll() is None:
        node.process.wait()


def announce_agent_ports(node: RayNode) -> None:
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
        if command_name(pid) != "raylet":
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


def agents_listening(node: RayNode) -> bool:
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


def raylet_failure(node_dir: Path) -> str:
    """The raylet's fatal log line (why the node did not start), as ' (raylet: ...)', or ''."""
    for log in sorted(node_dir.glob("session_*/logs/raylet*.out")):
        for line in read_log(log).splitlines():
            if "Check failed" in line:
                return f" (raylet: {line.split('Check failed', 1)[1].strip(': ')})"
    return ""


def read_log(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError as err:
        return f"(unreadable: {err})"


def tail(text: str) -> str:
    return "\n".join(text.splitlines()[-_LOG_TAIL_LINES:])
