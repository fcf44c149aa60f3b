"""Local-folder backend (the embedded default).

Writes are atomic: data goes to a temporary file in the destination folder, is fsync'd, then
``os.replace``d over the key (and the folder is fsync'd), so a crash leaves either the old object or
the new one. ``put_if_absent`` hard-links the finished temporary file to the key: ``link`` fails if
the key exists, so exactly one of several concurrent writers wins and readers never see a partial
object.

An operating-system failure of a write (disk full, quota, read-only file system, permissions) removes
the temporary file and raises ``StoreIOError`` naming the key, the store and the errno in plain words;
nothing half-written is ever visible, and what was committed before stays committed.

The root is a jail: any key whose real path (after resolving symlinks) lies outside the root is
refused, so a symlink planted inside the store cannot make us read or write elsewhere.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from rayedit.faults import fault_point
from rayedit.store.base import Store
from rayedit.store.errors import KeyNotFound, StoreError, StoreIOError, UnsafeKeyError
from rayedit.store.formats import Bytes
from rayedit.store.keys import TMP_PREFIX, join_key, safe_key, safe_prefix

log = logging.getLogger(__name__)

# File systems without hard links (some FUSE/SMB mounts) report one of these from os.link.
_NO_LINK_ERRNOS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK}
# What a user can do about the common write failures, in plain words.
_WRITE_ADVICE = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EIO: "an I/O error occurred",
}


def _fsync_dir(path: str) -> None:
    # Makes the rename/link itself durable; not supported on every platform, hence best effort.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


class LocalStore(Store):
    """A store in a local folder. Use ``open_store(path)`` or ``LocalStore(path)``."""

    def __init__(self, root: str | os.PathLike[str], *, create: bool = True) -> None:
        path = os.path.abspath(os.path.expanduser(os.fspath(root)))
        if create:
            try:
                os.makedirs(path, exist_ok=True)
            except OSError as exc:  # a file in the way, permissions, read-only or full file system
                raise StoreIOError(exc.errno or errno.EIO, f"cannot create the local store folder {path!r}: "
                                   f"{_WRITE_ADVICE.get(exc.errno or 0, exc.strerror or str(exc))} "
                                   f"({exc.strerror or exc})") from None
        elif not os.path.isdir(path):
            raise StoreError(f"local store folder {path!r} does not exist")
        # The jail is the real root: resolving it once means a symlinked root (e.g. /tmp on macOS)
        # is fine, while symlinks *inside* it are checked on every access.
        self._jail = os.path.realpath(path)
        self._prefix = ""

    @classmethod
    def _scoped(cls, jail: str, prefix: str) -> LocalStore:
        obj = cls.__new__(cls)
        obj._jail = jail
        obj._prefix = prefix
        return obj

    # --- paths ------------------------------------------------------------------------------------
    @property
    def root(self) -> Path:
        """The folder this store (or child) maps to."""
        return Path(self._jail, *self._prefix.split("/")) if self._prefix else Path(self._jail)

    @property
    def uri(self) -> str:
        return self.root.as_uri()

    def _inside(self, real: str) -> bool:
        return real == self._jail or real.startswith(self._jail + os.sep)

    def _path(self, key: str) -> str:
        """Absolute path of a validated key, refusing keys that resolve outside the root."""
        full = join_key(self._prefix, safe_key(key))
        path = os.path.join(self._jail, *full.split("/"))
        if not self._inside(os.path.realpath(path)):
            raise UnsafeKeyError(f"key {key!r} resolves outside the store root {self._jail!r} (symlink)")
        return path

    def _dir(self, prefix: str) -> str:
        full = join_key(self._prefix, safe_prefix(prefix)) if (self._prefix or safe_prefix(prefix)) else ""
        path = os.path.join(self._jail, *full.split("/")) if full else self._jail
        if not self._inside(os.path.realpath(path)):
            raise UnsafeKeyError(f"prefix {prefix!r} resolves outside the store root {self._jail!r} (symlink)")
        return path

    def _key_of(self, path: str) -> str:
        """Key (relative to this store) of an absolute path inside it."""
        rel = os.path.relpath(path, str(self.root))
        return rel.replace(os.sep, "/")

    # --- writes -----------------------------------------------------------------------------------
    def _write_temp(self, folder: str, data: Bytes) -> str:
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f"{TMP_PREFIX}{secrets.token_hex(8)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with os.fdopen(fd, "wb") as f:
                half = len(data) // 2
                f.write(data[:half])
                fault_point("local-write", tmp)  # fault matrix: disk full half-way through a write
                f.write(data[half:])
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            _unlink_quiet(tmp)
            raise
        return tmp

    def _io_error(self, key: str, size: int, exc: OSError) -> StoreIOError:
        why = _WRITE_ADVICE.get(exc.errno or 0, exc.strerror or str(exc))
        return StoreIOError(
            exc.errno or errno.EIO,
            f"{self.uri}: cannot write {key!r} ({size} bytes): {why} ({exc.strerror or exc}); the partial file "
            "was removed and this object was not committed; fix the cause, then `rayedit resume` continues "
            "from the last committed step",
        )

    def put_bytes(self, key: str, data: Bytes) -> None:
        path = self._path(key)
        folder = os.path.dirname(path)
        try:
            tmp = self._write_temp(folder, data)
        except (NotADirectoryError, FileExistsError):
            raise StoreError(f"cannot write {key!r}: a parent of it is an object, not a folder") from None
        except OSError as exc:
            raise self._io_error(key, len(data), exc) from None
        try:
            os.replace(tmp, path)
        except IsADirectoryError:
            _unlink_quiet(tmp)
            raise StoreError(f"cannot write {key!r}: it is a folder of other objects") from None
        except OSError as exc:
            _unlink_quiet(tmp)
            raise self._io_error(key, len(data), exc) from None
        except BaseException:
            _unlink_quiet(tmp)
            raise
        _fsync_dir(folder)

    def put_if_absent(self, key: str, data: Bytes) -> bool:
        path = self._path(key)
        folder = os.path.dirname(path)
        if os.path.lexists(path):  # cheap early exit; the link below is what decides races
            return False
        try:
            tmp = self._write_temp(folder, data)
        except (NotADirectoryError, FileExistsError):
            raise StoreError(f"cannot write {key!r}: a parent of it is an object, not a folder") from None
        except OSError as exc:
            raise self._io_error(key, len(data), exc) from None
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in _NO_LINK_ERRNOS:
                raise self._io_error(key, len(data), exc) from None
            return self._put_if_absent_excl(path, data)
        finally:
            _unlink_quiet(tmp)
        _fsync_dir(folder)
        return True

    def _put_if_absent_excl(self, path: str, data: Bytes) -> bool:
        # Fallback without hard links: O_EXCL still elects exactly one writer, but a reader could see
        # the object before it is complete, so this is only used where link() is unavailable.
        log.debug("hard links unsupported under %s; using O_EXCL create", self._jail)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:  # a partial marker must not block every later writer
            _unlink_quiet(path)
            raise self._io_error(self._key_of(path), len(data), exc) from None
        _fsync_dir(os.path.dirname(path))
        return True

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            os.unlink(path)
        except (FileNotFoundError, IsADirectoryError):
            pass  # missing (or a folder, which is not an object): same as S3's idempotent delete
        except PermissionError:
            if os.path.isdir(path):  # macOS reports EPERM for unlink on a folder
                return
            raise

    # --- reads ------------------------------------------------------------------------------------
    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                return f.read()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise KeyNotFound(f"{self.uri}: no object {key!r}") from None

    def exists(self, key: str) -> bool:
        return os.path.isfile(self._path(key))

    def size(self, key: str) -> int:
        path = self._path(key)
        if not os.path.isfile(path):
            raise KeyNotFound(f"{self.uri}: no object {key!r}")
        return os.stat(path).st_size

    def list_sizes(self, prefix: str = "") -> dict[str, int]:
        top = self._dir(prefix)
        out: dict[str, int] = {}
        if not os.path.isdir(top):
            return out
        # followlinks=False: symlinked folders are not descended into (no loops, no escapes).
        for folder, _dirs, files in os.walk(top, followlinks=False):
            for name in files:
                if name.startswith(TMP_PREFIX):
                    continue
                path = os.path.join(folder, name)
                if os.path.islink(path) and not self._inside(os.path.realpath(path)):
                    continue  # a planted symlink pointing outside: not part of the store
                key = self._key_of(path)
                try:
                    safe_key(key)
                    out[key] = os.stat(path).st_size
                except (UnsafeKeyError, OSError):
                    continue  # foreign file we could not address anyway, or removed meanwhile
        return out

    def list_children(self, prefix: str = "") -> list[str]:
        top = self._dir(prefix)
        try:
            names = os.listdir(top)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(n for n in names if not n.startswith(TMP_PREFIX))

    # --- scoping and interop ----------------------------------------------------------------------
    def open_args(self) -> dict[str, Any]:
        """Keyword arguments of ``open_store`` that reopen this store elsewhere."""
        return {"uri": self.uri}

    def __reduce__(self) -> tuple[Any, tuple[dict[str, Any]]]:
        # Travel as the URI (e.g. as a Ray task argument); the jail is recomputed on arrival.
        from rayedit.store.uri import reopen_store

        return (reopen_store, (self.open_args(),))

    def child(self, prefix: str) -> LocalStore:
        sub = safe_prefix(prefix)
        if not sub:
            return self
        full = join_key(self._prefix, sub)
        path = os.path.join(self._jail, *full.split("/"))
        if not self._inside(os.path.realpath(path)):
            raise UnsafeKeyError(f"prefix {prefix!r} resolves outside the store root {self._jail!r} (symlink)")
        return LocalStore._scoped(self._jail, full)

    def pyarrow_filesystem(self) -> tuple[pafs.FileSystem, str]:
        # pyarrow does its own path handling: the symlink jail above does not apply to it, which is
        # fine for reading our own committed objects (their paths come from list()).
        return pafs.LocalFileSystem(), str(self.root)


def _unlink_quiet(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
