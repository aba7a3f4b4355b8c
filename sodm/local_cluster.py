"""A real Ray cluster of several nodes on one machine, with an MLflow tracking server beside it:
what the multi-node tests and `bench/chaos_cluster.py` run on, and a way to try a cluster
submission before renting one.

Each node is one `ray start` (the head with `--head`, the others with `--address`): its own raylet,
object store, workers and temp dir (nodes that share a temp dir share a runtime-env cache, and one
node's cleanup then deletes a job's working directory under another), started in a session of
its own, so that SIGKILL to its process group is what the cluster sees when a spot machine goes.
The head is started with token authentication on (the token made with `ray get-auth-token
--generate` in a home of its own, as cluster/README.md says), `ray job stop` sending SIGINT, and
health checks shortened so that a killed node is declared dead within a few seconds (Ray's own
node-death tests do the same).

    from sodm.local_cluster import LocalCluster
    with LocalCluster("/tmp/c1") as c:        # a short path: Ray's socket paths have a length limit
        c.add_node(cpus=2); c.add_node(cpus=2)
        c.env                                  # what a client needs: RAY_AUTH_MODE, HOME, PATH
        c.dashboard                            # http://127.0.0.1:<port>, for `ray job submit`
        c.kill(c.node_of_title("ray::RayTrainWorker"))

Nothing here is used by training or certification; it only starts and stops processes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from sodm.cluster import free_port

# A node is declared dead after about failure_threshold x period once it stops answering.
FAST_HEALTH_CHECK = {"RAY_health_check_failure_threshold": "3", "RAY_health_check_period_ms": "1000",
                     "RAY_health_check_timeout_ms": "1000", "RAY_health_check_initial_delay_ms": "1000"}


@dataclass
class Node:
    """One `ray start` of the cluster: its name, temp dir, CPUs, process group and Ray node id."""

    name: str
    temp: Path
    cpus: float
    pgid: int = 0
    node_id: str = ""
    alive: bool = True
    labels: dict = field(default_factory=dict)


class LocalCluster:
    """A head (no CPUs by default: it runs only the job's driver, like the shipped clusters'
    heads) and the worker nodes added with add_node; shut down on exit, and only these processes
    (never `ray stop`, which stops every Ray on the machine)."""

    def __init__(self, root: str | Path, head_cpus: float = 0, extra_env: dict | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.home = self.root / "home"
        self.home.mkdir(exist_ok=True)
        self.bin = Path(sys.executable).parent
        env = {k: v for k, v in os.environ.items()
               if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
        env.update(HOME=str(self.home), RAY_USAGE_STATS_ENABLED="0",
                   PATH=f"{self.bin}{os.pathsep}{env.get('PATH', '')}", **(extra_env or {}))
        self.nodes: list[Node] = []
        self.port = free_port()
        dash = free_port()
        # every process of the cluster asks its own dashboard for state (Train's placement-group
        # cleaner asks with no address, and another Ray on the machine makes that ambiguous)
        env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dash}"
        self.env = {**env, "RAY_AUTH_MODE": "token"}  # a client's: sends ~/.ray/auth_token
        self.dashboard = ""
        made = subprocess.run([str(self.bin / "ray"), "get-auth-token", "--generate"], env=env,
                              capture_output=True, text=True, timeout=120)
        if made.returncode != 0:
            raise RuntimeError(f"ray get-auth-token --generate failed: {made.stderr[-2000:]}")
        self.token = (self.home / ".ray" / "auth_token").read_text().strip()
        self._start("head", head_cpus, ["--head", f"--port={self.port}", f"--dashboard-port={dash}",
                                        "--dashboard-host=127.0.0.1",
                                        f"--ray-client-server-port={free_port()}"],
                    {**FAST_HEALTH_CHECK, "RAY_JOB_STOP_SIGNAL": "SIGINT", "RAY_JOB_STOP_WAIT_TIME_S": "120"})
        self.dashboard = f"http://127.0.0.1:{dash}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _start(self, name: str, cpus: float, args: list[str], extra: dict | None = None,
               private: list[Path] = (), attempts: int = 3) -> Node:
        """`ray start`, tried again when it times out: Ray gives a node 30 s to register (fixed
        in ray/_private/node.py), which a loaded 2-core machine can miss."""
        for attempt in range(1, attempts + 1):
            try:
                return self._start_once(name, cpus, args, extra, private)
            except RuntimeError:
                if attempt == attempts:
                    raise
                time.sleep(2)

    def _start_once(self, name, cpus, args, extra, private) -> Node:
        temp = self.root / f"n{len(self.nodes)}"  # each node its own temp dir
        node = Node(name, temp, cpus)
        cmd = [str(self.bin / "ray"), "start", *args, f"--num-cpus={cpus:g}", f"--temp-dir={temp}",
               f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
               "--block"]
        if private:  # a mount namespace of its own, an empty disk at each of these paths
            mounts = " && ".join(f"mount -t tmpfs sodm-private '{p}'" for p in private)
            cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   f'{mounts} && exec "$@"', "sh", *cmd]
        log = open(self.root / f"{name}.log", "wb")
        proc = subprocess.Popen(cmd, env={**self.env, **(extra or {})}, cwd=self.home, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        node.pgid, node.proc = proc.pid, proc  # its own session: its process group is the node
        log_path = self.root / f"{name}.log"
        deadline = time.time() + 300  # a loaded 2-core machine can take minutes
        while "Ray runtime started" not in log_path.read_text(errors="replace"):
            if proc.poll() is not None or time.time() > deadline:
                self._kill_group(node)
                raise RuntimeError(f"ray start ({name}) failed: {log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        node.node_id = self._raylet_node_id(node)
        self.nodes.append(node)
        return node

    def add_node(self, cpus: float = 2, name: str | None = None, private: list[Path] = ()) -> Node:
        """A worker node joining the head. private: paths this node sees as a disk of its own
        (an empty tmpfs in a mount namespace of its own: a machine that does not share them);
        PermissionError where this process may not make mount namespaces (it needs root)."""
        if private:
            probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True, text=True)
            if probe.returncode != 0:
                raise PermissionError(probe.stderr.strip() or "unshare --mount failed")
        return self._start(name or f"worker{len(self.nodes)}", cpus, [f"--address={self.address}"],
                           private=[Path(p) for p in private])

    def processes(self, node: Node) -> list:
        """The live processes of a node: its process group (ray start, raylet, agents) and every
        descendant of those (the raylet starts its workers in process groups of their own)."""
        import psutil

        group = []
        for p in psutil.process_iter(["pid"]):
            try:
                if os.getpgid(p.pid) == node.pgid:
                    group.append(p)
            except (ProcessLookupError, psutil.NoSuchProcess):
                pass
        found = {p.pid: p for p in group}
        for p in group:
            try:
                found.update({c.pid: c for c in p.children(recursive=True)})
            except psutil.NoSuchProcess:
                pass
        return list(found.values())

    def _raylet_node_id(self, node: Node) -> str:
        for p in self.processes(node):
            try:
                cmd = p.cmdline()
            except Exception:
                continue
            if cmd and cmd[0].endswith("/raylet"):
                for arg in cmd:
                    if m := re.fullmatch(r"--node_id=([0-9a-f]+)", arg):
                        return m.group(1)
        return ""

    def titled(self, title: str) -> dict[str, int]:
        """How many processes titled `title` (a Ray actor's `ray::Class`) each live node runs."""
        counts: dict[str, int] = {}
        for node in self.nodes:
            if not node.alive:
                continue
            for p in self.processes(node):
                try:
                    if title in " ".join(p.cmdline()):
                        counts[node.name] = counts.get(node.name, 0) + 1
                except Exception:
                    pass
        return counts

    def node_of_title(self, title: str) -> Node | None:
        """The first live worker node running a process titled `title`, or None."""
        names = self.titled(title)
        return next((n for n in self.nodes if n.name in names and n.name != "head"), None)

    def kill(self, node: Node) -> None:
        """Lose the node: SIGKILL to its whole process group, nothing saved."""
        self._kill_group(node)
        node.alive = False

    def _kill_group(self, node: Node) -> None:
        members = self.processes(node)  # found first: the workers outside the group too
        try:
            os.killpg(node.pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for p in members:
            try:
                p.kill()
            except Exception:
                pass
        if getattr(node, "proc", None) is not None:
            try:
                node.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass

    def shutdown(self) -> None:
        for node in reversed(self.nodes):
            if node.alive:
                self.kill(node)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()


class MLflowServer:
    """`mlflow server` on 127.0.0.1 with a sqlite store and served artifacts, as on a cluster (the
    trials log over HTTP, never to a file of the driver's machine)."""

    def __init__(self, root: str | Path, timeout: float = 180):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        log = open(self.root / "mlflow-server.log", "ab")
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{(self.root / 'mlflow.db').resolve()}",
             "--serve-artifacts", "--artifacts-destination", str((self.root / "artifacts").resolve())],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError("mlflow server did not start: "
                                   + (self.root / "mlflow-server.log").read_text()[-3000:])
            time.sleep(0.5)

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
