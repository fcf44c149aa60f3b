"""A content cache on top of a store, for expensive deterministic blobs (covariance statistics).

The editing layer accepts any object with this ``get``/``put`` protocol, so it never needs to know
about stores or URIs. Keys are expected to be content addresses (model fingerprint, layer, corpus
hash, ...): two writers of one key write the same bytes, hence ``put`` keeps whichever came first.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from rayedit.store.base import Store
from rayedit.store.errors import KeyNotFound
from rayedit.store.formats import Bytes
from rayedit.store.keys import join_key, safe_key, safe_prefix
from rayedit.store.layout import STATS_PREFIX


@runtime_checkable
class BlobCache(Protocol):
    """What the editing layer needs from a cache."""

    def get(self, key: str) -> bytes | None: ...

    def put(self, key: str, data: bytes) -> None: ...


class StoreBlobCache:
    """``BlobCache`` backed by ``store`` under ``prefix`` (default ``cache/stats``)."""

    def __init__(self, store: Store, prefix: str = STATS_PREFIX) -> None:
        self._store = store
        self._prefix = safe_prefix(prefix)

    @property
    def store(self) -> Store:
        return self._store

    @property
    def prefix(self) -> str:
        return self._prefix

    def _key(self, key: str) -> str:
        return join_key(self._prefix, safe_key(key))

    def get(self, key: str) -> bytes | None:
        """The cached bytes, or None on a miss. Objects are written atomically: never partial."""
        try:
            return self._store.get_bytes(self._key(key))
        except KeyNotFound:
            return None

    def put(self, key: str, data: Bytes) -> None:
        """Store ``data`` unless ``key`` is already cached (first writer wins; no overwrite)."""
        self._store.put_if_absent(self._key(key), data)

    def __contains__(self, key: str) -> bool:
        return self._store.exists(self._key(key))

    def __repr__(self) -> str:
        return f"StoreBlobCache({self._store.uri!r}, prefix={self._prefix!r})"
