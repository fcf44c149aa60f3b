"""A real Ray head on loopback (`ray start --head`), `rayedit submit` through the Job Submission API,
`rayedit status` until the campaign is done, then logs, jobs and results — the cluster path users take."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from test_runtime import _spec_dict, _write_requests, _write_spec
from typer.testing import CliRunner

from rayedit.cli import app
from rayedit.store import committed_steps, open_store, sanitize_id
from rayedit.store.layout import list_streams

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_with(marker: str) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if marker.encode() in (d / "cmdline").read_bytes():
                    out.append(int(d.name))
            except OSError:  # gone, or not ours to read
                continue
    return out


def _kill_tree(root_pid: int, marker: str) -> None:
    """Stop only the Ray processes this test started (`ray stop` would kill every Ray of the user): the
    `ray start --block` process group, then any process still carrying our temp dir on its command line."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(root_pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while (pids := _pids_with(marker)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)  # let the kernel reap before looking again


@pytest.fixture(scope="module")
def ray_head():
    # unix socket paths must stay short (< 108 bytes): a short temp dir, not pytest's tmp_path
    temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")
    port, dash = _free_port(), _free_port()
    # the head runs in this venv, as a cluster node runs in the environment its setup commands built:
    # the job's `python` is then the venv's
    venv_bin = str(Path(sys.executable).parent)
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               PATH=f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}")
    ray_bin = str(Path(venv_bin) / "ray")
    # every port our own: another Ray on the machine (a test session, a user's) holds the default agent ports
    agent, grpc, metrics, renv, client = (_free_port() for _ in range(5))
    cmd = [ray_bin, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
           f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={grpc}",
           f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={renv}", f"--ray-client-server-port={client}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2", f"--temp-dir={temp}",
           "--disable-usage-stats", "--include-dashboard=true"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        import urllib.request

        deadline = time.monotonic() + 90
        while True:  # the job API answers once the dashboard is up
            try:
                with urllib.request.urlopen(f"{address}/api/version", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray head did not come up (exit {proc.poll()})")
            time.sleep(0.5)  # polling a server coming up, not timing anything
        yield address
    finally:
        _kill_tree(proc.pid, temp)
        shutil.rmtree(temp, ignore_errors=True)


def test_submit_status_logs_on_a_ray_head(ray_head: str, tmp_path: Path) -> None:
    # the project folder shipped with the job: the package and the campaign's files
    work = tmp_path / "project"
    shutil.copytree(REPO / "rayedit", work / "rayedit", ignore=shutil.ignore_patterns("__pycache__"))
    data = _write_requests(work / "r.jsonl")
    spec = _write_spec(work, _spec_dict(Path("r.jsonl"), name="submitted") | {"datasets": [
        {"kind": "requests", "path": data.name}]})
    store = str(tmp_path / "store")  # absolute: the job's working dir is a copy on the cluster
    runner = CliRunner()
    res = runner.invoke(app, ["submit", str(spec), "--address", ray_head, "--store", store,
                              "--working-dir", str(work)])
    assert res.exit_code == 0, res.output
    found = re.search(r"submitted (\S+) to", res.output)
    assert found, res.output
    job_id = found.group(1)
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(ray_head)
    deadline = time.monotonic() + 300
    while client.get_job_status(job_id) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.monotonic() < deadline, client.get_job_logs(job_id)
        time.sleep(1)  # polling a remote job's state
    logs = runner.invoke(app, ["logs", job_id, "--address", ray_head])
    assert client.get_job_status(job_id) == JobStatus.SUCCEEDED, logs.output
    assert "campaign submitted" in logs.output  # the driver's summary table went to the job log
    jobs = runner.invoke(app, ["jobs", "--address", ray_head])
    assert job_id in jobs.output and "SUCCEEDED" in jobs.output and "spec.yaml" in jobs.output

    cid = sanitize_id("submitted")
    st = open_store(store, create=False)
    sids = list_streams(st, cid)
    assert len(sids) == 2 and all(committed_steps(st, cid, s) == [0, 1] for s in sids)
    status = runner.invoke(app, ["status", cid, "--store", store])
    assert status.exit_code == 0 and "run state: finished" in status.output and "2/2" in status.output
    stop = runner.invoke(app, ["stop", job_id, "--address", ray_head])
    assert stop.exit_code == 0 and "already finished" in stop.output
    bad = runner.invoke(app, ["logs", "raysubmit_nope", "--address", ray_head])
    assert bad.exit_code == 2 and "raysubmit_nope" in bad.output
