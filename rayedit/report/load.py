"""Read what a report needs from a store: frozen spec, stream progress, edit rows and evaluation rows.

Only committed data is read: the edit rows of steps whose COMMITTED marker verifies
(``committed_steps``) and the evaluation parts whose ``.done`` marker verifies (``eval_parts_done``)
*of committed steps*. Everything goes through ``pyarrow.dataset`` over an explicit file list, so the
same code reads a local folder or an S3 prefix.

The frozen spec is parsed as plain YAML here rather than through ``rayedit.runtime`` (importing the
runtime pulls in torch and costs seconds; a report must render fast). The expected stream ids are
derived with the same rule as ``rayedit.runtime.spec.streams`` (tests check that they agree).
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import yaml

from rayedit.store import Store, committed_steps, eval_parts_done, sanitize_id
from rayedit.store.layout import (
    EDITS,
    eval_part_key,
    eval_prefix,
    list_streams,
    spec_key,
    step_object_key,
)

log = logging.getLogger(__name__)

#: columns that identify a row rather than measure something
ID_COLUMNS = frozenset({
    "campaign", "stream", "model", "method", "method_label", "dataset", "seed", "step", "batch", "suite",
    "protocol", "case_id", "record_index", "n_edited", "shard", "chat_template", "layers", "cond_method",
    "word_tokenizer", "edit_index", "record", "index", "scope", "keep_raw",
})


@dataclass
class StreamInfo:
    """One stream of a campaign and how far it has come (committed steps only)."""

    sid: str
    model: str
    method: str
    method_label: str
    dataset: str
    seed: int | None
    total_steps: int | None
    total_edits: int | None
    steps: list[int] = field(default_factory=list)  # committed, sorted
    edits_done: int = 0
    eval_steps: dict[str, list[int]] = field(default_factory=dict)  # suite -> steps with committed parts

    @property
    def done(self) -> bool:
        return self.total_steps is not None and len(self.steps) >= self.total_steps

    @property
    def status(self) -> str:
        if not self.steps:
            return "not started"
        return "finished" if self.done else "running"


@dataclass
class CampaignData:
    cid: str
    spec_text: str
    spec: dict[str, Any]
    streams: list[StreamInfo]
    edits: pd.DataFrame  # one row per edit (scalar columns + per-layer reductions)
    evals: pd.DataFrame  # one row per (record, protocol) of every committed evaluation part

    @property
    def finished(self) -> bool:
        return bool(self.streams) and all(s.done for s in self.streams)


# --- spec -----------------------------------------------------------------------------------------
def _variants(method: dict[str, Any]) -> list[str]:
    """Method labels, as ``MethodSpec.variants`` names them (one per grid combination)."""
    name = str(method.get("name"))
    grid = method.get("grid") or {}
    if not grid:
        return [name]
    import itertools

    keys = sorted(grid)
    return [name + "".join(f"-{k}={json.dumps(v)}" for k, v in zip(keys, combo, strict=True))
            for combo in itertools.product(*(grid[k] for k in keys))]


def _is_hub(source: str) -> bool:
    if source.startswith("hf://"):
        return True
    p = Path(source)
    return not p.exists() and not p.suffix and source.count("/") == 1 and not source.startswith((".", "/"))


def _dataset_label(d: dict[str, Any]) -> str:
    """``DatasetSpec.label``: the name, else the toy world's kind-seed, else the file stem / hub name."""
    if d.get("name"):
        return str(d["name"])
    path = d.get("path")
    if path is None:
        return f"{d.get('kind', 'requests')}-{d.get('toyworld_seed', 0)}"
    path = str(path)
    return path.rsplit("/", 1)[-1] if _is_hub(path) else Path(path).stem


def spec_totals(spec: dict[str, Any]) -> tuple[int | None, int | None]:
    """(steps, edits) of every stream of the spec (None when the spec lacks the numbers)."""
    try:
        edits = int(spec["edits_per_stream"])
        bs = edits if spec.get("mode") == "batch" else int(spec.get("batch_size", 1))
        ce = int(spec.get("checkpoint_every", 1))
    except (KeyError, TypeError, ValueError):
        return None, None
    return math.ceil(math.ceil(edits / bs) / ce), edits


