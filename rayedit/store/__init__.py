"""rayedit.store: where campaigns live (a local folder or s3://bucket/prefix).

The only layer that knows about URIs and boto3; it never imports Ray. Tensors are stored with
safetensors only (never pickle), tables as Parquet, and steps are committed with a marker written
last (see ``rayedit.store.layout``).
"""

from rayedit.store.base import Store
from rayedit.store.cache import BlobCache, StoreBlobCache
from rayedit.store.errors import (
    BucketNotFound,
    CorruptStepError,
    InvalidTensorFile,
    KeyNotFound,
    StepNotCommitted,
    StoreError,
    StoreURIError,
    UnsafeKeyError,
)
from rayedit.store.keys import is_safe_id, safe_key, sanitize_id
from rayedit.store.layout import (
    CommittedStep,
    commit_eval_part,
    commit_step,
    committed_steps,
    eval_parts_done,
    read_committed_step,
)
from rayedit.store.local import LocalStore
from rayedit.store.uri import open_store, parse_store_uri

__all__ = [
    "BlobCache",
    "BucketNotFound",
    "CommittedStep",
    "CorruptStepError",
    "InvalidTensorFile",
    "KeyNotFound",
    "LocalStore",
    "StepNotCommitted",
    "Store",
    "StoreBlobCache",
    "StoreError",
    "StoreURIError",
    "UnsafeKeyError",
    "commit_eval_part",
    "commit_step",
    "committed_steps",
    "eval_parts_done",
    "is_safe_id",
    "open_store",
    "parse_store_uri",
    "read_committed_step",
    "safe_key",
    "sanitize_id",
]
