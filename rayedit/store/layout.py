"""Campaign layout in the store and the commit protocol (architecture.md, "Store layout").

::

    campaigns/<cid>/spec.yaml
    campaigns/<cid>/streams/<sid>/steps/<step:06d>/{delta.safetensors, edits.parquet, COMMITTED}
    campaigns/<cid>/streams/<sid>/eval/<step:06d>/<suite>/part-<shard:05d>.parquet  (+ part-<shard:05d>.done)
    cache/stats/<model-fingerprint>/<layer>/<corpus-hash>/cov.safetensors

Commit protocol: a step's (or evaluation part's) data objects are written first and its marker last,
with ``put_if_absent`` (local: hard link; S3: If-None-Match), so exactly one writer commits a step.
The marker is JSON listing the size and sha256 of every data object. Readers trust only committed
steps: data without a marker is invisible, and is simply overwritten by the next writer of the step.
A committed step is never written again: ``commit_step`` returns False as soon as it sees the marker.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa

from rayedit.faults import fault_point
from rayedit.store.base import Store
from rayedit.store.errors import CorruptStepError, KeyNotFound, StepNotCommitted, UnsafeKeyError
from rayedit.store.formats import Bytes, decode_parquet, decode_tensors, encode_parquet
from rayedit.store.keys import check_id, safe_key

if TYPE_CHECKING:
    import pyarrow.dataset as ds
    import torch

log = logging.getLogger(__name__)

DELTA = "delta.safetensors"
EDITS = "edits.parquet"
COMMITTED = "COMMITTED"
SPEC = "spec.yaml"
COV = "cov.safetensors"
STATS_PREFIX = "cache/stats"
MARKER_FORMAT = "rayedit.commit"
MARKER_VERSION = 1

Verify = Literal["none", "exists", "size", "sha256"]
_STEP_DIR = re.compile(r"^\d{6,}$")
_PART = re.compile(r"^part-(\d{5,})\.done$")


# --- keys -----------------------------------------------------------------------------------------
def _step(step: int) -> str:
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    return f"{step:06d}"


def _segment(value: str | int, what: str) -> str:
    """One key segment from a free-form but already-safe value (layer names, hashes)."""
    s = str(value)
    if "/" in s:
        raise UnsafeKeyError(f"{what} {s!r} must not contain '/'")
    return safe_key(s)


def campaign_prefix(cid: str) -> str:
    return f"campaigns/{check_id(cid, 'campaign id')}"


def spec_key(cid: str) -> str:
    return f"{campaign_prefix(cid)}/{SPEC}"


def stream_prefix(cid: str, sid: str) -> str:
    return f"{campaign_prefix(cid)}/streams/{check_id(sid, 'stream id')}"


def steps_prefix(cid: str, sid: str) -> str:
    return f"{stream_prefix(cid, sid)}/steps"


def step_prefix(cid: str, sid: str, step: int) -> str:
    return f"{steps_prefix(cid, sid)}/{_step(step)}"


def step_object_key(cid: str, sid: str, step: int, name: str) -> str:
    """Key of a data object of a step, e.g. ``name=DELTA`` or ``EDITS``."""
    if name == COMMITTED:
        raise UnsafeKeyError(f"{COMMITTED!r} is the step marker, not a data object")
    return f"{step_prefix(cid, sid, step)}/{_segment(name, 'object name')}"


def delta_key(cid: str, sid: str, step: int) -> str:
    return step_object_key(cid, sid, step, DELTA)


def edits_key(cid: str, sid: str, step: int) -> str:
    return step_object_key(cid, sid, step, EDITS)


def step_marker_key(cid: str, sid: str, step: int) -> str:
    return f"{step_prefix(cid, sid, step)}/{COMMITTED}"


def eval_prefix(cid: str, sid: str, step: int, suite: str | None = None) -> str:
    base = f"{stream_prefix(cid, sid)}/eval/{_step(step)}"
    return f"{base}/{check_id(suite, 'suite')}" if suite is not None else base


def _shard(shard: int) -> str:
    if not isinstance(shard, int) or isinstance(shard, bool) or shard < 0:
        raise ValueError(f"shard must be a non-negative int, got {shard!r}")
    return f"part-{shard:05d}"


def eval_part_key(cid: str, sid: str, step: int, suite: str, shard: int) -> str:
    return f"{eval_prefix(cid, sid, step, suite)}/{_shard(shard)}.parquet"


def eval_done_key(cid: str, sid: str, step: int, suite: str, shard: int) -> str:
    return f"{eval_prefix(cid, sid, step, suite)}/{_shard(shard)}.done"


def stats_cache_key(model_fingerprint: str, layer: str | int, corpus_hash: str, name: str = COV) -> str:
    """Key of a statistics object relative to ``cache/stats`` (what ``StoreBlobCache`` takes)."""
    return "/".join(
        (
            _segment(model_fingerprint, "model fingerprint"),
            _segment(layer, "layer"),
            _segment(corpus_hash, "corpus hash"),
            _segment(name, "object name"),
        )
    )


def stats_key(model_fingerprint: str, layer: str | int, corpus_hash: str, name: str = COV) -> str:
    """Full key ``cache/stats/<model-fingerprint>/<layer>/<corpus-hash>/cov.safetensors``."""
    return f"{STATS_PREFIX}/{stats_cache_key(model_fingerprint, layer, corpus_hash, name)}"


# --- listing --------------------------------------------------------------------------------------
def list_campaigns(store: Store) -> list[str]:
    return [c for c in store.list_children("campaigns") if not c.startswith(".")]


def list_streams(store: Store, cid: str) -> list[str]:
    return store.list_children(f"{campaign_prefix(cid)}/streams")


# --- markers --------------------------------------------------------------------------------------
def _describe(data: Bytes) -> dict[str, Any]:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _marker_bytes(kind: str, ident: dict[str, Any], objects: dict[str, dict[str, Any]], meta_json: str) -> bytes:
    body = {
        "format": MARKER_FORMAT,
        "version": MARKER_VERSION,
        "kind": kind,
        **ident,
        "objects": objects,
        "meta": json.loads(meta_json),
    }
    # Sorted and compact: the same commit always produces the same marker bytes.
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _meta_json(marker_payload: Mapping[str, Any] | None) -> str:
    try:
        return json.dumps(dict(marker_payload or {}), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"marker payload must be JSON-serializable: {exc}") from None


def _parse_marker(data: bytes, key: str) -> dict[str, Any]:
    try:
        marker = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CorruptStepError(f"marker {key!r} is not valid JSON") from None
    if not isinstance(marker, dict) or not isinstance(marker.get("objects"), dict):
        raise CorruptStepError(f"marker {key!r} has no 'objects' table")
    return marker


def _read_marker(store: Store, key: str) -> dict[str, Any] | None:
    try:
        data = store.get_bytes(key)
    except KeyNotFound:
        return None
    return _parse_marker(data, key)


def _verify_objects(
    store: Store, folder: str, marker: dict[str, Any], sizes: Mapping[str, int] | None, verify: Verify
) -> str | None:
    """None if the marker's objects verify at the given level, else the problem (for logs)."""
    if verify == "none":
        return None
    for name, desc in marker["objects"].items():
        if not isinstance(desc, dict):
            return f"marker entry for {name!r} is malformed"
        key = f"{folder}/{name}"
        if sizes is not None:
            size = sizes.get(key)
        else:
            try:
                size = store.size(key)
            except KeyNotFound:
                size = None
        if size is None:
            return f"{key} is missing"
        if verify in ("size", "sha256") and size != desc.get("size"):
            return f"{key} has {size} bytes, marker says {desc.get('size')}"
        if verify == "sha256":
            try:
                digest = hashlib.sha256(store.get_bytes(key)).hexdigest()
            except KeyNotFound:
                return f"{key} is missing"
            if digest != desc.get("sha256"):
                return f"{key} does not match its sha256 in the marker"
    return None


