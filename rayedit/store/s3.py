"""S3 backend (AWS or any S3-compatible server: MinIO, Ceph, moto, ...) through boto3.

- Retries are botocore's (``Config(retries={"mode", "total_max_attempts"})``) plus timeouts; we add no
  retry loops of our own except re-reading a body whose stream broke mid-way (botocore retries the
  request, not the streaming read) and S3's 409 "conditional request in progress". Every retry is
  said out loud: a ``needs-retry`` hook records why an attempt failed (HTTP 503, connection reset,
  read timeout, ...) per object, and the store logs one warning per operation that needed retries
  ("... succeeded after 2 retries (HTTP 503 SlowDown, connection reset)") or names them in its error.
- A conditional put whose first attempt landed but whose reply was lost (reset, timeout) is retried
  by botocore and then answered 412; when that happens after a retry and the object holds exactly our
  bytes, the write was ours (see ``put_if_absent``).
- ``put_if_absent`` is ``PutObject`` with ``If-None-Match: *``: S3 answers 412 to every writer but the
  first, which is what makes commit markers race-free.
- Credentials come from boto3's usual chain (env, profile, instance role). They are never stored on
  this object's public surface, never put in a URI, and never logged; pyarrow gets them as
  constructor arguments (pyarrow rejects them in URIs anyway).
"""

from __future__ import annotations

import io
import logging
import os
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import boto3
import botocore.exceptions
import pyarrow.fs as pafs
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from rayedit.store.base import Store
from rayedit.store.errors import BucketNotFound, KeyNotFound, StoreError, StoreURIError
from rayedit.store.formats import Bytes
from rayedit.store.keys import join_key, safe_key, safe_prefix

log = logging.getLogger(__name__)

RETRY_MODES = ("legacy", "standard", "adaptive")
DEFAULT_REGION = "us-east-1"
# Objects at least this large go through the multipart transfer manager (parallel parts, resumable
# per part); smaller ones are a single PutObject, which is cheaper.
DEFAULT_MULTIPART_THRESHOLD = 64 * 1024 * 1024
DEFAULT_MULTIPART_CHUNKSIZE = 16 * 1024 * 1024
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_READ_TIMEOUT = 60.0
# Environment overrides for settings that have no AWS_* variable (workers on a cluster inherit them;
# the fault matrix uses them to make timeouts and multipart uploads happen on tiny objects).
ENV_CONNECT_TIMEOUT = "RAYEDIT_S3_CONNECT_TIMEOUT"
ENV_READ_TIMEOUT = "RAYEDIT_S3_READ_TIMEOUT"
ENV_MULTIPART_THRESHOLD = "RAYEDIT_S3_MULTIPART_THRESHOLD"
ENV_MULTIPART_CHUNKSIZE = "RAYEDIT_S3_MULTIPART_CHUNKSIZE"
S3_MIN_PART_SIZE = 5 * 1024 * 1024  # S3's smallest part (except the last)


def _error_code(exc: botocore.exceptions.ClientError) -> tuple[str, int]:
    err = exc.response.get("Error", {}) or {}
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0
    return str(err.get("Code", "")), int(status)


