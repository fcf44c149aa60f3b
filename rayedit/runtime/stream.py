"""Running one stream on one loaded model: edit, commit, resume (no Ray here; the actor wraps it).

A committed step holds ``delta.safetensors`` — the current values of every tensor the stream has
touched plus the editor state under ``state.`` (so a resume needs only the last committed step) —
and ``edits.parquet`` with one row per request. Each batch reseeds torch from (seed, batch), so an
interrupted-and-resumed stream is bitwise equal to an uninterrupted one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import torch

from rayedit.data.requests import EditRequest
from rayedit.editing import Editor, apply_weights
from rayedit.faults import fault_point
from rayedit.models.gguf import source_label
from rayedit.runtime.checkpoint import KEYS, LAYOUT_META, StateCodec
from rayedit.store import Store, StoreBlobCache, commit_step, read_committed_step
from rayedit.store.formats import encode_parquet, encode_tensors
from rayedit.store.layout import DELTA, EDITS, last_committed_step

log = logging.getLogger(__name__)

STATE_PREFIX = "state."
# Where a step or shard ran (set by the replica actor from Ray's runtime context; empty off Ray). They
# differ between two runs of the same campaign, like the timings, so result comparisons drop them.
PLACEMENT_COLUMNS = ("node_id", "node_ip")
VOLATILE_COLUMNS = ("seconds", "peak_memory_mb", *PLACEMENT_COLUMNS)


def placement() -> dict[str, Any]:
    """Where this process's model goes: the GPUs Ray gave the actor (CUDA_VISIBLE_DEVICES), else CPU.
    One GPU: the whole model on it; several: sharded across them with ``device_map="auto"``."""
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n > 1:
        return {"device_map": "auto"}
    return {"device": "cuda"} if n == 1 else {}


def load_lm(name: str, dtype: str = "float32", attn_implementation: str | None = None):
    """``tiny:<family>`` builds a random tiny model offline; anything else goes to ``load_model``."""
    from rayedit.models import build_tiny_model, load_model
    from rayedit.runtime.spec import model_path

    where = placement()
    if name.startswith("tiny:"):
        lm = build_tiny_model(name.split(":", 1)[1])
        if where.get("device"):
            lm.model.to(where["device"])
        return lm
    return load_model(model_path(name), dtype=dtype, attn_implementation=attn_implementation, **where)


@dataclass
class StreamJob:
    """Everything a replica needs to run a stream (plain data: it crosses the Ray boundary)."""

    cid: str
    sid: str
    model: str
    method: str
    method_label: str
    hparams: dict[str, Any]
    dataset: str
    seed: int
    mode: str
    batch_size: int
    checkpoint_every: int
    stats_corpus: str
    requests: list[dict[str, Any]] = field(default_factory=list)

    @property
    def n_batches(self) -> int:
        return -(-len(self.requests) // self.batch_size)

    @property
    def n_steps(self) -> int:
        return -(-self.n_batches // self.checkpoint_every)


@dataclass
class StepReport:
    sid: str
    step: int
    n_steps: int
    edits: int
    committed: bool
    seconds: float
    mean_target_nll: float | None
    max_weight_growth: float | None = None  # max over the step's edited matrices of ‖W_t‖_F / ‖W_0‖_F
    max_condition_number: float | None = None


class StreamRunner:
    """Owns one loaded model and its pristine copies of edited tensors; runs streams one at a time."""

    def __init__(self, lm, store: Store) -> None:
        self.lm = lm
        self.store = store
        self.cache = StoreBlobCache(store)  # statistics computed once per (model, layer, corpus), shared
        self.base: dict[str, torch.Tensor] = {}  # pristine values of every tensor any stream touched
        self.job: StreamJob | None = None
        self.editor: Editor | None = None
        self.next_step = 0
        self._fresh_state: tuple[dict[str, torch.Tensor], dict[str, str]] | None = None
        self._weights_cache: tuple[tuple[str, str, int], dict[str, torch.Tensor]] | None = None
        self._loc_cache: Any = None
        self._base_fro: dict[int, float] = {}
        self.where: dict[str, str] = dict.fromkeys(PLACEMENT_COLUMNS, "")  # the Ray node this replica runs on

    # -- evaluation support: swap a committed step's tensors in and out ---------------------------------
    def step_weights(self, cid: str, sid: str, step: int) -> dict[str, torch.Tensor]:
        """The edited tensors of a committed step (editor state dropped); the last one read is kept."""
        key = (cid, sid, step)
        if self._weights_cache is None or self._weights_cache[0] != key:
            tensors, _ = read_committed_step(self.store, cid, sid, step, [DELTA]).tensors(DELTA)
            self._weights_cache = (key, {k: v for k, v in tensors.items() if not k.startswith(STATE_PREFIX)})
        return self._weights_cache[1]

    def snapshot(self) -> dict[str, torch.Tensor]:
        """Current values of every tensor any stream has touched on this replica."""
        params = dict(self.lm.model.named_parameters())
        return {k: params[k].detach().clone().cpu() for k in self.base}

    def checkout(self, weights: dict[str, torch.Tensor]) -> None:
        """Base weights everywhere, then ``weights`` on top (a step's deltas are cumulative)."""
        params = dict(self.lm.model.named_parameters())
        for k in weights:  # never touched on this replica, so its current value is the pristine one
            if k not in self.base:
                self.base[k] = params[k].detach().clone().cpu()
        self._restore_base()
        apply_weights(self.lm, weights)

    def locality_cache(self, records: list[Any], weights: dict[str, torch.Tensor]) -> Any:
        """EasyEdit's pre-edit predictions for ``records``, computed on the base weights, then ``weights`` back."""
        from rayedit.evaluate import prepare_locality_cache

        self._restore_base()
        try:
            self._loc_cache = prepare_locality_cache(self.lm, records, self._loc_cache)
        finally:
            apply_weights(self.lm, weights)
        return self._loc_cache

    # -- stream switching ----------------------------------------------------------------------------
    def _restore_base(self) -> None:
        if self.base:
            apply_weights(self.lm, self.base)

    def _remember_base(self, editor: Editor) -> None:
        ad = self.lm.adapter
        for layer in editor.hp.layers:
            name = ad.weight_name(layer)
            if name not in self.base:
                self.base[name] = ad.weight_param(layer).detach().clone().cpu()

    def open(self, job: StreamJob) -> int:
        """Start (or resume) ``job``; returns the next step to run (== n_steps when already done)."""
        self._restore_base()
        self.job = job
        self.editor = Editor(self.lm, job.method, job.hparams, stats_cache=self.cache, stats_corpus=job.stats_corpus)
        self._remember_base(self.editor)
        self._fresh_state = None
        # 'single' resets the state every edit: nothing accumulates, so C_p is never rebuilt from keys
        self.codec = StateCodec(self.store, job.cid, job.sid, use_keys=job.mode != "single")
        last = last_committed_step(self.store, job.cid, job.sid)
        self.next_step = 0 if last is None else last + 1
        if last is not None and self.next_step < job.n_steps:
            tensors, meta = read_committed_step(self.store, job.cid, job.sid, last, [DELTA]).tensors(DELTA)
            weights = {k: v for k, v in tensors.items() if not k.startswith(STATE_PREFIX)}
            state = {k[len(STATE_PREFIX):]: v for k, v in tensors.items() if k.startswith(STATE_PREFIX)}
            if job.mode != "single":  # 'single' edits always start from the base model
                apply_weights(self.lm, weights)
                state = self.codec.decode(last, state, meta)
                self.editor.load_state_dict(state, meta, origin=f"{job.sid} step {last}")
        return self.next_step

    # -- one step --------------------------------------------------------------------------------------
    def _batch(self, b: int) -> list[EditRequest]:
        assert self.job is not None
        chunk = self.job.requests[b * self.job.batch_size:(b + 1) * self.job.batch_size]
        return [EditRequest.model_validate(r) for r in chunk]

    def _reset_for_single(self) -> None:
        """Mode 'single': every edit is applied to the unedited model with a fresh editor state."""
        assert self.editor is not None
        if self._fresh_state is None:
            self.editor.prepare()
            tensors, meta = self.editor.state_dict()
            self._fresh_state = ({k: v.clone() for k, v in tensors.items()}, dict(meta))
        self._restore_base()
        self.editor.load_state_dict(*self._fresh_state)

    def step(self) -> StepReport:
        """Run the next step (``checkpoint_every`` batches) and commit it, marker last."""
        job, editor = self.job, self.editor
        assert job is not None and editor is not None, "open() a stream first"
        step = self.next_step
        if step >= job.n_steps:
            raise RuntimeError(f"stream {job.sid} is complete ({job.n_steps} steps)")
        t0 = time.perf_counter()
        rows: list[dict[str, Any]] = []
        batch_keys: list[tuple[int, dict[int, torch.Tensor]]] = []
        first = step * job.checkpoint_every
        if step == 0 and job.mode != "single":  # C_p as the stream starts (SAME seeds it with safety keys)
            editor.prepare()
            self.codec.start(editor.state_dict()[0])
        for b in range(first, min(first + job.checkpoint_every, job.n_batches)):
            if job.mode == "single":
                self._reset_for_single()
            # Reseed per batch: the target optimisation must not depend on how many batches this
            # process has run before (resume = uninterrupted, bitwise).
            torch.manual_seed(job.seed * 1_000_003 + b)
            res = editor.apply(self._batch(b))
            batch_keys.append((b, res.cache_keys))
            fault_point("editing")  # fault matrix (rayedit/faults.py): inside a step, before its commit
            diag = layer_columns(res)
            growth = self._weight_growth(res.layers, diag.get("weight_fro_by_layer"))
            if growth is not None:
                diag["weight_growth_by_layer"] = growth
            for r in res.rows:
                rows.append({"campaign": job.cid, "stream": job.sid, "model": job.model, "method": job.method,
                             "method_label": job.method_label, "dataset": job.dataset, "seed": job.seed,
                             "step": step, "batch": b, "layers": list(res.layers), **r,
                             "case_id": str(r.get("case_id")), "seconds": res.seconds, **diag,
                             "peak_memory_mb": peak_memory_mb(), **self.where,
                             "model_source": source_label(getattr(self.lm, "source", None))})
        tensors = editor.edited_weights()
        state, meta = editor.state_dict()
        inline, keys, layout = self.codec.encode(step, state, batch_keys)  # big state → blobs, C_p → keys
        tensors |= {STATE_PREFIX + k: v for k, v in inline.items()}
        files = {DELTA: encode_tensors(tensors, meta | {LAYOUT_META: layout}),
                 EDITS: encode_parquet(pa.Table.from_pylist(rows))}
        if keys:
            files[KEYS] = encode_tensors(keys)
        committed = commit_step(self.store, job.cid, job.sid, step, files,
                                {"edits": len(rows), "mode": job.mode, "batches": sorted({r["batch"] for r in rows})})
        if not committed:
            log.warning("%s step %d was already committed by another writer; keeping theirs", job.sid, step)
        fault_point("step-committed")  # fault matrix: committed, the driver not told yet
        self.next_step = step + 1
        nll = [float(r["target_nll"]) for r in rows if r.get("target_nll") is not None]
        return StepReport(job.sid, step, job.n_steps, len(rows), committed, time.perf_counter() - t0,
                          sum(nll) / len(nll) if nll else None,
                          _max_of(rows, "weight_growth_by_layer"), _max_of(rows, "weight_cond_by_layer"))

    def committed_report(self, step: int) -> StepReport:
        """The report of a step that is already committed (the actor died after its commit and Ray retried
        the call): read back from its ``edits.parquet``, so the driver still plans its evaluation and
        health checks, and the step is never run twice."""
        job = self.job
        assert job is not None, "open() a stream first"
        rows = read_committed_step(self.store, job.cid, job.sid, step, [EDITS]).table(EDITS).to_pylist()
        nll = [float(r["target_nll"]) for r in rows if r.get("target_nll") is not None]
        return StepReport(job.sid, step, job.n_steps, len(rows), False, 0.0, sum(nll) / len(nll) if nll else None,
                          _max_of(rows, "weight_growth_by_layer"), _max_of(rows, "weight_cond_by_layer"))

    def _weight_growth(self, layers: list[int], fro: list[float | None] | None) -> list[float | None] | None:
        """‖W_t‖_F / ‖W_0‖_F per edited layer, against this replica's pristine copy (health bounds)."""
        if not fro:
            return None
        ad = self.lm.adapter
        out: list[float | None] = []
        for layer, f in zip(layers, fro, strict=True):
            base = self.base.get(ad.weight_name(layer))
            if f is None or base is None:
                out.append(None)
                continue
            if layer not in self._base_fro:
                self._base_fro[layer] = float(base.float().norm())
            out.append(f / self._base_fro[layer] if self._base_fro[layer] > 0 else None)
        return out


def _max_of(rows: list[dict[str, Any]], column: str) -> float | None:
    vals = [v for r in rows for v in (r.get(column) or []) if v is not None]
    return max(vals) if vals else None


DIAG_KEYS = ("weight_fro", "weight_cond", "weight_sigma_max", "weight_sigma_min", "update_fro", "resid_norm",
             "key_norm_mean", "nullspace_rank", "nullspace_energy")


def layer_columns(res) -> dict[str, Any]:
    """Per-layer stability diagnostics as list columns aligned with ``layers`` (one value per edited layer)."""
    by_layer: dict[int, dict] = {}
    for row in res.layer_rows:
        if "layer" in row:
            by_layer.setdefault(int(row["layer"]), {}).update(row)
    out: dict[str, Any] = {}
    for key in DIAG_KEYS:
        vals = [by_layer.get(layer, {}).get(key) for layer in res.layers]
        if any(v is not None for v in vals):
            out[f"{key}_by_layer"] = [None if v is None else float(v) for v in vals]
    methods = {row.get("cond_method") for row in res.layer_rows if row.get("cond_method")}
    if methods:
        out["cond_method"] = sorted(methods)[0]
    return out


def peak_memory_mb() -> float:
    """Peak accelerator memory if CUDA is in use, else the process's peak RSS."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
