"""Exceptions of the store layer.

All derive from ``StoreError`` so callers (runtime, CLI) can catch one type. Messages never contain
credentials: they name keys, URIs (already credential-free) and the backend's error code only.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base class of every error raised by ``rayedit.store``."""


class StoreIOError(StoreError, OSError):
    """A local store operation failed in the operating system (disk full, read-only, permissions).

    Also an ``OSError`` (with the original ``errno``), so callers that handle OS errors still do.
    """


class StoreURIError(StoreError, ValueError):
    """A store URI is malformed (unknown scheme, bad bucket name, ``..`` segments, ...)."""


class UnsafeKeyError(StoreError, ValueError):
    """A key is not a safe relative '/'-separated key (absolute, ``..``, empty segment, ...)."""


class KeyNotFound(StoreError, KeyError):
    """The key does not exist in the store."""

    def __str__(self) -> str:  # KeyError would repr() the message; keep it readable
        return str(self.args[0]) if self.args else "key not found"


class BucketNotFound(StoreError):
    """The S3 bucket named in the URI does not exist (and ``create_bucket`` was not requested)."""


class InvalidTensorFile(StoreError, ValueError):
    """An object read as tensors is not a valid safetensors file (we never fall back to pickle)."""


class StepNotCommitted(StoreError):
    """A step (or evaluation part) was requested but its commit marker does not exist."""


class CorruptStepError(StoreError):
    """A committed step's objects do not match the sizes/hashes recorded in its marker."""
