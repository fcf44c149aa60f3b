"""Key validation and id sanitizing, shared by both backends.

Keys are relative '/'-separated paths. The same rules apply to the local folder and to S3 so that a
campaign written to one can be copied to the other verbatim, and so that no key can escape the local
root (``..``, absolute paths) or smuggle control characters into file names or logs.
"""

from __future__ import annotations

import hashlib
import re

from rayedit.store.errors import UnsafeKeyError

# Temporary files of the local backend carry this prefix; keys may not use it so that listing can
# skip them unambiguously (pyarrow.dataset also ignores names starting with '.').
TMP_PREFIX = ".rayedit-tmp-"

# S3 allows 1024 bytes per key; most local file systems allow 255 bytes per name.
MAX_KEY_BYTES = 1024
MAX_SEGMENT_BYTES = 255

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SAFE_ID = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_ID_INVALID = re.compile(r"[^a-z0-9._-]+")


def safe_key(key: str) -> str:
    """Return ``key`` unchanged if it is a safe relative key, else raise ``UnsafeKeyError``.

    Rejected: non-strings, empty keys, absolute paths, leading/trailing '/', empty segments ('//'),
    '.' or '..' segments, backslashes, control characters, over-long keys or segments, and the
    reserved temporary-file prefix.
    """
    if not isinstance(key, str):
        raise UnsafeKeyError(f"store key must be a str, got {type(key).__name__}")
    if not key:
        raise UnsafeKeyError("store key is empty")
    shown = key.encode("unicode_escape").decode("ascii")  # never echo raw control characters
    if _CONTROL.search(key):
        raise UnsafeKeyError(f"store key {shown!r} contains control characters")
    if "\\" in key:
        raise UnsafeKeyError(f"store key {shown!r} contains a backslash")
    if key.startswith("/"):
        raise UnsafeKeyError(f"store key {shown!r} is absolute")
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise UnsafeKeyError(f"store key {shown[:80]!r}... is longer than {MAX_KEY_BYTES} bytes")
    for seg in key.split("/"):
        if seg == "":
            raise UnsafeKeyError(f"store key {shown!r} has an empty segment")
        if seg in (".", ".."):
            raise UnsafeKeyError(f"store key {shown!r} has a {seg!r} segment")
        if seg.startswith(TMP_PREFIX):
            raise UnsafeKeyError(f"store key {shown!r} uses the reserved prefix {TMP_PREFIX!r}")
        if len(seg.encode("utf-8")) > MAX_SEGMENT_BYTES:
            raise UnsafeKeyError(f"store key {shown[:80]!r} has a segment longer than {MAX_SEGMENT_BYTES} bytes")
    return key


def safe_prefix(prefix: str) -> str:
    """Normalize a listing/child prefix: '' means the whole store; one trailing '/' is tolerated."""
    if prefix in ("", "/"):
        return ""
    if isinstance(prefix, str) and prefix.endswith("/"):
        prefix = prefix[:-1]
    return safe_key(prefix)


def join_key(*parts: str) -> str:
    """Join non-empty key parts with '/' and validate the result."""
    return safe_key("/".join(p for p in parts if p))


def is_safe_id(name: str, *, max_len: int = 64) -> bool:
    """True if ``name`` is already a safe id (``sanitize_id(name, max_len=max_len) == name``)."""
    return (
        isinstance(name, str)
        and 0 < len(name) <= max_len
        and _SAFE_ID.match(name) is not None
        and not name.startswith(TMP_PREFIX)
    )


def sanitize_id(name: str, *, max_len: int = 64) -> str:
    """Map an arbitrary campaign/stream/suite name to a safe single key segment, deterministically.

    Names that are already ``[a-z0-9][a-z0-9._-]*`` (and at most ``max_len`` characters) are returned
    unchanged. Anything else is lowercased, runs of other characters become '-', and an 8-hex-digit
    hash of the original name is appended, so distinct names stay distinct (e.g. 'Run A' and 'run-a'
    do not collide, which also matters on case-insensitive local file systems).
    """
    if not isinstance(name, str):
        raise TypeError(f"id must be a str, got {type(name).__name__}")
    if max_len < 16:
        raise ValueError("max_len must be at least 16")
    if is_safe_id(name, max_len=max_len):
        return name
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    cleaned = _ID_INVALID.sub("-", name.lower()).strip("-._")
    cleaned = cleaned[: max_len - len(digest) - 1].rstrip("-._")
    return f"{cleaned}-{digest}" if cleaned else f"id-{digest}"


def check_id(name: str, what: str) -> str:
    """Validate an id used as one key segment; tell the caller to use ``sanitize_id`` otherwise."""
    if not is_safe_id(name):
        raise UnsafeKeyError(
            f"{what} {name!r} is not a safe id ([a-z0-9][a-z0-9._-]*, at most 64 chars); "
            f"use rayedit.store.sanitize_id() (would give {sanitize_id(str(name))!r})"
        )
    return name
