"""Where trace and scan results live in a store, and how a part is committed.

::

    campaigns/<cid>/trace/job.json                      the trace's identity (model, facts, settings), frozen
    campaigns/<cid>/trace/part-<shard:05d>.parquet      rows of one shard of facts
    campaigns/<cid>/trace/part-<shard:05d>.done         its commit marker (written last)
    campaigns/<cid>/trace/summary.json                  derived: per-layer effects, the suggested window
    campaigns/<cid>/scan/...                            the same for a layer scan (one shard per candidate)

A part is committed like an evaluation part of a campaign (``rayedit.store.layout``): the Parquet
object first, then a JSON marker listing its size and sha256 with ``put_if_absent``, so exactly one
writer commits a shard and readers only see committed parts. The store is duck-typed (the
``rayedit.store.Store`` API: ``put_bytes``, ``put_if_absent``, ``get_bytes``, ``exists``,
``list_sizes``, ``pyarrow_paths``) so that this module imports neither the store layer nor torch.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

LOCATE_KINDS = ("trace", "scan")
MARKER_FORMAT = "rayedit.commit"
_PART = re.compile(r"^part-(\d{5,})\.done$")


class LocateMismatch(RuntimeError):
    """A trace/scan of a campaign that already holds one with a different identity."""


def _check(cid: str, kind: str) -> None:
    if kind not in LOCATE_KINDS:
        raise ValueError(f"unknown locate kind {kind!r}")
    if not cid or "/" in cid or "\\" in cid or ".." in cid or cid.startswith("."):
        raise ValueError(f"unsafe campaign id {cid!r}")


def prefix(cid: str, kind: str) -> str:
    _check(cid, kind)
    return f"campaigns/{cid}/{kind}"


def part_key(cid: str, kind: str, shard: int) -> str:
    return f"{prefix(cid, kind)}/part-{int(shard):05d}.parquet"


def done_key(cid: str, kind: str, shard: int) -> str:
    return f"{prefix(cid, kind)}/part-{int(shard):05d}.done"


def job_key(cid: str, kind: str) -> str:
    return f"{prefix(cid, kind)}/job.json"


def summary_key(cid: str, kind: str) -> str:
    return f"{prefix(cid, kind)}/summary.json"


def encode_table(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def commit_part(store: Any, cid: str, kind: str, shard: int, table: pa.Table,
                meta: dict[str, Any] | None = None) -> bool:
    """Write a part, then its marker. False (and nothing written) if the shard is already committed."""
    marker = done_key(cid, kind, shard)
    if store.exists(marker):
        return False
    data = encode_table(table)
    name = part_key(cid, kind, shard).rsplit("/", 1)[1]
    store.put_bytes(part_key(cid, kind, shard), data)
    body = {"format": MARKER_FORMAT, "version": 1, "kind": kind, "campaign": cid, "shard": int(shard),
            "objects": {name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}},
            "meta": meta or {}}
    return bool(store.put_if_absent(marker, json.dumps(body, sort_keys=True, separators=(",", ":"),
                                                       allow_nan=False).encode()))


def parts_done(store: Any, cid: str, kind: str) -> list[int]:
    """Shards whose marker exists and whose part has the size the marker recorded (sorted)."""
    folder = prefix(cid, kind)
    sizes = store.list_sizes(folder)
    out = []
    for key in sizes:
        m = _PART.match(key[len(folder) + 1:])
        if not m:
            continue
        shard = int(m.group(1))
        try:
            marker = json.loads(store.get_bytes(key).decode())
            (name, desc), = marker["objects"].items()
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # a damaged marker: the shard is redone
        if sizes.get(f"{folder}/{name}") == desc.get("size"):
            out.append(shard)
    return sorted(out)


def read_table(store: Any, cid: str, kind: str) -> pa.Table | None:
    """Every committed part of a trace/scan as one table (None if there is none)."""
    import pyarrow.dataset as ds

    shards = parts_done(store, cid, kind)
    if not shards:
        return None
    fs, paths = store.pyarrow_paths([part_key(cid, kind, s) for s in shards])
    first = ds.dataset(paths, filesystem=fs, format="parquet", partitioning=None)
    schema = pa.unify_schemas([f.physical_schema for f in first.get_fragments()], promote_options="permissive")
    return ds.dataset(paths, schema=schema, filesystem=fs, format="parquet", partitioning=None).to_table()


def has_parts(store: Any, cid: str, kind: str) -> bool:
    try:
        return bool(parts_done(store, cid, kind))
    except Exception:  # a store that cannot list this prefix has no parts worth reporting
        return False


def freeze_job(store: Any, cid: str, kind: str, identity: dict[str, Any]) -> bool:
    """Record what this trace/scan is; refuse a different one under the same campaign id.

    True if this call froze it. A re-run with the same identity resumes (committed shards are skipped).
    """
    key = job_key(cid, kind)
    identity = json_safe(identity)
    text = json.dumps(identity, sort_keys=True, indent=1, allow_nan=False)
    if store.put_if_absent(key, text.encode()):
        return True
    frozen = json.loads(store.get_bytes(key).decode())
    if frozen != json.loads(text):
        diff = sorted(k for k in set(frozen) | set(identity) if frozen.get(k) != identity.get(k))
        raise LocateMismatch(f"campaign {cid!r} already holds a {kind} with a different {', '.join(diff)}; "
                             f"use another --name, or the same settings to resume it")
    return False


def read_json(store: Any, key: str) -> dict[str, Any] | None:
    if not store.exists(key):
        return None
    return json.loads(store.get_bytes(key).decode())


def json_safe(obj: Any) -> Any:
    """NaN/inf → None, tuples → lists: strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def write_json(store: Any, key: str, obj: dict[str, Any]) -> None:
    store.put_bytes(key, json.dumps(json_safe(obj), sort_keys=True, indent=1, allow_nan=False).encode())