def expected_streams(spec: dict[str, Any], spec_text: str | None = None) -> list[StreamInfo]:
    """The streams a spec defines, with their ids.

    When ``rayedit.runtime.spec`` is already imported (a report at the end of ``rayedit run``), its
    ``streams()`` is used; otherwise the same rule is applied to the plain YAML (importing the runtime
    would pull in torch). ``load_campaign`` falls back to the store's streams if the two ever disagree.
    """
    steps, edits = spec_totals(spec)
    runtime = sys.modules.get("rayedit.runtime.spec")
    if runtime is not None and spec_text:
        try:
            parsed = runtime.spec_from_yaml(spec_text)
            return [StreamInfo(s.sid, s.model, s.method, s.method_label, s.dataset, s.seed, steps, edits)
                    for s in runtime.streams(parsed)]
        except Exception as exc:  # a spec the current code no longer accepts: use the plain rule
            log.debug("runtime.spec could not parse the frozen spec (%s); using the plain YAML", exc)
    out: list[StreamInfo] = []
    for m in spec.get("models") or []:
        for meth in spec.get("methods") or []:
            for label in _variants(meth):
                for d in spec.get("datasets") or []:
                    for seed in spec.get("seeds") or [0]:
                        # the rule of specs frozen before stream ids were recorded
                        sid = sanitize_id(f"{m['name']}--{label}--{_dataset_label(d)}--s{seed}")
                        out.append(StreamInfo(sid, str(m["name"]), str(meth["name"]), label, _dataset_label(d),
                                              int(seed), steps, edits))
    ids = spec.get("stream_ids")
    if isinstance(ids, list) and len(ids) == len(out):  # recorded when the campaign was frozen
        for s, sid in zip(out, ids, strict=True):
            s.sid = str(sid)
    return out


# --- reading --------------------------------------------------------------------------------------
def _dataset(store: Store, keys: list[str]) -> ds.Dataset | None:
    """A dataset over Parquet objects whose schemas may differ a little (unified from the footers)."""
    if not keys:
        return None
    fs, paths = store.pyarrow_paths(keys)
    first = ds.dataset(paths, filesystem=fs, format="parquet", partitioning=None)
    schemas = [frag.physical_schema for frag in first.get_fragments()]
    try:
        schema = pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
        schema = pa.unify_schemas(schemas)
    return ds.dataset(paths, schema=schema, filesystem=fs, format="parquet", partitioning=None)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _scalar_column_names(schema: pa.Schema, keep_lists: tuple[str, ...] = ()) -> list[str]:
    """Scalar columns, plus list columns whose name ends with one of ``keep_lists``."""
    out = []
    for f in schema:
        t = f.type
        nested = _is_list(t) or pa.types.is_struct(t) or pa.types.is_map(t) or pa.types.is_binary(t)
        if not nested or (_is_list(t) and keep_lists and f.name.endswith(keep_lists)):
            out.append(f.name)
    return out


def _layer_reduce(values: Any, how: str) -> float:
    if values is None:
        return math.nan
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return math.nan
    if how == "min":
        return min(vals)
    if how == "max":
        return max(vals)
    return math.fsum(vals) / len(vals)


def read_edits(store: Store, cid: str, streams: list[StreamInfo]) -> pd.DataFrame:
    """Edit rows of every committed step of every stream; ``*_by_layer`` lists reduced to mean/min/max."""
    keys = [step_object_key(cid, s.sid, step, EDITS) for s in streams for step in s.steps]
    dset = _dataset(store, keys)
    if dset is None:
        return pd.DataFrame()
    cols = _scalar_column_names(dset.schema, keep_lists=("_by_layer",))
    tbl = dset.to_table(columns=cols)
    df = tbl.to_pandas()
    for col in [c for c in df.columns if c.endswith("_by_layer")]:
        base = col[: -len("_by_layer")]
        series = df[col]
        df[f"{base}__mean"] = [_layer_reduce(v, "mean") for v in series]
        df[f"{base}__min"] = [_layer_reduce(v, "min") for v in series]
        df[f"{base}__max"] = [_layer_reduce(v, "max") for v in series]
        df = df.drop(columns=[col])
    return df


_EVAL_PATH = re.compile(r"/streams/([^/]+)/eval/(\d{6,})/[^/]+/part-\d+\.parquet$")


def _eval_location(path: str) -> tuple[str, int]:
    m = _EVAL_PATH.search(path.replace("\\", "/"))
    if m is None:
        raise ValueError(f"not an evaluation part path: {path}")
    return m.group(1), int(m.group(2))


def _list_eval(store: Store, cid: str, s: StreamInfo) -> list[tuple[int, str, list[int]]]:
    """(step, suite, committed shards) for the committed steps of a stream that have evaluation parts."""
    out: list[tuple[int, str, list[int]]] = []
    for step in s.steps:
        for suite in store.list_children(eval_prefix(cid, s.sid, step)):
            if suite.startswith(".") or suite in AUDIT_SUITES:  # audits have their own section
                continue
            shards = eval_parts_done(store, cid, s.sid, step, suite)
            if shards:
                out.append((step, suite, shards))
    return out


