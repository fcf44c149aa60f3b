"""Layer scans: edit one fixed sample of facts at each candidate layer window and measure the result.

For every candidate the model starts from its base weights, a fresh :class:`~rayedit.editing.Editor` of
the method edits the sample with the candidate's layers (``layers`` override; everything else from the
method's defaults/preset/rule plus the given overrides), and ``counterfact-prob/v1``
(:func:`rayedit.evaluate.evaluate_records`) scores efficacy, paraphrase generalisation and
neighbourhood specificity on the edited facts. The step diagnostics of the edit (target NLL, ‖δ‖,
optimisation steps, per-layer update norm and condition number) are kept beside the metrics.
Candidates are ranked by a stated objective (``rayedit.locate.objectives``).

No Ray, no boto3: the runtime hands one candidate per call to a replica that holds the model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..editing import Editor, apply_weights
from ..evaluate import evaluate_records
from .objectives import DEFAULT_OBJECTIVE, get_objective

SCAN_FORMAT = "rayedit-scan/v1"
METRICS = ("efficacy_success", "paraphrase_success", "neighborhood_success")
#: methods that edit one request at a time
SINGLE_REQUEST = frozenset({"rome", "mose_oft"})


@dataclass(frozen=True)
class Candidate:
    layers: tuple[int, ...]

    @property
    def label(self) -> str:
        ls = sorted(self.layers)
        if len(ls) > 1 and ls == list(range(ls[0], ls[-1] + 1)):
            return f"L{ls[0]}-{ls[-1]}"
        return "L" + ",".join(str(x) for x in ls)

    @classmethod
    def parse(cls, text: str) -> Candidate:
        """``"1-2"`` (a range), ``"3"`` or ``"1,3"``."""
        text = text.strip().removeprefix("L")
        try:
            if "-" in text:
                a, b = (int(x) for x in text.split("-", 1))
                layers = tuple(range(a, b + 1))
            else:
                layers = tuple(int(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise ValueError(f"bad layer window {text!r}: use '1-2', '3' or '1,3'") from None
        if not layers:
            raise ValueError(f"bad layer window {text!r}: no layers")
        return cls(layers)


def candidate_windows(n_layers: int, width: int, *, include_last_layer: bool = True,
                      extra: Iterable[Sequence[int]] = ()) -> list[Candidate]:
    """Every window of ``width`` consecutive layers below the last layer, the last layer alone (the
    baseline a trace argues against), and any ``extra`` windows (e.g. the trace's suggestion)."""
    width = max(1, min(width, n_layers - 1)) if n_layers > 1 else 1
    out = [Candidate(tuple(range(s, s + width))) for s in range(0, max(1, n_layers - width))]
    if include_last_layer:
        out.append(Candidate((n_layers - 1,)))
    for layers in extra:
        out.append(Candidate(tuple(sorted(layers))))
    return list(dict.fromkeys(out))


@dataclass(frozen=True)
class ScanSettings:
    method: str = "memit"
    hparams: Mapping[str, Any] = field(default_factory=dict)  # overrides besides ``layers``
    batch_size: int | None = None  # None: the whole sample in one batch (one request at a time for ROME)
    seed: int = 0
    stats_corpus: str | None = None
    model_name: str | None = None  # the name hparams presets are matched on (default: the model's own)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "hparams": dict(self.hparams), "batch_size": self.batch_size,
                "seed": self.seed, "stats_corpus": self.stats_corpus, "model_name": self.model_name}


def _edited_weights_backup(lm, layers: Iterable[int]) -> dict[str, torch.Tensor]:
    ad = lm.adapter
    return {ad.weight_name(layer): ad.weight_param(layer).detach().clone() for layer in layers}


