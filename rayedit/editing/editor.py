"""The editor: one method applied batch after batch to one model, with its stream state.

``Editor.apply`` mutates the model in place and returns the new values and deltas of the touched
tensors. State carried between batches (context templates, AlphaEdit's ``C_p`` and projections, fp32
master copies of low-precision weights, counters) lives in :class:`EditorState`, never in globals
(pitfall §10.6), and round-trips through safetensors.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..data.requests import EditRequest
from .covariance import BlobCache, CovarianceStats, StatsSettings, load_covariance_file
from .diagnostics import COND_METHOD, matrix_stability
from .hparams import _Base, resolve_hparams
from .solvers import SOLVERS, Solver
from .targets import Targets
from .templates import generate_templates

log = logging.getLogger(__name__)
STATE_FORMAT = "rayedit-editor-state/v1"
LOCATION_HPARAMS = ("safety_malicious", "safety_benign")  # file locations, not values of the method


class EditRejected(RuntimeError):
    """An edit produced non-finite weights; the model was restored to its state before the batch."""


@dataclass
class EditorState:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    templates: dict[str, list[list[str]]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    n_batches: int = 0
    n_edits: int = 0
    touched_layers: list[int] = field(default_factory=list)


@dataclass
class BatchResult:
    method: str
    layers: list[int]
    weights: dict[str, torch.Tensor]  # state-dict name → new value (storage orientation, model dtype)
    deltas: dict[str, torch.Tensor]  # state-dict name → new − old (storage orientation, fp32)
    rows: list[dict]  # one per request
    layer_rows: list[dict]
    seconds: float
    target_steps: int = 0
    cache_keys: dict[int, torch.Tensor] = field(default_factory=dict)
    targets: Targets | None = None  # z / v*, h0 per request (None for FT)


class Editor:
    """Apply ``method`` to ``lm`` sequentially. ``hparams``: overrides (dict) or a resolved hparams object."""

    def __init__(self, lm, method: str, hparams: dict | _Base | None = None, *, stats: CovarianceStats | None = None,
                 stats_cache: BlobCache | None = None, stats_corpus: str | None = None,
                 progress: bool = False, diagnostics: bool = True,
                 safety_prompts: tuple[Sequence[str], Sequence[str]] | None = None) -> None:
        if method not in SOLVERS:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(sorted(SOLVERS))}")
        self.lm = lm
        self.hp = hparams if isinstance(hparams, _Base) else resolve_hparams(
            method, lm.name, lm.adapter.n_layers, hparams, d_ff=lm.adapter.d_ff, model_type=lm.adapter.model_type)
        self.method = method
        self.diagnostics = diagnostics  # per-layer norm/condition rows after every batch (§8)
        self._safety_prompts = safety_prompts
        self.state = EditorState()
        self._stats = stats
        self._file_stats: dict[int, torch.Tensor] = {}
        self._stats_cache = stats_cache
        self._stats_corpus = stats_corpus
        self._progress = progress
        self.solver: Solver = SOLVERS[method](self)
        self._prepared = False
        self._snapshot: dict[int, tuple[torch.Tensor, torch.Tensor | None]] | None = None

    # -- statistics ------------------------------------------------------------------------------
    @property
    def stats(self) -> CovarianceStats:
        if self._stats is None:
            hp = self.hp
            settings = StatsSettings(n_samples=hp.mom2_n_samples, dtype=hp.mom2_dtype, max_len=hp.mom2_max_len,
                                     max_tokens=hp.mom2_max_tokens, seed=hp.mom2_seed,
                                     exclude_bos=hp.exclude_bos_from_stats)
            # statistics always belong to the pre-edit weights of the stream (recorded at first prepare)
            self._stats = CovarianceStats(self.lm, self._stats_corpus or hp.mom2_dataset, settings,
                                          cache=self._stats_cache, progress=self._progress,
                                          fingerprint=self.base_fingerprint)
        return self._stats

    @property
    def base_fingerprint(self) -> str:
        if "base_fingerprint" not in self.state.info:
            if self.state.n_batches:
                raise RuntimeError("editor state has edits but no base fingerprint")
            self.state.info["base_fingerprint"] = self.lm.fingerprint
        return self.state.info["base_fingerprint"]

    def covariances(self, layers: Sequence[int]) -> None:
        if getattr(self.hp, "covariance_file", None):
            for layer in layers:
                self.covariance(layer)
            return
        self.stats.second_moments(layers)

    def covariance(self, layer: int) -> torch.Tensor:
        path = getattr(self.hp, "covariance_file", None)
        if path:  # handed in (fixed inputs for comparisons): never computed, never cached
            if layer not in self._file_stats:
                sm = load_covariance_file(path, layer)
                self._file_stats[layer] = sm.covariance
                self.state.info[f"covariance_file.{layer}"] = {**sm.provenance, "count": sm.count}
            return self._file_stats[layer]
        return self.stats.covariance(layer)

    def safety_prompts(self) -> tuple[list[str], list[str]]:
        """(malicious, benign) instructions for SAME: given to the constructor, or files from hparams."""
        hp = self.hp
        if self._safety_prompts is not None:
            mal, ben = self._safety_prompts
        else:
            if not getattr(hp, "safety_malicious", None):
                raise ValueError("SAME needs malicious prompts: set safety_malicious (a JSONL with 'prompt') "
                                 "or pass safety_prompts=")
            mal = _read_prompts(hp.safety_malicious)
            ben = _read_prompts(hp.safety_benign)
        return list(mal)[: hp.n_mal], list(ben)[: hp.n_ben]

    # -- templates -------------------------------------------------------------------------------
    def templates(self, style: str) -> list[list[str]]:
        if style not in self.state.templates:
            fixed = getattr(self.hp, "context_templates", None)
            self.state.templates[style] = [list(g) for g in fixed] if fixed else generate_templates(
                self.lm, style, seed=self.hp.template_seed)
        return self.state.templates[style]

    def prepare(self) -> None:
        """Per-stream work on the pre-edit model: templates, statistics, projections."""
        if self._prepared:
            return
        _ = self.base_fingerprint  # record the pre-edit identity before anything changes
        if self.solver.template_style:
            self.templates(self.solver.template_style)
        self.solver.prepare()
        self._prepared = True

    # -- weights ---------------------------------------------------------------------------------
    def add_delta(self, layer: int, delta: torch.Tensor) -> None:
        """``W ← W + Δ`` (math orientation). Low-precision weights get the update through an fp32 master
        copy (§9); a non-finite result is refused and the whole batch rolled back."""
        ad = self.lm.adapter
        assert self._snapshot is not None, "add_delta outside a batch"
        param = ad.weight_param(layer)
        if layer not in self._snapshot:
            master = self.state.tensors.get(f"master.{layer}")
            self._snapshot[layer] = (param.detach().clone(), None if master is None else master.clone())
        if not bool(torch.isfinite(delta).all()):
            raise EditRejected(f"layer {layer}: the update contains NaN/Inf")
        if param.dtype == torch.float32:
            new = ad.get_weight(layer) + delta.to(param.device)
        else:
            key = f"master.{layer}"
            if key not in self.state.tensors:
                self.state.tensors[key] = ad.get_weight(layer).cpu()
            self.state.tensors[key] = self.state.tensors[key] + delta.cpu()
            new = self.state.tensors[key]
        if not bool(torch.isfinite(new).all()):
            raise EditRejected(f"layer {layer}: the edited weight contains NaN/Inf")
        ad.set_weight(layer, new)
        if not bool(torch.isfinite(param).all()):
            raise EditRejected(f"layer {layer}: the edited weight overflows {param.dtype}")

    def _rollback(self) -> None:
        assert self._snapshot is not None
        with torch.no_grad():
            for layer, (w, master) in self._snapshot.items():
                self.lm.adapter.weight_param(layer).copy_(w)
                if master is None:
                    self.state.tensors.pop(f"master.{layer}", None)
                else:
                    self.state.tensors[f"master.{layer}"] = master

    # -- the batch -------------------------------------------------------------------------------
    def apply(self, requests: Sequence[EditRequest]) -> BatchResult:
        """Edit the model in place with one batch of requests."""
        if not requests:
            raise ValueError("empty batch of requests")
        ids = [r.case_id for r in requests]
        if len(set(ids)) != len(ids):
            raise ValueError("duplicate case_id in one batch")
        self.prepare()
        t0 = time.perf_counter()
        self._snapshot = {}
        saved_state = {k: v for k, v in self.state.tensors.items() if k.startswith("cache_c.")}
        try:
            out = self.solver.edit_batch(list(requests))
        except EditRejected:
            self._rollback()
            self.state.tensors.update(saved_state)
            log.error("edit rejected (non-finite weights); weights restored to the state before the batch")
            raise
        finally:
            snapshot, self._snapshot = self._snapshot, None
        ad = self.lm.adapter
        weights, deltas = {}, {}
        for layer, (old, _m) in sorted(snapshot.items()):
            name = ad.weight_name(layer)
            new = ad.weight_param(layer).detach()
            weights[name] = new.clone().cpu()
            deltas[name] = (new.float() - old.float()).cpu()
            if layer not in self.state.touched_layers:
                self.state.touched_layers.append(layer)
        self.state.n_batches += 1
        self.state.n_edits += len(requests)
        targets = out.get("targets")
        rows = out.get("rows") or (targets.rows if targets is not None else [{"case_id": i} for i in ids])
        if self.diagnostics:
            by_layer = {r["layer"]: r for r in out.get("layer_rows", []) if "layer" in r}
            for layer in sorted(snapshot):
                row = by_layer.get(layer)
                if row is None:
                    row = {"layer": layer}
                    out.setdefault("layer_rows", []).append(row)
                row.update(matrix_stability(ad.get_weight(layer)))
                row["update_fro"] = float(deltas[ad.weight_name(layer)].norm())
                row["cond_method"] = COND_METHOD
        return BatchResult(method=self.method, layers=out.get("layers", list(self.hp.layers)), weights=weights,
                           deltas=deltas,
                           rows=rows, layer_rows=out.get("layer_rows", []),
                           seconds=time.perf_counter() - t0,
                           target_steps=targets.steps_run if targets is not None else out.get("steps", 0),
                           cache_keys=out.get("cache_keys", {}), targets=targets)

    # -- persistence -----------------------------------------------------------------------------
    def edited_weights(self) -> dict[str, torch.Tensor]:
        """Current values of every tensor this editor has touched (storage orientation)."""
        ad = self.lm.adapter
        return {ad.weight_name(layer): ad.weight_param(layer).detach().clone().cpu()
                for layer in sorted(self.state.touched_layers)}

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        st = self.state
        meta = {
            "format": STATE_FORMAT,
            "method": self.method,
            "hparams": self.hp.model_dump_json(),
            "templates": json.dumps(st.templates),
            "info": json.dumps(st.info),
            "n_batches": str(st.n_batches),
            "n_edits": str(st.n_edits),
            "touched_layers": json.dumps(st.touched_layers),
        }
        return {k: v.contiguous() for k, v in st.tensors.items()}, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, str], origin: str = "state") -> None:
        if meta.get("format") != STATE_FORMAT:
            raise ValueError(f"{origin}: not a rayedit editor state (format {meta.get('format')!r})")
        if meta.get("method") != self.method:
            raise ValueError(f"{origin}: state of method {meta.get('method')!r} cannot resume {self.method!r}")
        # where SAME's prompt files live may differ between machines; their content is pinned by the
        # state's same_prompts_sha256, so only the other hyperparameters must match
        saved, now = json.loads(meta["hparams"]), json.loads(self.hp.model_dump_json())
        # value_sources says where values came from, not what they are; a field newer than the saved state
        # matches when it holds its default (the behaviour the state was made with)
        defaults = json.loads(type(self.hp)().model_dump_json()) if "method" in saved else {}
        skip = (*LOCATION_HPARAMS, "value_sources")
        diff = sorted(k for k in set(saved) | set(now) if k not in skip
                      and saved.get(k, defaults.get(k)) != now.get(k, defaults.get(k)))
        if diff:
            raise ValueError(f"{origin}: hyperparameters differ from the saved editor state ({', '.join(diff)})")
        self.state = EditorState(tensors=dict(tensors), templates=json.loads(meta["templates"]),
                                 info=json.loads(meta["info"]), n_batches=int(meta["n_batches"]),
                                 n_edits=int(meta["n_edits"]), touched_layers=json.loads(meta["touched_layers"]))
        self._stats = None  # rebind statistics to the stream's base fingerprint
        self._prepared = False

    def save_state(self, path: str | Path) -> None:
        tensors, meta = self.state_dict()
        save_file(tensors, str(path), metadata=meta)

    def load_state(self, path: str | Path) -> None:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        self.load_state_dict(load_file(str(path)), meta, origin=str(path))


def _read_prompts(source: str) -> list[str]:
    """Prompts from ``builtin:general`` or a JSONL (``prompt`` or ``text`` field) / text file (one per line)."""
    if source == "builtin:general":
        from ..models.tiny import builtin_texts

        return builtin_texts()[::7]  # a spread of ordinary sentences, not one source file's first rows
    path = toyworld_prompt_file(source) or Path(source)
    if not path.is_file():
        raise ValueError(f"safety prompt file not found: {source}")
    if path.suffix == ".jsonl":
        out = []
        for i, line in enumerate(path.read_text().splitlines()):
            if not line.strip():
                continue
            rec = json.loads(line)
            text = rec.get("prompt", rec.get("text")) if isinstance(rec, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{source}: record {i}: field prompt: missing or empty")
            out.append(text)
        return out
    return [ln for ln in path.read_text().splitlines() if ln.strip()]


TOYWORLD_PROMPTS = {"malicious": "malicious_train.jsonl", "benign": "benign.jsonl"}


def toyworld_prompt_file(source: str) -> Path | None:
    """``toyworld:<seed>:malicious|benign`` → the toy world's SAME prompt file (None for other sources).

    SAME's safety directions come from the world's *training* refusal queries; its held-out
    ``malicious_eval.jsonl`` stays for the safety audit."""
    parts = source.split(":")
    if len(parts) != 3 or parts[0] != "toyworld":
        return None
    if not parts[1].isdigit() or parts[2] not in TOYWORLD_PROMPTS:
        raise ValueError(f"safety prompts {source!r}: expected toyworld:<seed>:malicious or toyworld:<seed>:benign")
    from ..data.toyworld import ensure_toyworld

    return ensure_toyworld(seed=int(parts[1])).root / TOYWORLD_PROMPTS[parts[2]]


def apply_weights(lm, weights: dict[str, torch.Tensor]) -> None:
    """Copy tensors (state-dict names, storage orientation) into the model: checkpoints and stream switches."""
    params = dict(lm.model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            if name not in params:
                raise KeyError(f"checkpoint tensor {name!r} is not a parameter of this model")
            p = params[name]
            if tuple(p.shape) != tuple(value.shape):
                raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(value.shape)}, model {tuple(p.shape)}")
            p.copy_(value.to(device=p.device, dtype=p.dtype))


def edit(lm, requests: Sequence[EditRequest], method: str = "memit", hparams: dict | None = None,
         **kwargs: Any) -> BatchResult:
    """One-shot library entry point: ``from rayedit.editing import edit``."""
    return Editor(lm, method, hparams, **kwargs).apply(requests)
