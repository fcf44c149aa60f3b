"""A real multi-node Ray cluster on one machine, for tests and benchmarks: a head (`ray start --head`) and
worker nodes (`ray start --address`), each its own process session, temp dir, ports, loopback IP and
custom resource; a node can be lost (SIGKILL of its raylet, agents and workers, by pid) and replaced.

Every node gets its own 127.x.y.z address. Ray keeps a node's servers on the loopback interface only when
its IP is exactly 127.0.0.1, and `ray start --address` cannot give a worker that IP (it resolves
127.0.0.1 to the machine's outward address unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which refuses
worker nodes), so the nodes use other 127/8 addresses: all traffic stays on loopback, but Ray's gRPC
servers listen on the wildcard address for such IPs (measured with `ss -ltn`, Ray 2.60). Ports come
from the kernel (free on every interface). Nothing here runs `ray stop`; only our own pids are killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "faults"))

import faultmatrix as fm  # noqa: E402
import yaml  # noqa: E402

from rayedit import faults  # noqa: E402
from rayedit.store import committed_steps, eval_parts_done, open_store, read_committed_step  # noqa: E402
from rayedit.store.layout import EDITS, list_streams  # noqa: E402

JOB_TIMEOUT_S = 300.0
REPLICA = {"replica": 1}  # what a replica needs; only worker nodes advertise it (the head has none)

# A node lost is noticed by the GCS after health_check_period × failure_threshold (default 3 s × 5 + the
# timeouts); shorter here so a test does not wait half a minute for each loss.
FAST_FAILURE_DETECTION = {"RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "1000",
                          "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "3"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))  # free on every interface: the nodes' servers listen on the wildcard address
        return s.getsockname()[1]


def session_pids(leader: int) -> list[int]:
    """Pids of the process session ``leader`` started (``ray start`` with start_new_session): the node's
    raylet, its agents and every worker the raylet forked."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                if os.getsid(int(d.name)) == leader:
                    out.append(int(d.name))
    return sorted(out)


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


@dataclass
class Node:
    name: str
    ip: str
    temp: str
    proc: subprocess.Popen
    resources: dict[str, float]
    env: dict[str, str] = field(default_factory=dict)

    @property
    def resource(self) -> str:
        """The custom resource only this node advertises (a test reads it back to name the node)."""
        return f"rayedit-node-{self.name}"

    def pids(self) -> list[int]:
        return [p for p in session_pids(self.proc.pid) if pid_alive(p)]


