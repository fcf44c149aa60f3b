"""The Store protocol shared by the local-folder and S3 backends.

Every backend offers the same semantics so that the runtime never branches on the URI:

- keys are relative '/'-separated paths (see ``safe_key``); a store may be scoped to a sub-prefix;
- whole-object writes are atomic (a reader sees the old object, the new one, or nothing; never a
  partial write);
- ``put_if_absent`` is the one primitive the commit protocol builds on: among concurrent writers of
  the same key exactly one gets ``True``;
- ``list(prefix)`` treats ``prefix`` as a folder and returns full keys (relative to this store)
  recursively and sorted.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from rayedit.store.formats import Bytes, decode_parquet, decode_tensors, encode_parquet, encode_tensors

if TYPE_CHECKING:
    import pyarrow.fs as pafs
    import torch


class Store(abc.ABC):
    """Abstract object store; see the module docstring for the shared semantics."""

    # --- bytes ------------------------------------------------------------------------------------
    @abc.abstractmethod
    def put_bytes(self, key: str, data: Bytes) -> None:
        """Write (or overwrite) ``key`` atomically."""

    @abc.abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Read ``key``; raise ``KeyNotFound`` if it does not exist."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def size(self, key: str) -> int:
        """Size in bytes of ``key``; raise ``KeyNotFound`` if it does not exist."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Delete ``key``; deleting a missing key is not an error (same as S3)."""

    @abc.abstractmethod
    def put_if_absent(self, key: str, data: Bytes) -> bool:
        """Write ``key`` only if it does not exist. True if this call wrote it, False otherwise."""

    @abc.abstractmethod
    def list_sizes(self, prefix: str = "") -> dict[str, int]:
        """All keys under the folder ``prefix`` (recursive) mapped to their sizes."""

    @abc.abstractmethod
    def list_children(self, prefix: str = "") -> list[str]:
        """Names of the immediate children (objects and sub-folders) of the folder ``prefix``, sorted."""

    def list(self, prefix: str = "") -> list[str]:
        """All keys under the folder ``prefix`` (recursive), sorted, relative to this store."""
        return sorted(self.list_sizes(prefix))

    # --- scoping and interop ----------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def uri(self) -> str:
        """The store's URI (``file:///...`` or ``s3://bucket/prefix``); never contains credentials."""

    @abc.abstractmethod
    def child(self, prefix: str) -> Store:
        """A store of the same backend scoped to ``prefix`` below this one."""

    @abc.abstractmethod
    def open_args(self) -> dict[str, Any]:
        """``open_store(**store.open_args())`` reopens this store in another process (no credentials)."""

    @abc.abstractmethod
    def pyarrow_filesystem(self) -> tuple[pafs.FileSystem, str]:
        """A pyarrow FileSystem and the base path of this store in it (for ``pyarrow.dataset``)."""

    def pyarrow_paths(self, keys: list[str]) -> tuple[pafs.FileSystem, list[str]]:
        """The pyarrow FileSystem and the paths of ``keys`` in it (for ``pyarrow.dataset``)."""
        from rayedit.store.keys import safe_key

        fs, base = self.pyarrow_filesystem()
        base = base.rstrip("/")
        return fs, [f"{base}/{safe_key(k)}" if base else safe_key(k) for k in keys]

    # --- typed objects ----------------------------------------------------------------------------
    def write_parquet(self, key: str, table: pa.Table, **write_options: Any) -> None:
        """Write a pyarrow Table as one Parquet object (zstd unless ``compression`` is given)."""
        self.put_bytes(key, encode_parquet(table, **write_options))

    def read_parquet(self, key: str) -> pa.Table:
        return decode_parquet(self.get_bytes(key), key=key)

    def write_tensors(
        self, key: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
    ) -> None:
        """Write named tensors as a safetensors object (with optional string metadata)."""
        self.put_bytes(key, encode_tensors(tensors, metadata))

    def read_tensors(self, key: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Read a safetensors object; raise ``InvalidTensorFile`` for anything else (never unpickles)."""
        return decode_tensors(self.get_bytes(key), key=key)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"