def redact_url(url: str) -> str:
    """Drop userinfo and query from a URL before showing it (endpoint URLs are user input)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}" if parts.scheme else "<URL without scheme>"


def check_endpoint_url(url: str) -> str:
    """Validate an endpoint URL: http(s), a host, no userinfo (credentials) and no query."""
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError for a non-numeric port
    except ValueError:
        raise StoreURIError(f"endpoint URL {redact_url(url)!r}: malformed") from None
    if parts.scheme not in ("http", "https"):
        raise StoreURIError(f"endpoint URL {redact_url(url)!r}: scheme must be http or https")
    if not parts.hostname:
        raise StoreURIError(f"endpoint URL {redact_url(url)!r}: missing host")
    if "@" in parts.netloc:
        raise StoreURIError(
            f"endpoint URL {redact_url(url)!r}: credentials must not be embedded in the URL; "
            "use AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile"
        )
    if parts.query or parts.fragment:
        raise StoreURIError(f"endpoint URL {redact_url(url)!r}: query strings and fragments are not supported")
    return url


def _retry_reason(response: Any, caught_exception: Exception | None) -> str | None:
    """Why an attempt failed in words, if it is the kind botocore retries (5xx, throttling, network)."""
    if caught_exception is not None:
        name = type(caught_exception).__name__
        words = {
            "ConnectionClosedError": "connection reset",
            "ReadTimeoutError": "read timeout",
            "ConnectTimeoutError": "connect timeout",
            "EndpointConnectionError": "connection refused",
            "ProxyConnectionError": "proxy connection error",
            "ResponseStreamingError": "response stream broken",
            "IncompleteReadError": "incomplete read",
        }
        return words.get(name, name)
    if not response:
        return None
    http, parsed = response
    status = getattr(http, "status_code", 0) or 0
    code = ((parsed or {}).get("Error") or {}).get("Code", "") if isinstance(parsed, dict) else ""
    if status >= 500 or status == 429 or code in ("SlowDown", "Throttling", "RequestTimeout"):
        return f"HTTP {status}" + (f" {code}" if code else "")
    return None


class RetryLog:
    """Failed attempts per object path, filled by a botocore ``needs-retry`` hook (all threads)."""

    MAX_PATHS = 1024  # entries never collected (e.g. bucket checks) must not grow without bound

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_path: OrderedDict[str, list[str]] = OrderedDict()
        self.totals: Counter[str] = Counter()  # process-wide, by reason (benchmarks, doctor)

    def on_needs_retry(self, response: Any = None, caught_exception: Exception | None = None,
                       request_dict: dict[str, Any] | None = None, **_kw: Any) -> None:
        reason = _retry_reason(response, caught_exception)
        if reason is None:
            return None  # never influence botocore's decision: we only watch
        path = unquote(str((request_dict or {}).get("url_path", "")).split("?", 1)[0])
        with self._lock:
            self._by_path.setdefault(path, []).append(reason)
            self._by_path.move_to_end(path)
            while len(self._by_path) > self.MAX_PATHS:
                self._by_path.popitem(last=False)
            self.totals[reason] += 1
        return None

    def take(self, bucket: str, key: str) -> list[str]:
        """The failed attempts recorded for ``bucket/key`` since the last call (path or virtual style)."""
        return self.take_path(f"/{bucket}/{key}") + self.take_path(f"/{key}")

    def take_path(self, path: str) -> list[str]:
        with self._lock:
            return self._by_path.pop(path, [])


def describe_retries(reasons: list[str]) -> str:
    """'HTTP 503 SlowDown ×2, connection reset' from a list of failed-attempt reasons."""
    counts = Counter(reasons)
    return ", ".join(f"{r} ×{n}" if n > 1 else r for r, n in counts.items())


@dataclass(repr=False, eq=False)
class S3Connection:
    """A configured boto3 client plus what pyarrow needs; shared by a store and its children.

    Deliberately has no dataclass repr: the boto3 session inside holds credentials.
    """

    session: boto3.session.Session
    client: Any
    endpoint_url: str | None
    region: str
    profile: str | None
    retry_mode: str
    max_attempts: int
    connect_timeout: float
    read_timeout: float
    transfer_config: TransferConfig
    retry_log: RetryLog = field(default_factory=RetryLog)
    # Everything needed to rebuild this connection elsewhere (no credentials): see open_args().
    options: dict[str, Any] = field(default_factory=dict)
    _pa_fs: pafs.S3FileSystem | None = field(default=None)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __repr__(self) -> str:
        ep = redact_url(self.endpoint_url) if self.endpoint_url else "aws"
        retries = f"{self.retry_mode}/{self.max_attempts}"
        return f"S3Connection(endpoint={ep!r}, region={self.region!r}, retries={retries})"

    def pyarrow_fs(self) -> pafs.S3FileSystem:
        with self._lock:
            if self._pa_fs is None:
                self._pa_fs = self._make_pa_fs()
            return self._pa_fs

    def _make_pa_fs(self) -> pafs.S3FileSystem:
        kwargs: dict[str, Any] = {
            "region": self.region,
            "connect_timeout": self.connect_timeout,
            "request_timeout": self.read_timeout,
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=self.max_attempts),
        }
        if self.endpoint_url:
            parts = urlsplit(self.endpoint_url)
            host = parts.hostname or ""
            kwargs["endpoint_override"] = f"{host}:{parts.port}" if parts.port else host
            kwargs["scheme"] = parts.scheme
        ca_bundle = os.environ.get("AWS_CA_BUNDLE")
        if ca_bundle and (not self.endpoint_url or self.endpoint_url.startswith("https")):
            kwargs["tls_ca_file_path"] = ca_bundle
        # Hand pyarrow the same credentials boto3 resolved (a profile given as an argument is not
        # visible to pyarrow's own chain). Temporary credentials are not refreshed by pyarrow; a
        # long-lived reader should call pyarrow_filesystem() again (see refresh_pyarrow_fs).
        creds = self.session.get_credentials()
        if creds is not None:
            frozen = creds.get_frozen_credentials()
            kwargs["access_key"] = frozen.access_key
            kwargs["secret_key"] = frozen.secret_key
            if frozen.token:
                kwargs["session_token"] = frozen.token
        return pafs.S3FileSystem(**kwargs)

    def refresh_pyarrow_fs(self) -> None:
        """Forget the cached pyarrow filesystem (e.g. after temporary credentials rotated)."""
        with self._lock:
            self._pa_fs = None


def connect(
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    profile: str | None = None,
    retries: int | None = None,
    retry_mode: str | None = None,
    connect_timeout: float | None = None,
    read_timeout: float | None = None,
    addressing_style: str | None = None,
    multipart_threshold: int | None = None,
    multipart_chunksize: int | None = None,
    max_pool_connections: int = 32,
    checksums: str | None = None,
) -> S3Connection:
    """Build an ``S3Connection``; arguments win over the environment, which wins over defaults."""
    connect_timeout = _setting(connect_timeout, ENV_CONNECT_TIMEOUT, DEFAULT_CONNECT_TIMEOUT, float)
    read_timeout = _setting(read_timeout, ENV_READ_TIMEOUT, DEFAULT_READ_TIMEOUT, float)
    multipart_threshold = _setting(multipart_threshold, ENV_MULTIPART_THRESHOLD, DEFAULT_MULTIPART_THRESHOLD, int)
    multipart_chunksize = _setting(multipart_chunksize, ENV_MULTIPART_CHUNKSIZE, DEFAULT_MULTIPART_CHUNKSIZE, int)
    if connect_timeout <= 0 or read_timeout <= 0:
        raise StoreError(f"S3 timeouts must be > 0 s, got connect {connect_timeout}, read {read_timeout}")
    if multipart_threshold < 1 or multipart_chunksize < S3_MIN_PART_SIZE:
        raise StoreError(f"multipart threshold must be >= 1 byte and chunk size >= {S3_MIN_PART_SIZE} bytes "
                         f"(S3's smallest part), got {multipart_threshold} and {multipart_chunksize}")
    endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    if endpoint_url:
        check_endpoint_url(endpoint_url)
    profile = profile or os.environ.get("AWS_PROFILE") or None
    retry_mode = retry_mode or os.environ.get("AWS_RETRY_MODE") or "standard"
    if retry_mode not in RETRY_MODES:
        raise StoreError(f"retry mode {retry_mode!r} is not one of {', '.join(RETRY_MODES)}")
    if retries is None:
        env_attempts = os.environ.get("AWS_MAX_ATTEMPTS")
        retries = int(env_attempts) if env_attempts and env_attempts.isdigit() else 5
    if retries < 1:
        raise StoreError(f"retries (total attempts) must be >= 1, got {retries}")
    try:
        session = boto3.session.Session(profile_name=profile)
    except botocore.exceptions.ProfileNotFound:
        raise StoreError(f"AWS profile {profile!r} not found in the AWS config files") from None
    region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or session.region_name
    region = region or DEFAULT_REGION
    # Custom endpoints (MinIO, moto, Ceph) rarely have wildcard DNS for virtual-hosted buckets.
    addressing_style = addressing_style or ("path" if endpoint_url else "auto")
    # botocore >= 1.36 sends CRC checksums (aws-chunked) on every upload, which several S3-compatible
    # servers reject; there we only send them when an API requires it. Our commit markers carry a
    # sha256 of every object, so integrity is still checked end to end.
    checksums = checksums or ("when_required" if endpoint_url else "when_supported")
    if checksums not in ("when_supported", "when_required"):
        raise StoreError(f"checksums must be 'when_supported' or 'when_required', got {checksums!r}")
    config = Config(
        region_name=region,
        retries={"mode": retry_mode, "total_max_attempts": retries},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        max_pool_connections=max_pool_connections,
        s3={"addressing_style": addressing_style},
        request_checksum_calculation=checksums,
        response_checksum_validation=checksums,
    )
    client = session.client("s3", endpoint_url=endpoint_url, config=config)
    retry_log = RetryLog()
    client.meta.events.register("needs-retry.s3", retry_log.on_needs_retry)
    transfer_config = TransferConfig(
        multipart_threshold=multipart_threshold,
        multipart_chunksize=multipart_chunksize,
        use_threads=True,
        max_concurrency=4,
    )
    return S3Connection(
        session=session,
        client=client,
        endpoint_url=endpoint_url,
        region=region,
        profile=profile,
        retry_mode=retry_mode,
        max_attempts=retries,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        transfer_config=transfer_config,
        retry_log=retry_log,
        options={
            "endpoint_url": endpoint_url,
            "region": region,
            "profile": profile,
            "retries": retries,
            "retry_mode": retry_mode,
            "connect_timeout": connect_timeout,
            "read_timeout": read_timeout,
            "addressing_style": addressing_style,
            "multipart_threshold": multipart_threshold,
            "multipart_chunksize": multipart_chunksize,
            "max_pool_connections": max_pool_connections,
            "checksums": checksums,
        },
    )


def _setting(value: Any, env: str, default: Any, cast: type) -> Any:
    if value is not None:
        return cast(value)
    text = os.environ.get(env, "").strip()
    if not text:
        return default
    try:
        return cast(text)
    except ValueError:
        raise StoreError(f"{env}={text!r} is not a valid {cast.__name__}") from None


class S3Store(Store):
    """A store under ``s3://bucket/prefix``. Use ``open_store("s3://...")`` to build one."""

    def __init__(
        self,
        conn: S3Connection,
        bucket: str,
        prefix: str = "",
        *,
        check_bucket: bool = True,
        create_bucket: bool = False,
    ) -> None:
        self._conn = conn
        self._bucket = bucket
        self._prefix = safe_prefix(prefix)
        if check_bucket:
            self._ensure_bucket(create_bucket)

    # --- public attributes ------------------------------------------------------------------------
    @property
    def bucket(self) -> str:
        return self._bucket

    @property
    def prefix(self) -> str:
        return self._prefix

    @property
    def uri(self) -> str:
        return f"s3://{self._bucket}/{self._prefix}" if self._prefix else f"s3://{self._bucket}"

    @property
    def endpoint_url(self) -> str | None:
        return self._conn.endpoint_url

    @property
    def region(self) -> str:
        return self._conn.region

    @property
    def client(self) -> Any:
        """The boto3 S3 client (for tests and tools; the store API should be enough otherwise)."""
        return self._conn.client

    def open_args(self) -> dict[str, Any]:
        """Keyword arguments of ``open_store`` that reopen this store elsewhere; never credentials."""
        return {"uri": self.uri, **self._conn.options}

    def __reduce__(self) -> tuple[Any, tuple[dict[str, Any]]]:
        # Ray ships task arguments by pickling. A boto3 client cannot be pickled and its session holds
        # credentials, so we travel as our open arguments and reconnect with the receiving
        # process's own credentials (env, profile or instance role).
        from rayedit.store.uri import reopen_store

        return (reopen_store, (self.open_args(),))

    def __repr__(self) -> str:
        ep = redact_url(self._conn.endpoint_url) if self._conn.endpoint_url else "aws"
        return f"S3Store({self.uri!r}, endpoint={ep!r}, region={self._conn.region!r})"

    # --- helpers ----------------------------------------------------------------------------------
    def _where(self) -> str:
        ep = redact_url(self._conn.endpoint_url) if self._conn.endpoint_url else "AWS"
        return f"{self.uri} ({ep})"

    def _k(self, key: str) -> str:
        return join_key(self._prefix, safe_key(key))

    def _folder(self, prefix: str) -> str:
        """S3 key prefix (with trailing '/') for the folder ``prefix`` of this store."""
        full = join_key(self._prefix, safe_prefix(prefix)) if (self._prefix or safe_prefix(prefix)) else ""
        return f"{full}/" if full else ""

    def _retried(self, key: str | None) -> list[str]:
        """Failed attempts botocore made (and retried) for ``key`` (None: the bucket) since the last look."""
        if key is None:  # bucket-level requests (HeadBucket, listings) have the bucket as their path
            return self._conn.retry_log.take_path(f"/{self._bucket}") + self._conn.retry_log.take_path("/")
        return self._conn.retry_log.take(self._bucket, self._k(key))

    def _note(self, action: str, key: str, *, object_key: bool = True) -> None:
        """One warning per operation that needed retries: what was retried and why."""
        reasons = self._retried(key if object_key else None)
        if reasons:
            log.warning("S3 %s %r in %s succeeded after %d %s (%s)", action, key, self.uri, len(reasons),
                        "retry" if len(reasons) == 1 else "retries", describe_retries(reasons))

    def _fail(self, action: str, key: str, exc: Exception, *, object_key: bool = True) -> StoreError:
        reasons = self._retried(key if object_key else None)
        tried = ""
        if reasons:
            # the hook also saw the final attempt when it failed the transient way (5xx, network)
            final_seen = not isinstance(exc, botocore.exceptions.ClientError) or _error_code(exc)[1] >= 500 \
                or _error_code(exc)[1] == 429
            tried = f" after {len(reasons) + (0 if final_seen else 1)} attempts ({describe_retries(reasons)})"
        if isinstance(exc, botocore.exceptions.ClientError):
            code, status = _error_code(exc)
            return StoreError(f"{self._where()}: {action} {key!r} failed{tried}: {code or 'error'} (HTTP {status})")
        if isinstance(exc, botocore.exceptions.NoCredentialsError):
            return StoreError(
                f"{self._where()}: no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                "AWS_PROFILE, or use an instance role)"
            )
        return StoreError(f"{self._where()}: {action} {key!r} failed{tried}: {type(exc).__name__}: {exc}")

    def _ensure_bucket(self, create: bool) -> None:
        client = self._conn.client
        try:
            client.head_bucket(Bucket=self._bucket)
            self._note("check of bucket", self._bucket, object_key=False)
            return
        except botocore.exceptions.ClientError as exc:
            code, status = _error_code(exc)
            if status != 404 and code not in ("404", "NoSuchBucket"):
                if status == 403:
                    raise StoreError(f"{self._where()}: access to bucket {self._bucket!r} denied (HTTP 403)") from None
                raise self._fail("checking bucket", self._bucket, exc, object_key=False) from None
        except botocore.exceptions.BotoCoreError as exc:
            raise self._fail("checking bucket", self._bucket, exc, object_key=False) from None
        if not create:
            raise BucketNotFound(
                f"{self._where()}: bucket {self._bucket!r} does not exist (create it, or pass create_bucket=True)"
            )
        kwargs: dict[str, Any] = {"Bucket": self._bucket}
        if self._conn.region != "us-east-1":  # us-east-1 rejects an explicit LocationConstraint
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self._conn.region}
        try:
            client.create_bucket(**kwargs)
            log.info("created bucket %s", self._bucket)
        except botocore.exceptions.ClientError as exc:
            code, _ = _error_code(exc)
            if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise self._fail("creating bucket", self._bucket, exc, object_key=False) from None
        except botocore.exceptions.BotoCoreError as exc:
            raise self._fail("creating bucket", self._bucket, exc, object_key=False) from None

    # --- writes -----------------------------------------------------------------------------------
    def put_bytes(self, key: str, data: Bytes) -> None:
        k = self._k(key)
        multipart = len(data) >= self._conn.transfer_config.multipart_threshold
        try:
            if multipart:
                self._conn.client.upload_fileobj(io.BytesIO(data), self._bucket, k, Config=self._conn.transfer_config)
            else:
                self._conn.client.put_object(Bucket=self._bucket, Key=k, Body=bytes(data))
        except (
            botocore.exceptions.ClientError,
            botocore.exceptions.BotoCoreError,
            boto3.exceptions.S3UploadFailedError,  # what the transfer manager wraps errors in
        ) as exc:
            if multipart:  # s3transfer aborts the upload on failure: no parts are left behind
                raise self._fail("multipart upload (aborted) of", key, exc) from None
            raise self._fail("writing", key, exc) from None
        self._note("multipart upload of" if multipart else "write of", key)

    def put_if_absent(self, key: str, data: Bytes) -> bool:
        k = self._k(key)
        body = bytes(data)
        # S3 answers 409 ConditionalRequestConflict while another conditional write of the same key
        # is in flight; retrying then yields the definitive 200 or 412.
        for attempt in range(self._conn.max_attempts + 3):
            try:
                self._conn.client.put_object(Bucket=self._bucket, Key=k, Body=body, IfNoneMatch="*")
                self._note("conditional write of", key)
                return True
            except botocore.exceptions.ClientError as exc:
                code, status = _error_code(exc)
                if code == "PreconditionFailed" or status == 412:
                    return self._lost_reply_was_ours(key, body, exc)
                if code == "ConditionalRequestConflict" or status == 409:
                    time.sleep(min(0.05 * 2**attempt, 1.0))
                    continue
                raise self._fail("writing", key, exc) from None
            except botocore.exceptions.BotoCoreError as exc:
                raise self._fail("writing", key, exc) from None
        raise StoreError(f"{self._where()}: conditional write of {key!r} kept conflicting (HTTP 409)")

    def _lost_reply_was_ours(self, key: str, body: bytes, exc: botocore.exceptions.ClientError) -> bool:
        """412 on a conditional put: someone else's object, unless botocore retried our own landed write.

        When an attempt reached S3 but its reply was lost (connection reset, read timeout), botocore
        sends the request again and S3 answers 412 because our first attempt created the object. We
        recognise that case only after a retry and only if the object holds exactly our bytes; a commit
        marker lists the sha256 of every object of the step, so equal bytes mean an equal commit.
        """
        reasons = self._retried(key)
        retried = reasons or exc.response.get("ResponseMetadata", {}).get("RetryAttempts", 0)
        if not retried:
            return False
        try:
            ours = self.get_bytes(key) == body
        except StoreError:
            return False
        if ours:
            log.warning("S3 conditional write of %r in %s: an earlier attempt landed but its reply was lost "
                        "(%s); retried, found our own object, keeping it", key, self.uri,
                        describe_retries(reasons) if reasons else "retried")
        return ours

    def delete(self, key: str) -> None:
        try:
            self._conn.client.delete_object(Bucket=self._bucket, Key=self._k(key))
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise self._fail("deleting", key, exc) from None
        self._note("delete of", key)

    # --- reads ------------------------------------------------------------------------------------
    def get_bytes(self, key: str) -> bytes:
        k = self._k(key)
        last: Exception | None = None
        for _ in range(self._conn.max_attempts):
            try:
                resp = self._conn.client.get_object(Bucket=self._bucket, Key=k)
                body = resp["Body"].read()
                self._note("read of", key)
                return body
            except botocore.exceptions.ClientError as exc:
                code, status = _error_code(exc)
                if code in ("NoSuchKey", "404") or status == 404:
                    raise KeyNotFound(f"{self._where()}: no object {key!r}") from None
                raise self._fail("reading", key, exc) from None
            except (
                botocore.exceptions.IncompleteReadError,
                botocore.exceptions.ResponseStreamingError,
                botocore.exceptions.ReadTimeoutError,
            ) as exc:
                last = exc  # the body stream broke after a successful request: read it again
                log.warning("S3 read of %r in %s: the response body broke (%s); reading it again", key, self.uri,
                            type(exc).__name__)
                continue
            except botocore.exceptions.BotoCoreError as exc:
                raise self._fail("reading", key, exc) from None
        assert last is not None
        raise self._fail("reading", key, last) from None

    def _head(self, key: str) -> dict[str, Any] | None:
        try:
            head = self._conn.client.head_object(Bucket=self._bucket, Key=self._k(key))
            self._note("check of", key)
            return head
        except botocore.exceptions.ClientError as exc:
            code, status = _error_code(exc)
            if status == 404 or code in ("404", "NoSuchKey", "NotFound"):
                self._note("check of", key)
                return None
            raise self._fail("checking", key, exc) from None
        except botocore.exceptions.BotoCoreError as exc:
            raise self._fail("checking", key, exc) from None

    def exists(self, key: str) -> bool:
        return self._head(key) is not None

    def size(self, key: str) -> int:
        head = self._head(key)
        if head is None:
            raise KeyNotFound(f"{self._where()}: no object {key!r}")
        return int(head["ContentLength"])

    def list_sizes(self, prefix: str = "") -> dict[str, int]:
        folder = self._folder(prefix)
        strip = len(self._prefix) + 1 if self._prefix else 0
        out: dict[str, int] = {}
        paginator = self._conn.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self._bucket, Prefix=folder):
                for obj in page.get("Contents", []) or []:
                    key = obj["Key"][strip:]
                    try:
                        safe_key(key)
                    except StoreError:
                        continue  # e.g. a console "folder/" placeholder, unreachable through the API
                    out[key] = int(obj["Size"])
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise self._fail("listing", prefix, exc, object_key=False) from None
        self._note("listing of", prefix, object_key=False)
        return out

    def list_children(self, prefix: str = "") -> list[str]:
        folder = self._folder(prefix)
        names: set[str] = set()
        paginator = self._conn.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self._bucket, Prefix=folder, Delimiter="/"):
                for cp in page.get("CommonPrefixes", []) or []:
                    name = cp["Prefix"][len(folder) :].rstrip("/")
                    if name:
                        names.add(name)
                for obj in page.get("Contents", []) or []:
                    name = obj["Key"][len(folder) :]
                    if name:
                        names.add(name)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise self._fail("listing", prefix, exc, object_key=False) from None
        self._note("listing of", prefix, object_key=False)
        return sorted(names)

    # --- scoping and interop ----------------------------------------------------------------------
    def child(self, prefix: str) -> S3Store:
        sub = safe_prefix(prefix)
        if not sub:
            return self
        return S3Store(self._conn, self._bucket, join_key(self._prefix, sub), check_bucket=False)

    def pyarrow_filesystem(self) -> tuple[pafs.FileSystem, str]:
        base = f"{self._bucket}/{self._prefix}" if self._prefix else self._bucket
        return self._conn.pyarrow_fs(), base