class LoopbackCluster:
    """Head + worker nodes on loopback. ``python`` and ``ray`` are this venv's (as a node's setup commands
    would install them), so a job's entrypoint runs in the same environment as its tasks."""

    def __init__(self, base_env: dict[str, str] | None = None) -> None:
        self.venv_bin = str(Path(sys.executable).parent)
        self.env = dict(base_env if base_env is not None else os.environ)
        self.env.update(RAY_AUTH_MODE="disabled", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                        PATH=f"{self.venv_bin}{os.pathsep}{self.env.get('PATH', '')}")
        # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (the single-node setting) refuses worker nodes
        self.env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        self.nodes: dict[str, Node] = {}
        self.net = f"127.{random.randint(100, 250)}.{random.randint(1, 250)}"  # this cluster's /24 on lo
        self._next_ip = 10
        self.gcs = ""
        self.dashboard = ""

    # -- nodes ----------------------------------------------------------------------------------------------
    def _ip(self) -> str:
        ip = f"{self.net}.{self._next_ip}"
        self._next_ip += 1
        return ip

    def _start(self, name: str, args: list[str], num_cpus: float, resources: dict[str, float],
               env: dict[str, str] | None) -> Node:
        ip = self._ip()
        temp = tempfile.mkdtemp(prefix=f"rn{name[:3]}", dir="/tmp")  # short: unix socket paths < 108 bytes
        res = {**resources, f"rayedit-node-{name}": 1}
        ports = {k: free_port() for k in ("agent", "grpc", "metrics", "renv")}
        cmd = [str(Path(self.venv_bin) / "ray"), "start", "--block", *args, f"--node-ip-address={ip}",
               f"--num-cpus={num_cpus}", f"--resources={json.dumps(res)}", f"--temp-dir={temp}",
               f"--dashboard-agent-listen-port={ports['agent']}", f"--dashboard-agent-grpc-port={ports['grpc']}",
               f"--metrics-export-port={ports['metrics']}", f"--runtime-env-agent-port={ports['renv']}",
               "--disable-usage-stats"]
        node_env = {**self.env, **(env or {})}
        log = open(f"{temp}.log", "wb")  # noqa: SIM115 - the node writes to it for its whole life
        proc = subprocess.Popen(cmd, env=node_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        node = Node(name, ip, temp, proc, res, dict(env or {}))
        self.nodes[name] = node
        return node

    def start_head(self, num_cpus: float = 1, resources: dict[str, float] | None = None,
                   timeout: float = 120) -> Node:
        port, dash, client = free_port(), free_port(), free_port()
        env = dict(FAST_FAILURE_DETECTION)
        head = self._start("head", ["--head", f"--port={port}", "--include-dashboard=true",
                                    f"--dashboard-host={self.net}.10", f"--dashboard-port={dash}",
                                    f"--ray-client-server-port={client}"], num_cpus, resources or {}, env)
        self.gcs = f"{head.ip}:{port}"
        self.dashboard = f"http://{head.ip}:{dash}"
        deadline = time.monotonic() + timeout
        while True:  # the job API answers once the dashboard is up
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{self.dashboard}/api/version",
                                                                      timeout=2) as r:
                if r.status == 200:
                    break
            if head.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray head did not come up (exit {head.proc.poll()}): {self.log_tail('head')}")
            time.sleep(0.5)  # polling a server coming up
        return head

    def add_worker(self, name: str, num_cpus: float = 1, resources: dict[str, float] | None = None,
                   env: dict[str, str] | None = None) -> Node:
        """Start a worker node (returns at once; ``wait_alive`` waits for it to register)."""
        return self._start(name, [f"--address={self.gcs}"], num_cpus, resources or {}, env)

    def alive_nodes(self) -> dict[str, str]:
        """node id → our node name, for the nodes the GCS has alive (state API over the dashboard)."""
        from ray.util.state import list_nodes

        out = {}
        for n in list_nodes(address=self.dashboard, detail=True, raise_on_missing_output=False):
            if n.state != "ALIVE":
                continue
            names = [k[len("rayedit-node-"):] for k in (n.resources_total or {}) if k.startswith("rayedit-node-")]
            if names:
                out[n.node_id] = names[0]
        return out

    def wait_alive(self, names: list[str], timeout: float = 120) -> dict[str, str]:
        """Wait until every node in ``names`` is registered and alive; returns name → node id."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(Exception):  # the dashboard may be busy: ask again
                by_name = {v: k for k, v in self.alive_nodes().items()}
                if all(n in by_name for n in names):
                    return by_name
            for n in names:
                if self.nodes[n].proc.poll() is not None:
                    raise RuntimeError(f"node {n} exited ({self.nodes[n].proc.poll()}): {self.log_tail(n)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"nodes {names} not alive after {timeout:.0f} s")
            time.sleep(0.5)  # polling the GCS

    def node_of_pid(self, pid: int) -> str | None:
        """Which of our nodes a process belongs to (its session)."""
        with contextlib.suppress(OSError):
            sid = os.getsid(pid)
            for n in self.nodes.values():
                if n.proc.pid == sid:
                    return n.name
        return None

    def kill_node(self, name: str) -> list[int]:
        """Lose a node abruptly: SIGKILL its raylet, agents and workers (every pid of its session), as a
        spot pre-emption or a power loss would. Returns the pids killed."""
        node = self.nodes[name]
        killed: list[int] = []
        deadline = time.monotonic() + 20
        while (pids := node.pids()) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.1)  # let the kernel reap before looking again
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.proc.wait(timeout=5)
        return sorted(set(killed))

    def stop_node(self, name: str) -> None:
        """Scale a node down (SIGTERM to its session, then SIGKILL whatever is left) and forget it."""
        node = self.nodes.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while node.pids() and time.monotonic() < deadline:
            time.sleep(0.2)
        self.nodes[name] = node
        self.kill_node(name)
        del self.nodes[name]
        shutil.rmtree(node.temp, ignore_errors=True)

    def log_tail(self, name: str, chars: int = 1500) -> str:
        with contextlib.suppress(OSError):
            return Path(f"{self.nodes[name].temp}.log").read_text(errors="replace")[-chars:]
        return ""

    def stop(self) -> None:
        """Workers first, head last; only our own pids, SIGTERM then SIGKILL."""
        for node in sorted(self.nodes.values(), key=lambda n: n.name == "head"):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while any(n.pids() for n in self.nodes.values()) and time.monotonic() < deadline:
            time.sleep(0.2)
        for node in self.nodes.values():
            self.kill_node(node.name)
            shutil.rmtree(node.temp, ignore_errors=True)
            with contextlib.suppress(OSError):
                os.unlink(f"{node.temp}.log")


# --- campaigns on the cluster ---------------------------------------------------------------------------
def write_campaign(folder: Path, stats_samples: int = 1500) -> Path:
    """The fault matrix's campaign (2 streams × 3 steps, evaluation after every step) with replicas that need
    the ``replica`` resource, and a statistics corpus of 1500 documents (two ranges of ≤ 1000)."""
    spec_path = fm.write_inputs(folder / "inputs")
    spec = yaml.safe_load(spec_path.read_text())
    spec["models"][0]["resources"] = dict(REPLICA)
    spec["stats_samples"] = stats_samples
    for m in spec["methods"]:
        m["hparams"].pop("mom2_n_samples", None)
    project = folder / "project"  # what `rayedit submit` ships: the package and the spec (data: absolute paths)
    shutil.copytree(ROOT / "rayedit", project / "rayedit", ignore=shutil.ignore_patterns("__pycache__"))
    (project / "spec.yaml").write_text(yaml.safe_dump(spec))
    return project / "spec.yaml"


def submit(dashboard: str, spec: Path, store: str) -> str:
    from typer.testing import CliRunner

    from rayedit.cli import app

    res = CliRunner().invoke(app, ["submit", str(spec), "--address", dashboard, "--store", store,
                                   "--working-dir", str(spec.parent)])
    assert res.exit_code == 0, res.output
    found = re.search(r"submitted (\S+) to", res.output)
    assert found, res.output
    return found.group(1)


def job_status(dashboard: str, job: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return str(JobSubmissionClient(dashboard).get_job_status(job))


def job_logs(dashboard: str, job: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(dashboard).get_job_logs(job)


def wait_job(dashboard: str, job: str, timeout: float = JOB_TIMEOUT_S) -> str:
    deadline = time.monotonic() + timeout
    while (status := job_status(dashboard, job)) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job} still {status} after {timeout:.0f} s:\n{job_logs(dashboard, job)[-3000:]}")
        time.sleep(1)  # polling a remote job's state
    return status


def wait_fired(folder: Path, point: str, dashboard: str, job: str, timeout: float = JOB_TIMEOUT_S) -> dict:
    deadline = time.monotonic() + timeout
    while (rec := faults.fired(folder, point)) is None:
        status = job_status(dashboard, job)
        if status in ("SUCCEEDED", "FAILED", "STOPPED") or time.monotonic() > deadline:
            raise AssertionError(f"fault point {point} never fired (job {status}):\n"
                                 f"{job_logs(dashboard, job)[-3000:]}")
        time.sleep(0.2)  # polling for the replica to reach its fault point
    return rec


def placement(store_uri: str, names: dict[str, str]) -> tuple[dict[tuple[str, int], str], dict[tuple, set[str]]]:
    """(stream, step) → node name that committed it; (stream, step, suite, shard) → node names in its rows."""
    store = open_store(store_uri, create=False)
    steps, shards = {}, {}
    for sid in list_streams(store, fm.CID):
        for step in committed_steps(store, fm.CID, sid):
            nodes = set(read_committed_step(store, fm.CID, sid, step).table(EDITS).column("node_id").to_pylist())
            assert len(nodes) == 1, (sid, step, nodes)
            steps[(sid, step)] = names.get(nodes.pop(), "?")
            for sh in eval_parts_done(store, fm.CID, sid, step, fm.SUITE):
                import pyarrow.parquet as pq

                fs, [path] = store.pyarrow_paths([fm.eval_part_key(fm.CID, sid, step, fm.SUITE, sh)])
                tbl = pq.read_table(path, filesystem=fs)
                shards[(sid, step, fm.SUITE, sh)] = {names.get(n, "?") for n in tbl.column("node_id").to_pylist()}
    return steps, shards


def assert_same_statistics(a_uri: str, b_uri: str) -> None:
    import torch

    from rayedit.editing.covariance import SecondMoment

    a, b = open_store(a_uri, create=False), open_store(b_uri, create=False)
    keys = sorted(a.list("cache/stats"))
    assert keys and keys == sorted(b.list("cache/stats"))
    for key in keys:
        sa, sb = SecondMoment.from_bytes(a.get_bytes(key), key), SecondMoment.from_bytes(b.get_bytes(key), key)
        assert sa.provenance["shards"] == 2 and sa.count == sb.count
        assert torch.equal(sa.sum, sb.sum), (key, float((sa.sum - sb.sum).norm() / sb.sum.norm()))
