"""A throwaway multi-node Ray cluster on this host, started the usual way (``ray start``).

For tests, benchmarks and trying ``--executor ray --address`` without a real cluster. Each node is
one ``ray start --block`` process in its own session, with its own ``--temp-dir`` and free
ports (GCS, dashboard, dashboard agent), so several clusters (other test runs on the machine) never
collide, and a node can be killed on its own, as a crashed machine would be: SIGKILL to its whole
session (raylet, object store, agents, workers), with no chance to clean up.

Decisions, from what Ray (2.60) needs here:

* ``--node-ip-address 127.0.0.1``: Ray maps a loopback address to the host's own IP (it never runs
  multi-node on 127.0.0.1), so nodes and the driver talk over that address without leaving the
  host. The GCS listens on every interface, so ``127.0.0.1:PORT`` works as ``--address``.
* Token authentication (the default of ``ray start --head`` once ``~/.ray/auth_token`` exists):
  the cluster gets its own random token through ``RAY_AUTH_TOKEN`` (nodes and drivers alike, see
  :attr:`LocalCluster.env`), independent of the shared ``~/.ray``.
* ``--object-store-memory`` 128 MiB per node (the default, 30 % of RAM per node, is far more than
  a batch needs: its tasks pass job descriptions and results of a few hundred bytes).
* One log monitor per host (``--include-log-monitor=false`` on added nodes), no usage stats;
  health checks every second, so a killed node is declared dead in about 3 s, not 15 s.
* ``python``: the interpreter the nodes (and their workers) run. One that cannot import lorakit
  shows that a job ships the package to its workers (:mod:`lorakit.cluster`).

Example:
    >>> with LocalCluster(head_cpus=1) as cluster:            # doctest: +SKIP
    ...     worker = cluster.add_node(cpus=1)
    ...     # lorakit resize loras -o small --rank 4 --executor ray --address cluster.address
    ...     cluster.kill(worker)                              # the node crashes
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from lorakit.errors import ClusterError

STARTED = "Ray runtime started."
OBJECT_STORE_BYTES = 128 << 20


def free_port() -> int:
    """A TCP port free on this host right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Node:
    """One ``ray start --block`` process (its session holds the node's processes)."""

    name: str
    process: subprocess.Popen
    temp_dir: Path
    log: Path

    @property
    def alive(self) -> bool:
        return self.process.poll() is None


@dataclass
class LocalCluster:
    """A head node (started on entering) and any nodes added; every node stopped on exit.

    Fields:
        head_cpus: CPUs the head node offers to tasks (0: the head only schedules).
        python: interpreter for the nodes; None: this one.
        env: extra environment for the nodes (e.g. ``HF_HUB_OFFLINE``, ``HF_HUB_CACHE``).
        start_timeout: seconds a node may take to start.
    """

    head_cpus: int = 1
    python: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    start_timeout: float = 90.0
    nodes: list[Node] = field(default_factory=list, init=False)
    port: int = field(default=0, init=False)
    root: Path | None = field(default=None, init=False)
    token: str = field(default_factory=lambda: secrets.token_hex(32), init=False)

    @property
    def address(self) -> str:
        """What ``ray start --address`` and ``--executor ray --address`` take."""
        return f"127.0.0.1:{self.port}"

    @property
    def client_env(self) -> dict[str, str]:
        """Environment a driver needs to connect (token authentication)."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def __enter__(self) -> LocalCluster:
        # short: Ray's unix socket paths (temp dir + session + sockets/...) must fit 107 bytes
        self.root = Path(tempfile.mkdtemp(prefix="lkray", dir="/tmp"))
        self.port = free_port()
        try:
            self._start("head", ["--head", "--port", str(self.port), "--include-dashboard=false",
                                 "--dashboard-port", str(free_port())], self.head_cpus)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def add_node(self, cpus: int = 1) -> Node:
        """Join one more node (``ray start --address``) with ``cpus`` CPUs; returns once started."""
        return self._start(f"node{len(self.nodes)}", ["--address", self.address,
                                                      "--include-log-monitor=false"], cpus)

    def _start(self, name: str, args: list[str], cpus: int) -> Node:
        assert self.root is not None, "use LocalCluster as a context manager"
        temp = self.root / name
        log = self.root / f"{name}.log"
        cmd = [self.python or sys.executable, "-m", "ray.scripts.scripts", "start", "--block",
               *args, "--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus),
               "--dashboard-agent-listen-port", str(free_port()),
               "--object-store-memory", str(OBJECT_STORE_BYTES), "--disable-usage-stats",
               "--temp-dir", str(temp)]
        env = {**os.environ, **self.env, **self.client_env, "RAY_USAGE_STATS_ENABLED": "0",
               "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
               "RAY_health_check_failure_threshold": "3"}
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        node = Node(name, proc, temp, log)
        self.nodes.append(node)
        deadline = time.monotonic() + self.start_timeout
        while STARTED not in log.read_text(errors="replace"):
            if not node.alive or time.monotonic() > deadline:
                tail = log.read_text(errors="replace").strip().splitlines()[-3:]
                raise ClusterError(f"Ray node {name} did not start: {' / '.join(tail)}",
                                   path=log)
            time.sleep(0.2)
        return node

    def kill(self, node: Node) -> None:
        """SIGKILL every process of ``node`` (raylet, object store, agents, workers), as a
        machine crash would."""
        _signal_session(node, signal.SIGKILL)
        node.process.wait(timeout=10)

    def stop(self) -> None:
        """Stop every node (SIGTERM to ``ray start --block``, which stops its processes; SIGKILL
        to whatever is left of the session after 15 s) and remove the temp dirs."""
        for node in reversed(self.nodes):
            if node.alive:
                node.process.terminate()
        deadline = time.monotonic() + 15
        for node in reversed(self.nodes):
            try:
                node.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_session(node, signal.SIGKILL)  # stragglers (workers) of a stopped node
        self.nodes.clear()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None


def _signal_session(node: Node, sig: int) -> None:
    """Signal every process of the node's session: ``start_new_session`` made the ``ray start``
    process a session leader, and the raylet puts each worker in a process group of its own but
    in that session (Linux: ``/proc``)."""
    sid = node.process.pid
    pids = [int(p) for p in os.listdir("/proc") if p.isdigit()] if os.path.isdir("/proc") else []
    for pid in pids:
        try:
            if os.getsid(pid) == sid:
                os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


__all__ = ["LocalCluster", "Node", "free_port"]
