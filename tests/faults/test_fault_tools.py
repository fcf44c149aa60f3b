"""The fault-injection hook (rayedit/faults.py) and the S3 fault proxy (tests/s3fault_proxy.py), without Ray."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import s3server
from s3fault_proxy import FaultProxy, Rule, operation

from rayedit import faults
from rayedit.store import LocalStore, StoreError, commit_step, committed_steps, open_store
from rayedit.store.errors import StoreIOError


@pytest.fixture
def fault_env(monkeypatch: pytest.MonkeyPatch):
    """Configure faults in this process; always reset afterwards (other tests must see none)."""

    def set_(text: str, folder: Path | None = None) -> None:
        if folder is not None:
            monkeypatch.setenv(faults.FAULT_DIR_ENV, str(folder))
        faults.configure(text)

    yield set_
    monkeypatch.delenv(faults.FAULT_DIR_ENV, raising=False)
    faults.configure("")


def test_parse_rules() -> None:
    rules = faults.parse_faults("delta-upload:2, local-write:3:enospc,report:1:PAUSE")
    assert rules["delta-upload"] == faults.FaultRule("delta-upload", 2, "KILL")
    assert rules["local-write"].action == "ENOSPC" and rules["report"].action == "PAUSE"
    assert faults.parse_faults("") == {} and faults.parse_faults(None) == {}
    for bad in ("delta_upload:1", "editing", "editing:0", "editing:x", "editing:1:EXPLODE", "editing:1,editing:2"):
        with pytest.raises(faults.FaultSpecError):
            faults.parse_faults(bad)


def test_unset_is_a_no_op(fault_env) -> None:
    fault_env("")
    for _ in range(3):
        for p in faults.POINTS:
            faults.fault_point(p)  # nothing happens, nothing is counted
    assert faults._RULES is None and faults._COUNTS == {}


def test_nth_time_raises_the_errno_once_per_fault_dir(fault_env, tmp_path: Path) -> None:
    fault_env("local-write:2:ENOSPC", tmp_path)
    faults.fault_point("local-write")  # 1st: nothing
    faults.fault_point("editing")  # other points: nothing
    with pytest.raises(OSError) as info:
        faults.fault_point("local-write", "the/key")
    assert info.value.errno == errno.ENOSPC and "local-write" in str(info.value)
    assert faults.fired(tmp_path, "local-write")["detail"] == "the/key"
    faults.configure("local-write:1:ENOSPC")  # a new process with the same env (a restarted replica)
    faults.fault_point("local-write")  # the fault dir says it has fired: not again


def test_kill_action_sigkills_the_process(tmp_path: Path) -> None:
    env = {**os.environ, faults.FAULT_ENV: "editing:2", faults.FAULT_DIR_ENV: str(tmp_path)}
    code = "from rayedit.faults import fault_point\nfor i in range(5):\n    print(i, flush=True)\n" \
           "    fault_point('editing')\n"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert proc.stdout.split() == [b"0", b"1"]  # died at the 2nd time, never went on
    assert faults.fired(tmp_path, "editing")["pid"] > 0


def test_enospc_in_a_local_store_write_leaves_nothing_half_written(fault_env, tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s")
    assert commit_step(store, "c", "s", 0, {"delta.safetensors": b"a" * 100, "edits.parquet": b"b" * 10})
    fault_env("local-write:2:ENOSPC", tmp_path / "f")
    (tmp_path / "f").mkdir()
    with pytest.raises(StoreIOError) as info:  # 1st write (delta) passes, the 2nd (edits) hits ENOSPC
        commit_step(store, "c", "s", 1, {"delta.safetensors": b"c" * 100, "edits.parquet": b"d" * 10})
    msg = str(info.value)
    assert "the disk is full" in msg and "edits.parquet" in msg and "rayedit resume" in msg
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    step1 = tmp_path / "s" / "campaigns"
    leftovers = [p.name for p in step1.rglob("*") if p.name.startswith(".rayedit-tmp-")]
    assert leftovers == []  # the partial file was removed
    assert committed_steps(store, "c", "s") == [0]  # the delta that did land is not committed
    assert commit_step(store, "c", "s", 1, {"delta.safetensors": b"c" * 100, "edits.parquet": b"d" * 10})


def test_proxy_operation_names() -> None:
    assert operation("PUT", "/b/k", "partNumber=1&uploadId=x") == "UploadPart"
    assert operation("POST", "/b/k", "uploads") == "CreateMultipartUpload"
    assert operation("POST", "/b/k", "uploadId=x") == "CompleteMultipartUpload"
    assert operation("DELETE", "/b/k", "uploadId=x") == "AbortMultipartUpload"
    assert operation("PUT", "/b/k", "") == "PutObject" and operation("PUT", "/b", "") == "CreateBucket"
    assert operation("GET", "/b", "list-type=2&prefix=x") == "ListObjects"
    assert operation("GET", "/b/k", "") == "GetObject" and operation("HEAD", "/b/k", "") == "HeadObject"
    with pytest.raises(ValueError):
        FaultProxy("10.0.0.1", 80)  # loopback only
    with pytest.raises(ValueError):
        Rule("delay", delay_s=(1.0, 60.0))  # bounded delays


@pytest.fixture(scope="module")
def proxied(s3_server: s3server.S3Server):
    proxy = FaultProxy(s3_server.host, s3_server.port, seed=3).start()
    yield proxy
    proxy.stop()


s3_server = s3server.s3_server
s3_env = s3server.s3_env


@pytest.mark.parametrize("kind", ["status", "reset_before", "reset_after", "delay"])
def test_store_survives_and_reports_s3_faults(kind: str, proxied: FaultProxy, s3_env, monkeypatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """Every transient fault is retried by botocore and said in one warning per operation; a conditional
    put whose reply was lost (reset/timeout after it landed) still counts as ours, once."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxied.endpoint_url)
    monkeypatch.setenv("RAYEDIT_S3_READ_TIMEOUT", "1")
    store = open_store(f"s3://{s3_env.new_bucket()}/p")
    proxied.set_rules([Rule(kind, prob=0.5, max_faults=12, delay_s=(0.5, 1.8))], seed=7)
    with caplog.at_level("WARNING", logger="rayedit.store.s3"):
        for i in range(8):
            store.put_bytes(f"k{i}", b"x" * 300)
            assert store.get_bytes(f"k{i}") == b"x" * 300
            assert store.put_if_absent(f"m{i}", b"marker")
            assert not store.put_if_absent(f"m{i}", b"another writer")
    faults_seen = proxied.stats.total_faults()
    proxied.set_rules([])
    assert faults_seen > 0
    assert store.get_bytes("m3") == b"marker"
    text = caplog.text
    assert "succeeded after" in text or "reply was lost" in text, text
    expected = {"status": "HTTP 503", "reset_before": "connection reset", "reset_after": "connection reset",
                "delay": "read timeout"}[kind]
    if "succeeded after" in text and kind != "delay":
        assert expected in text, text


def test_failing_multipart_upload_is_aborted_and_said(proxied: FaultProxy, s3_env, monkeypatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxied.endpoint_url)
    bucket = s3_env.new_bucket()
    store = open_store(f"s3://{bucket}/mp", multipart_threshold=1024)
    proxied.set_rules([Rule("status", op="UploadPart", status=500, sticky=True, max_faults=20)])
    with pytest.raises(StoreError) as info:
        store.put_bytes("big", b"y" * 4096)
    proxied.set_rules([])
    msg = str(info.value)
    assert "multipart upload (aborted)" in msg and "HTTP 500" in msg and "attempts" in msg, msg
    assert not store.exists("big")
    assert not s3_env.client().list_multipart_uploads(Bucket=bucket).get("Uploads")  # no orphan parts