def read_evals(store: Store, cid: str, streams: list[StreamInfo]) -> pd.DataFrame:
    """Evaluation rows of every committed part of every committed step (scalar columns only)."""
    started = [s for s in streams if s.steps]
    with ThreadPoolExecutor(max_workers=8) as pool:
        listed = list(pool.map(lambda s: _list_eval(store, cid, s), started))
    by_suite: dict[str, list[str]] = {}
    for s, parts in zip(started, listed, strict=True):
        for step, suite, shards in parts:
            s.eval_steps.setdefault(suite, []).append(step)
            by_suite.setdefault(suite, []).extend(eval_part_key(cid, s.sid, step, suite, sh) for sh in shards)
    frames = []
    for suite, keys in sorted(by_suite.items()):
        dset = _dataset(store, keys)
        assert dset is not None
        df = dset.to_table(columns=[*_scalar_column_names(dset.schema), "__filename"]).to_pandas()
        # The key is the truth about stream, step and suite, whatever a row says.
        where = df.pop("__filename").map(_eval_location)
        df["stream"] = [w[0] for w in where]
        df["step"] = [w[1] for w in where]
        df["suite"] = suite
        for col in df.columns:  # success flags → 0/1, so they stay numeric next to other suites' NaN
            if pd.api.types.is_bool_dtype(df[col]):
                df[col] = df[col].astype(float)
        frames.append(df)
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, ignore_index=True, sort=False)


AUDIT_SUITES = frozenset({"general", "uncertainty", "safety", "shift"})  # rayedit.report.audit reads these


def _is_unedited(sid: str) -> bool:
    import re

    return re.search(r"--unedited(-[0-9a-f]{8})?$", sid) is not None


def load_campaign(store: Store, cid: str) -> CampaignData:
    """Spec, streams (expected and present) with progress, and the committed rows of a campaign."""
    key = spec_key(cid)
    spec_text = store.get_bytes(key).decode() if store.exists(key) else ""
    try:
        spec = yaml.safe_load(spec_text) if spec_text else {}
    except yaml.YAMLError as exc:
        log.warning("%s: spec is not valid YAML (%s); reporting without it", key, exc)
        spec = {}
    spec = spec if isinstance(spec, dict) else {}
    expected = {s.sid: s for s in expected_streams(spec, spec_text)}
    # the unedited model's audit pseudo-streams belong to the audit section (rayedit.report.audit)
    present = [sid for sid in list_streams(store, cid) if not _is_unedited(sid)]
    steps_total, edits_total = spec_totals(spec)
    unknown = [sid for sid in present if sid not in expected]
    if unknown:
        # The store has streams the spec rule does not name (a rule that moved on, a hand-edited spec):
        # report what the store holds, identified from its rows, rather than guess which are missing.
        log.warning("%s: %d stream(s) in the store are not derived from the spec; reporting the store's streams",
                    cid, len(unknown))
        streams = [expected.get(sid) or StreamInfo(sid, "?", "?", "?", "?", None, steps_total, edits_total)
                   for sid in present]
    else:
        streams = list(expected.values())
    present_set = set(present)
    todo = [s for s in streams if s.sid in present_set]
    with ThreadPoolExecutor(max_workers=8) as pool:
        for s, steps in zip(todo, pool.map(lambda s: committed_steps(store, cid, s.sid), todo), strict=True):
            s.steps = steps
    edits = read_edits(store, cid, streams)
    if not edits.empty:
        counts = edits.groupby("stream").size().to_dict()
        first = edits.drop_duplicates("stream").set_index("stream")
        for s in streams:
            s.edits_done = int(counts.get(s.sid, 0))
            if s.model == "?" and s.sid in first.index:
                row = first.loc[s.sid]
                s.model, s.method = str(row.get("model", "?")), str(row.get("method", "?"))
                s.method_label = str(row.get("method_label", s.method))
                s.dataset = str(row.get("dataset", "?"))
                s.seed = int(row["seed"]) if "seed" in row and pd.notna(row["seed"]) else None
    evals = read_evals(store, cid, streams)
    if not evals.empty:
        info = {s.sid: s for s in streams}
        if "protocol" not in evals.columns:
            evals["protocol"] = evals["suite"]
        evals["protocol"] = evals["protocol"].fillna(evals["suite"]).astype(str)
        # The stream's own identity wins over whatever columns the evaluation rows carry.
        for col, attr in (("model", "model"), ("method_label", "method_label"), ("dataset", "dataset")):
            evals[col] = [getattr(info[sid], attr) if sid in info else v
                          for sid, v in zip(evals["stream"], evals.get(col, pd.Series([None] * len(evals))),
                                            strict=True)]
    return CampaignData(cid, spec_text, spec, streams, edits, evals)