def scan_candidate(lm, records: Sequence[Any], candidate: Candidate, settings: ScanSettings = ScanSettings(), *,
                   stats_cache: Any = None, extra_columns: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Edit ``records`` at ``candidate.layers`` on the current (base) weights, evaluate, restore the weights.

    Returns one row per record: counterfact-prob/v1 metrics, the edit's per-request diagnostics and the
    candidate's per-layer diagnostics (means over its layers).
    """
    if not records:
        raise ValueError("a scan needs at least one record")
    overrides = {**dict(settings.hparams), "layers": list(candidate.layers)}
    name = lm.name
    if settings.model_name:
        lm.name = settings.model_name  # presets are matched on the spec's model name
    try:
        editor = Editor(lm, settings.method, overrides, stats_cache=stats_cache, stats_corpus=settings.stats_corpus)
    finally:
        lm.name = name
    backup = _edited_weights_backup(lm, candidate.layers)
    requests = [getattr(r, "request", r) for r in records]
    bs = 1 if settings.method in SINGLE_REQUEST else (settings.batch_size or len(requests))
    t0 = time.perf_counter()
    edit_rows: dict[str, dict[str, Any]] = {}
    layer_rows: list[dict[str, Any]] = []
    status, error = "ok", ""
    try:
        try:
            for b, a in enumerate(range(0, len(requests), bs)):
                torch.manual_seed(settings.seed * 1_000_003 + b)  # as a campaign stream: per-batch seed
                res = editor.apply(requests[a:a + bs])
                for r in res.rows:
                    edit_rows[str(r.get("case_id"))] = r
                layer_rows.extend(res.layer_rows)
        except Exception as exc:  # a candidate that cannot be edited (NaN update, singular solve) ranks last
            status, error = "failed", f"{type(exc).__name__}: {exc}"
        seconds = time.perf_counter() - t0
        rows = evaluate_records(lm, list(records), "counterfact", keep_raw=False)
    finally:
        apply_weights(lm, backup)
    diag = _layer_means(layer_rows)
    common = {"format": SCAN_FORMAT, "candidate": candidate.label, "layers": list(candidate.layers),
              "method": settings.method, "edit_seconds": seconds, "status": status, "error": error,
              "hparams_provenance": editor.hp.provenance, **diag, **dict(extra_columns or {})}
    out = []
    for row in rows:
        e = edit_rows.get(str(row["case_id"]), {})
        out.append({**row, **{k: e.get(k) for k in ("target_nll", "delta_norm", "h0_norm", "target_steps")},
                    **common})
    return out


def _layer_means(layer_rows: list[dict[str, Any]]) -> dict[str, float]:
    out = {}
    for key in ("update_fro", "weight_cond", "weight_fro", "resid_norm"):
        vals = [float(r[key]) for r in layer_rows if r.get(key) is not None and math.isfinite(float(r[key]))]
        out[f"{key}_mean"] = sum(vals) / len(vals) if vals else math.nan
    return out


def scan(lm, records: Sequence[Any], candidates: Sequence[Candidate], settings: ScanSettings = ScanSettings(),
         *, stats_cache: Any = None) -> list[dict[str, Any]]:
    """Every candidate on the same records (in one process; the runtime spreads candidates over replicas)."""
    out: list[dict[str, Any]] = []
    for c in candidates:
        out.extend(scan_candidate(lm, records, c, settings, stats_cache=stats_cache))
    return out


# --- summary and ranking ----------------------------------------------------------------------------
def _get(row: Any, key: str, default: Any = None) -> Any:
    if isinstance(row, Mapping):
        return row.get(key, default)
    return getattr(row, key, default)


def _mean(vals: Iterable[Any]) -> float:
    xs = [float(v) for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(xs) / len(xs) if xs else math.nan


def summarize_scan(rows: Iterable[Any], objective: str = DEFAULT_OBJECTIVE) -> list[dict[str, Any]]:
    """One row per candidate: metric means (0–1), diagnostics, the objective and the rank (1 = best).

    Failed candidates and candidates whose objective is NaN rank after every measured one; ties go to
    the higher harmonic-mean score, then to the earlier candidate.
    """
    obj = get_objective(objective)
    groups: dict[str, list[Any]] = {}
    for r in rows:
        groups.setdefault(str(_get(r, "candidate")), []).append(r)
    out = []
    for order, (label, g) in enumerate(groups.items()):
        means = {m: _mean(_get(r, m) for r in g) for m in {*METRICS, *obj.metrics}}
        failed = any(_get(r, "status", "ok") != "ok" for r in g)
        value = math.nan if failed else obj.value(means)
        first = g[0]
        out.append({"candidate": label, "layers": list(_get(first, "layers")), "method": _get(first, "method"),
                    "n_records": len(g), **means,
                    "target_nll": _mean(_get(r, "target_nll") for r in g),
                    "delta_norm": _mean(_get(r, "delta_norm") for r in g),
                    "h0_norm": _mean(_get(r, "h0_norm") for r in g),
                    "update_fro_mean": _get(first, "update_fro_mean", math.nan),
                    "weight_cond_mean": _get(first, "weight_cond_mean", math.nan),
                    "edit_seconds": _get(first, "edit_seconds", math.nan),
                    "status": "failed" if failed else "ok", "objective": obj.name,
                    "objective_statement": obj.statement, "objective_value": value,
                    "score": math.nan if failed else get_objective("score").value(means), "order": order})
    # ties: the harmonic-mean score (efficacy, paraphrase, neighbourhood), then the candidates' order (a
    # trace-guided scan lists the trace's window first)
    out.sort(key=lambda r: (math.isnan(r["objective_value"]), -_nz(r["objective_value"]), -_nz(r["score"]),
                            r["order"]))
    for i, r in enumerate(out, start=1):
        r["rank"] = i
    return out


def _nz(x: float) -> float:
    return 0.0 if math.isnan(x) else x