def _write_then_mark(
    store: Store,
    folder: str,
    marker_key: str,
    files: Mapping[str, Bytes],
    kind: str,
    ident: dict[str, Any],
    marker_payload: Mapping[str, Any] | None,
) -> bool:
    meta_json = _meta_json(marker_payload)  # fail before writing anything
    for name in files:
        _segment(name, "object name")
        if name == COMMITTED or name.endswith(".done"):
            raise UnsafeKeyError(f"{name!r} is reserved for commit markers")
    if store.exists(marker_key):
        return False
    objects: dict[str, dict[str, Any]] = {}
    for name, data in files.items():
        # Re-check before each object: never overwrite a step someone else committed meanwhile.
        if objects and store.exists(marker_key):
            return False
        store.put_bytes(f"{folder}/{name}", data)
        objects[name] = _describe(data)
        if name == DELTA:
            fault_point("delta-upload", f"{folder}/{name}")  # fault matrix: the delta landed, no marker yet
    fault_point("marker-write", marker_key)
    won = store.put_if_absent(marker_key, _marker_bytes(kind, ident, objects, meta_json))
    if not won:
        theirs = _read_marker(store, marker_key)
        if theirs is not None and theirs.get("objects") != objects:
            # Two writers of one step is a scheduling bug; readers verifying sha256 will notice
            # if our objects replaced theirs after they committed.
            log.warning("%s: committed concurrently by another writer with different objects", marker_key)
    return won


