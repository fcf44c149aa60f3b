"""Store URIs: parsing, validation and ``open_store``.

Accepted forms:

- a local path (``./results``, ``/data/rayedit``, ``~/rayedit``) or ``file:///abs/path``: LocalStore;
- ``s3://bucket`` or ``s3://bucket/prefix``: S3Store (AWS or any S3-compatible endpoint).

Everything else is a ``StoreURIError`` with a one-line message naming the (redacted) URI and the
problem. Credentials are never accepted in a URI (userinfo, query strings): they would end up in
specs, logs and the store itself.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from rayedit.store.base import Store
from rayedit.store.errors import StoreURIError, UnsafeKeyError
from rayedit.store.keys import safe_key

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class StoreLocation:
    """A parsed store URI: ``scheme`` is 'file' (with ``path``) or 's3' (with ``bucket``/``prefix``)."""

    scheme: str
    path: str = ""
    bucket: str = ""
    prefix: str = ""


def redact_uri(uri: str) -> str:
    """The URI with any userinfo and query removed, safe to show in messages."""
    if not isinstance(uri, str):
        return repr(uri)
    shown = _CONTROL.sub("?", uri)
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*://)([^/?#]*)(.*)$", shown)
    if m:
        scheme, netloc, rest = m.groups()
        if "@" in netloc:
            netloc = "***@" + netloc.rsplit("@", 1)[1]
        rest = re.sub(r"[?#].*$", "?***", rest) if re.search(r"[?#]", rest) else rest
        shown = scheme + netloc + rest
    return shown


def _err(uri: str, problem: str) -> StoreURIError:
    return StoreURIError(f"store URI {redact_uri(uri)!r}: {problem}")


def check_bucket_name(bucket: str) -> str | None:
    """The problem with an S3 bucket name, or None if it follows the S3 naming rules."""
    if not bucket:
        return "empty bucket name"
    if len(bucket) < 3 or len(bucket) > 63:
        return f"bucket name {bucket!r} must be 3 to 63 characters long"
    if not _BUCKET.match(bucket):
        return (
            f"bucket name {bucket!r} is invalid (lowercase letters, digits, '.' and '-' only; "
            "must start and end with a letter or digit)"
        )
    if ".." in bucket or ".-" in bucket or "-." in bucket:
        return f"bucket name {bucket!r} is invalid (adjacent '.'/'-' characters)"
    try:
        ipaddress.IPv4Address(bucket)
        return f"bucket name {bucket!r} must not be an IP address"
    except ValueError:
        pass
    return None


def _check_local_path(uri: str, path: str) -> str:
    if not path:
        raise _err(uri, "empty path")
    if _CONTROL.search(path):
        raise _err(uri, "path contains control characters")
    if ".." in re.split(r"[/\\]", path):
        raise _err(uri, "'..' segments are not allowed (give a normalized or absolute path)")
    return path


def parse_store_uri(uri: str) -> StoreLocation:
    """Parse and validate a store URI without touching the file system or the network."""
    if not isinstance(uri, str):
        raise StoreURIError(f"store URI must be a string, got {type(uri).__name__}")
    if not uri.strip():
        raise StoreURIError("store URI is empty")
    if uri != uri.strip():
        raise _err(uri, "leading or trailing whitespace")
    m = _SCHEME.match(uri)
    if not m or not uri[m.end() :].startswith("//"):
        if m and m.group(1).lower() in ("s3", "file"):
            raise _err(uri, f"expected {m.group(1).lower()}://...")
        # No scheme (or 'C:\\...', or a folder named like 'results:v1'): a local path.
        return StoreLocation(scheme="file", path=_check_local_path(uri, uri))
    scheme = m.group(1).lower()
    try:
        parts = urlsplit(uri)
    except ValueError as exc:
        raise _err(uri, f"malformed ({exc})") from None
    if parts.query or parts.fragment or uri.endswith(("?", "#")):
        raise _err(
            uri,
            "query strings and fragments are not supported (options are arguments, "
            "credentials come from the environment)",
        )
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise _err(uri, f"file URIs must not name a host ({parts.netloc!r}); use file:///abs/path")
        path = unquote(parts.path)
        if not path.startswith("/"):
            raise _err(uri, "file URIs need an absolute path (file:///abs/path)")
        return StoreLocation(scheme="file", path=_check_local_path(uri, path))
    if scheme == "s3":
        if "@" in parts.netloc:
            raise _err(uri, "credentials must not be embedded in the URI; use the environment or a profile")
        if ":" in parts.netloc:
            raise _err(uri, "a port belongs in endpoint_url / AWS_ENDPOINT_URL, not in the s3:// URI")
        bucket = parts.netloc
        problem = check_bucket_name(bucket)
        if problem:
            raise _err(uri, problem)
        prefix = parts.path
        if prefix.startswith("/"):
            prefix = prefix[1:]
        if prefix.endswith("/"):
            prefix = prefix[:-1]
        if prefix:
            try:
                safe_key(prefix)
            except UnsafeKeyError as exc:
                raise _err(uri, f"bad prefix: {exc}") from None
        return StoreLocation(scheme="s3", bucket=bucket, prefix=prefix)
    raise _err(uri, f"unknown scheme {scheme!r} (use a local path, file:///path or s3://bucket/prefix)")


def open_store(
    uri: str,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    profile: str | None = None,
    retries: int | None = None,
    retry_mode: str | None = None,
    connect_timeout: float | None = None,
    read_timeout: float | None = None,
    create_bucket: bool = False,
    create: bool = True,
    **s3_options: object,
) -> Store:
    """Open the store named by ``uri``.

    Local paths: the folder is created unless ``create=False``. S3: the endpoint comes from
    ``endpoint_url`` or ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``; the region from ``region`` or
    ``AWS_REGION``/``AWS_DEFAULT_REGION`` (default us-east-1); the profile from ``profile`` or
    ``AWS_PROFILE``. ``retries`` is botocore's total attempts per request (default 5, or
    ``AWS_MAX_ATTEMPTS``), ``retry_mode`` 'standard' (default) or 'adaptive'; timeouts default to 10 s
    (connect) and 60 s (read), or ``RAYEDIT_S3_CONNECT_TIMEOUT``/``RAYEDIT_S3_READ_TIMEOUT``. The bucket is checked
    with HeadBucket; a missing bucket raises ``BucketNotFound`` unless ``create_bucket=True``.
    Further keyword arguments go to ``rayedit.store.s3.connect`` (addressing_style, multipart_*).
    """
    loc = parse_store_uri(uri)
    if loc.scheme == "file":
        from rayedit.store.local import LocalStore

        return LocalStore(loc.path, create=create)
    from rayedit.store.s3 import S3Store, connect

    conn = connect(
        endpoint_url=endpoint_url,
        region=region,
        profile=profile,
        retries=retries,
        retry_mode=retry_mode,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        **s3_options,  # type: ignore[arg-type]
    )
    return S3Store(conn, loc.bucket, loc.prefix, create_bucket=create_bucket)


def reopen_store(args: dict[str, object]) -> Store:
    """Reopen a store from ``Store.open_args()`` (used when a store is unpickled, e.g. by Ray).

    The bucket is not created and must still exist; credentials come from the receiving process.
    """
    return open_store(**args)  # type: ignore[arg-type]


__all__ = [
    "StoreLocation",
    "check_bucket_name",
    "open_store",
    "parse_store_uri",
    "redact_uri",
    "reopen_store",
]
