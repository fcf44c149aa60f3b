"""Encoding of Parquet tables and safetensors tensor files to and from bytes.

Tensors go through safetensors only: its format is a JSON header plus raw buffers, so reading an
untrusted object can never execute code. We validate the header ourselves before handing the bytes to
safetensors so that a pickle (``torch.save``) or any other file gives one clear error instead of a
parser message, and we never fall back to ``torch.load``.

torch is imported lazily: the store is also used by processes that only move Parquet around, and
``import torch`` costs seconds.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from rayedit.store.errors import InvalidTensorFile, StoreError

if TYPE_CHECKING:
    import torch

# A safetensors header is JSON describing dtypes/shapes/offsets; 100 MB is the reference parser's cap.
_MAX_HEADER_BYTES = 100_000_000

Bytes = bytes | bytearray | memoryview


def encode_parquet(table: pa.Table, **write_options: Any) -> bytes:
    """Serialize a table to Parquet bytes (zstd by default: smaller objects, fast to decode)."""
    if not isinstance(table, pa.Table):
        raise TypeError(f"write_parquet expects a pyarrow.Table, got {type(table).__name__}")
    write_options.setdefault("compression", "zstd")
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **write_options)
    return sink.getvalue().to_pybytes()


def decode_parquet(data: Bytes, *, key: str) -> pa.Table:
    try:
        return pq.read_table(pa.BufferReader(data))
    except (pa.ArrowInvalid, OSError) as exc:
        raise StoreError(f"object {key!r} is not a valid Parquet file: {exc}") from None


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str] | None:
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping):
        raise TypeError("tensor metadata must be a dict[str, str]")
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"tensor metadata must be dict[str, str]; got {type(k).__name__}: {type(v).__name__}")
    return dict(metadata)


def encode_tensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialize named tensors to safetensors bytes.

    Tensors are detached, moved to CPU and made contiguous; tensors that share storage (e.g. tied
    weights, or views of one buffer) are cloned, because safetensors refuses shared memory.
    """
    import torch
    from safetensors.torch import save

    meta = _check_metadata(metadata)
    prepared: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not name:
            raise TypeError("tensor names must be non-empty strings")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensor {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        if tensor.layout != torch.strided:
            raise TypeError(f"tensor {name!r} has layout {tensor.layout}; only dense tensors can be stored")
        t = tensor.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen_storages:
            t = t.clone()
        elif t.numel():
            seen_storages.add(ptr)
        prepared[name] = t
    return save(prepared, metadata=meta)


def parse_safetensors_header(data: Bytes, *, key: str) -> dict[str, Any]:
    """Validate the framing of a safetensors file and return its JSON header (without loading tensors)."""
    view = memoryview(data)
    if len(view) < 8:
        raise InvalidTensorFile(f"object {key!r} is not a safetensors file (only {len(view)} bytes)")
    (header_len,) = struct.unpack("<Q", view[:8])
    if header_len == 0 or header_len > _MAX_HEADER_BYTES or header_len > len(view) - 8:
        raise InvalidTensorFile(
            f"object {key!r} is not a safetensors file (bad header length; refusing to unpickle or guess)"
        )
    raw = bytes(view[8 : 8 + header_len])
    if not raw.startswith(b"{"):
        raise InvalidTensorFile(f"object {key!r} is not a safetensors file (header is not JSON)")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InvalidTensorFile(f"object {key!r} is not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise InvalidTensorFile(f"object {key!r} is not a safetensors file (header is not a JSON object)")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise InvalidTensorFile(f"object {key!r} has malformed safetensors metadata")
    return header


def decode_tensors(data: Bytes, *, key: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load tensors and the ``__metadata__`` dict from safetensors bytes; never unpickles."""
    from safetensors.torch import load

    header = parse_safetensors_header(data, key=key)
    try:
        tensors = load(bytes(data))
    except Exception as exc:  # safetensors raises its own SafetensorError for any framing problem
        raise InvalidTensorFile(f"object {key!r} is not a valid safetensors file: {exc}") from None
    return tensors, dict(header.get("__metadata__", {}))