# --- steps ----------------------------------------------------------------------------------------
@dataclass
class CommittedStep:
    """A committed step as read back: raw objects by name plus the marker."""

    step: int
    marker: dict[str, Any]
    files: dict[str, bytes] = field(default_factory=dict)

    @property
    def meta(self) -> dict[str, Any]:
        return dict(self.marker.get("meta", {}))

    def tensors(self, name: str = DELTA) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        return decode_tensors(self.files[name], key=name)

    def table(self, name: str = EDITS) -> pa.Table:
        return decode_parquet(self.files[name], key=name)


def commit_step(
    store: Store,
    cid: str,
    sid: str,
    step: int,
    files: Mapping[str, Bytes],
    marker_payload: Mapping[str, Any] | None = None,
) -> bool:
    """Write a step's data objects, then its COMMITTED marker. False if the step was already committed.

    ``files`` maps object names (e.g. ``DELTA``, ``EDITS``) to bytes. Leftovers of an uncommitted
    attempt are overwritten; a committed step is never touched (checked before every object).
    """
    ident = {"campaign": cid, "stream": sid, "step": step}
    return _write_then_mark(
        store,
        step_prefix(cid, sid, step),
        step_marker_key(cid, sid, step),
        files,
        "step",
        ident,
        marker_payload,
    )


def read_step_marker(store: Store, cid: str, sid: str, step: int) -> dict[str, Any] | None:
    """The parsed marker of a step, or None if the step is not committed."""
    return _read_marker(store, step_marker_key(cid, sid, step))


def _step_candidates(store: Store, cid: str, sid: str) -> tuple[list[int], dict[str, int]]:
    """Steps that have a marker (sorted), plus the sizes of everything under the stream's steps."""
    base = steps_prefix(cid, sid)
    sizes = store.list_sizes(base)
    candidates: list[int] = []
    for key in sizes:
        parts = key[len(base) + 1 :].split("/")
        if len(parts) == 2 and parts[1] == COMMITTED and _STEP_DIR.match(parts[0]):
            candidates.append(int(parts[0]))
    return sorted(candidates), sizes


def _step_verifies(store: Store, cid: str, sid: str, step: int, sizes: Mapping[str, int], verify: Verify) -> bool:
    mkey = step_marker_key(cid, sid, step)
    try:
        marker = _read_marker(store, mkey)
    except CorruptStepError as exc:
        log.warning("ignoring step %d of %s/%s: %s", step, cid, sid, exc)
        return False
    if marker is None:  # deleted between listing and reading
        return False
    problem = _verify_objects(store, step_prefix(cid, sid, step), marker, sizes, verify)
    if problem:
        log.warning("ignoring step %d of %s/%s: %s", step, cid, sid, problem)
        return False
    return True


def committed_steps(store: Store, cid: str, sid: str, *, verify: Verify = "size") -> list[int]:
    """Sorted steps of a stream that are committed and whose objects verify.

    ``verify``: 'none' (marker present), 'exists' (marker's objects present), 'size' (default:
    present with the recorded size; costs one listing plus one GET per marker), 'sha256' (re-reads
    and hashes every object). Steps that fail verification are skipped with a warning.
    """
    candidates, sizes = _step_candidates(store, cid, sid)
    if verify == "none":
        return candidates
    # Marker GETs are latency-bound on S3: a few in parallel.
    with ThreadPoolExecutor(max_workers=8) as pool:
        ok = pool.map(lambda s: _step_verifies(store, cid, sid, s, sizes, verify), candidates)
        return [s for s, good in zip(candidates, ok, strict=True) if good]


def last_committed_step(store: Store, cid: str, sid: str, *, verify: Verify = "size") -> int | None:
    """The highest committed step that verifies (what a resume continues from), or None.

    Checks markers from the newest down, so it costs one listing and usually one GET.
    """
    candidates, sizes = _step_candidates(store, cid, sid)
    for step in reversed(candidates):
        if verify == "none" or _step_verifies(store, cid, sid, step, sizes, verify):
            return step
    return None


