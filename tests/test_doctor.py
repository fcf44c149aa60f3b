"""``rayedit doctor``: plain-words checks of versions, threads, GPU, Ray and a store; exit 1 on any problem."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import s3server
from typer.testing import CliRunner

from rayedit.cli import app
from rayedit.runtime import doctor

s3_server = s3server.s3_server
s3_env = s3server.s3_env


def _doctor(*args: str) -> tuple[int, str, dict]:
    res = CliRunner().invoke(app, ["doctor", "--json", *args])
    return res.exit_code, res.output, json.loads(res.output) if res.output.strip().startswith("{") else {}


def _by_name(report: dict) -> dict[str, dict]:
    return {c["name"]: c for c in report["checks"]}


def test_local_store_probe_passes_and_leaves_no_trace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    existing = tmp_path / "store"
    existing.mkdir()
    (existing / "keep.txt").write_text("x")
    code, out, rep = _doctor("--no-ray", "--store", str(existing))
    assert code == 0, out
    checks = _by_name(rep)
    assert checks[f"store {existing}"]["status"] == "ok"
    assert checks["threads"]["status"] == "ok" and checks["python"]["status"] == "ok"
    assert all(p in checks["versions"]["message"] for p in ("torch", "ray", "transformers", "pyarrow", "boto3"))
    assert checks["gpu"]["status"] in ("ok", "info")
    assert sorted(p.name for p in existing.iterdir()) == ["keep.txt"]  # the probe is gone
    fresh = tmp_path / "new" / "deeper"
    code, out, _ = _doctor("--no-ray", "--store", str(fresh))
    assert code == 0, out
    assert not (tmp_path / "new").exists()  # a folder the doctor had to create is removed again


def test_unwritable_store_and_bad_settings_fail_in_plain_words(tmp_path: Path, monkeypatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, out, rep = _doctor("--no-ray", "--store", str(blocker / "store"))
    assert code == 1
    store = _by_name(rep)[f"store {blocker / 'store'}"]
    assert store["status"] == "fail" and store["message"], out
    monkeypatch.setenv("OMP_NUM_THREADS", "lots")
    assert doctor.check_threads().status == "fail"
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert doctor.check_threads().status == "warn" and "OMP_NUM_THREADS is not set" in doctor.check_threads().message
    code, out, rep = _doctor("--no-ray", "--store", "s3://ab/x")
    assert code == 1 and "3 to 63 characters" in _by_name(rep)["store s3://ab/x"]["message"]
    plain = CliRunner().invoke(app, ["doctor", "--no-ray", "--store", "s3://ab/x"])
    assert plain.exit_code == 1 and "FAIL  store s3://ab/x" in plain.output and "problem(s) found" in plain.output


def test_s3_store_probe_and_credentials_never_shown(s3_env, monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = s3_env.new_bucket()
    secret_id, secret_key = "AKIADOCTORFAKE123456", "doctor/Fake+Secret0123456789"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", secret_id)  # moto accepts any credentials
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret_key)
    res = CliRunner().invoke(app, ["doctor", "--no-ray", "--store", f"s3://{bucket}/probe"])
    assert res.exit_code == 0, res.output
    assert f"ok    store s3://{bucket}/probe" in res.output
    assert "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY from the environment" in res.output
    assert secret_id not in res.output and secret_key not in res.output
    assert not s3_env.client().list_objects_v2(Bucket=bucket).get("Contents")  # probe deleted
    code, out, rep = _doctor("--no-ray", "--store", "s3://no-such-bucket-doctor/x")
    assert code == 1 and "does not exist" in _by_name(rep)["store s3://no-such-bucket-doctor/x"]["message"]


def test_unreachable_ray_address_fails_fast() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    check = doctor.check_ray(f"127.0.0.1:{port}")
    assert check.status == "fail" and "nothing answers" in check.message
    assert doctor.check_ray("not-an-address").status == "fail"
    check = doctor.check_ray(f"http://127.0.0.1:{port}")
    assert check.status == "fail" and "job server" in check.message


@pytest.mark.slow
def test_local_ray_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an address the doctor starts a local Ray in a subprocess and stops it again."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    check = doctor.check_ray(None, timeout=180)
    assert check.status == "ok", check.message
    assert "local Ray started and stopped" in check.message and "CPUs" in check.message
    assert os.environ.get("RAY_ADDRESS") is None
