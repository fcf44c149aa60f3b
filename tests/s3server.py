"""A real S3 server (moto) on loopback for tests, as pytest fixtures.

pyarrow's C++ S3 client talks real HTTP, so ``mock_aws`` is not enough: we run moto's threaded
server in-process on 127.0.0.1 with a free port, once per test session.

Use from a test module (or a conftest)::

    from s3server import s3_bucket, s3_env, s3_server  # noqa: F401  (fixtures)

    def test_x(s3_env, s3_bucket):
        store = open_store(f"s3://{s3_bucket}/prefix")   # endpoint and dummy creds come from env

Fixtures:

- ``s3_server`` (session): an ``S3Server`` with ``endpoint_url``, ``client()``, ``env()``,
  ``new_bucket()``. Start-up is bounded (``START_TIMEOUT_S``); the server is stopped at the end.
- ``s3_env`` (function): sets dummy credentials, region and ``AWS_ENDPOINT_URL`` for the test (and
  unsets AWS_PROFILE and friends so no real account can be reached); returns the server.
- ``s3_bucket`` (function): a fresh, empty bucket name for the test.
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
# Dummy credentials: moto accepts anything; these must never be real.
FAKE_ACCESS_KEY = "testing-access-key"
FAKE_SECRET_KEY = "testing-secret-key"
REGION = "us-east-1"

_bucket_counter = itertools.count()
_clients: dict[str, Any] = {}  # boto3 clients are thread-safe; building one costs ~0.2 s


@dataclass(frozen=True)
class S3Server:
    """Handle on a running moto server."""

    host: str
    port: int
    region: str = REGION

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def env(self) -> dict[str, str]:
        """Environment variables that point boto3 and pyarrow at this server with dummy credentials."""
        return {
            "AWS_ACCESS_KEY_ID": FAKE_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": FAKE_SECRET_KEY,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_EC2_METADATA_DISABLED": "true",  # never wait for an instance metadata service
        }

    def client(self) -> Any:
        """A boto3 S3 client for this server that does not depend on the environment (cached)."""
        cached = _clients.get(self.endpoint_url)
        if cached is None:
            cached = _clients[self.endpoint_url] = self._new_client()
        return cached

    def _new_client(self) -> Any:
        import boto3
        from botocore.config import Config

        # Own session: the default one would pick up whatever the test put in the environment.
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=FAKE_ACCESS_KEY,
            aws_secret_access_key=FAKE_SECRET_KEY,
            config=Config(s3={"addressing_style": "path"}, retries={"mode": "standard", "total_max_attempts": 3}),
        )

    def new_bucket(self, stem: str = "test") -> str:
        """Create and return a new, empty bucket with a unique name."""
        name = f"{stem}-{os.getpid()}-{next(_bucket_counter)}-{uuid.uuid4().hex[:6]}"
        self.client().create_bucket(Bucket=name)
        return name


def _wait_until_listening(host: str, port: int, deadline: float) -> None:
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def start_s3_server(timeout_s: float = START_TIMEOUT_S) -> tuple[Any, S3Server]:
    """Start moto's ThreadedMotoServer on 127.0.0.1 with a free port; fail after ``timeout_s``.

    Returns ``(server, handle)``; call ``stop_s3_server(server)`` when done.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    # ThreadedMotoServer.start() waits without a timeout (forever if the socket cannot be bound),
    # so it runs in a helper thread that we only wait on for a bounded time.
    errors: list[BaseException] = []

    def _start() -> None:
        try:
            server.start()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    starter = threading.Thread(target=_start, name="moto-start", daemon=True)
    deadline = time.monotonic() + timeout_s
    starter.start()
    starter.join(timeout_s)
    if errors:
        raise RuntimeError(f"moto S3 server failed to start: {errors[0]!r}")
    if starter.is_alive():
        raise RuntimeError(f"moto S3 server did not start within {timeout_s:.0f} s")
    host, port = server.get_host_and_port()
    _wait_until_listening(host, port, deadline)
    handle = S3Server(host=host, port=port)
    # One real request, so a broken server fails here and not in the middle of a test.
    handle.client().list_buckets()
    return server, handle


def stop_s3_server(server: Any, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Stop the server, waiting at most ``timeout_s`` (its thread is a daemon either way)."""
    stopper = threading.Thread(target=server.stop, name="moto-stop", daemon=True)
    stopper.start()
    stopper.join(timeout_s)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A moto S3 server on 127.0.0.1 for the whole test session."""
    server, handle = start_s3_server()
    try:
        yield handle
    finally:
        stop_s3_server(server)


_AWS_VARS_TO_CLEAR = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_MAX_ATTEMPTS",
    "AWS_RETRY_MODE",
)


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory):
    """Point boto3/pyarrow at the moto server with dummy credentials for one test."""
    for var in _AWS_VARS_TO_CLEAR:
        monkeypatch.delenv(var, raising=False)
    # Empty config files: a developer's ~/.aws must not leak into tests.
    aws_dir = tmp_path_factory.mktemp("aws-config")
    (aws_dir / "config").write_text("")
    (aws_dir / "credentials").write_text("")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(aws_dir / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(aws_dir / "credentials"))
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A fresh, empty bucket on the moto server."""
    return s3_server.new_bucket()