def read_committed_step(
    store: Store,
    cid: str,
    sid: str,
    step: int,
    names: Iterable[str] | None = None,
    *,
    verify: bool = True,
) -> CommittedStep:
    """Read a committed step's objects (all, or ``names``), checking sizes and sha256 by default.

    Raises ``StepNotCommitted`` without a marker and ``CorruptStepError`` on a mismatch.
    """
    marker = read_step_marker(store, cid, sid, step)
    if marker is None:
        raise StepNotCommitted(f"{store.uri}: step {step} of {cid}/{sid} is not committed")
    wanted = list(marker["objects"]) if names is None else list(names)
    out = CommittedStep(step=step, marker=marker)
    for name in wanted:
        desc = marker["objects"].get(name)
        if desc is None:
            raise KeyNotFound(f"{store.uri}: committed step {step} of {cid}/{sid} has no object {name!r}")
        key = step_object_key(cid, sid, step, name)
        try:
            data = store.get_bytes(key)
        except KeyNotFound:
            raise CorruptStepError(f"{store.uri}: committed object {key!r} is missing") from None
        if verify and (len(data) != desc.get("size") or hashlib.sha256(data).hexdigest() != desc.get("sha256")):
            raise CorruptStepError(f"{store.uri}: {key!r} does not match its commit marker")
        out.files[name] = data
    return out


def step_dataset(
    store: Store, cid: str, sid: str, name: str = EDITS, *, steps: Iterable[int] | None = None
) -> ds.Dataset:
    """A ``pyarrow.dataset`` over one Parquet object of every committed step (or of ``steps``).

    Files are listed explicitly (never a directory scan: the folders also hold markers and
    safetensors) and without hive partitioning, so a ``step`` column in the files cannot clash with
    a partition key.
    """
    import pyarrow.dataset as ds

    chosen = committed_steps(store, cid, sid) if steps is None else sorted(steps)
    fs, paths = store.pyarrow_paths([step_object_key(cid, sid, s, name) for s in chosen])
    return ds.dataset(paths, filesystem=fs, format="parquet", partitioning=None)


# --- evaluation parts -----------------------------------------------------------------------------
def commit_eval_part(
    store: Store,
    cid: str,
    sid: str,
    step: int,
    suite: str,
    shard: int,
    data: Bytes | pa.Table,
    marker_payload: Mapping[str, Any] | None = None,
) -> bool:
    """Write an evaluation part (a Table or Parquet bytes), then its ``.done`` marker.

    False if the part was already committed (then nothing was written).
    """
    blob = encode_parquet(data) if isinstance(data, pa.Table) else data
    folder = eval_prefix(cid, sid, step, suite)
    part_name = f"{_shard(shard)}.parquet"
    ident = {"campaign": cid, "stream": sid, "step": step, "suite": suite, "shard": shard}
    # _write_then_mark reserves '.done' names for markers; the part name is a plain .parquet.
    return _write_then_mark(
        store,
        folder,
        eval_done_key(cid, sid, step, suite, shard),
        {part_name: blob},
        "eval",
        ident,
        marker_payload,
    )


def eval_parts_done(store: Store, cid: str, sid: str, step: int, suite: str, *, verify: Verify = "size") -> list[int]:
    """Sorted shard numbers of committed evaluation parts (same ``verify`` levels as committed_steps)."""
    folder = eval_prefix(cid, sid, step, suite)
    sizes = store.list_sizes(folder)
    shards: list[int] = []
    for key in sizes:
        m = _PART.match(key[len(folder) + 1 :])
        if m:
            shards.append(int(m.group(1)))
    shards.sort()
    if verify == "none":
        return shards
    done: list[int] = []
    for shard in shards:
        mkey = eval_done_key(cid, sid, step, suite, shard)
        try:
            marker = _read_marker(store, mkey)
        except CorruptStepError as exc:
            log.warning("ignoring %s: %s", mkey, exc)
            continue
        if marker is None:
            continue
        problem = _verify_objects(store, folder, marker, sizes, verify)
        if problem:
            log.warning("ignoring %s: %s", mkey, problem)
            continue
        done.append(shard)
    return done


def eval_part_keys(store: Store, cid: str, sid: str, step: int, suite: str) -> list[str]:
    """Keys of the committed Parquet parts of one (stream, step, suite)."""
    return [eval_part_key(cid, sid, step, suite, s) for s in eval_parts_done(store, cid, sid, step, suite)]


def eval_dataset(store: Store, cid: str, sid: str, step: int, suite: str) -> ds.Dataset:
    """A ``pyarrow.dataset`` over the committed parts of one (stream, step, suite)."""
    import pyarrow.dataset as ds

    fs, paths = store.pyarrow_paths(eval_part_keys(store, cid, sid, step, suite))
    return ds.dataset(paths, filesystem=fs, format="parquet", partitioning=None)
