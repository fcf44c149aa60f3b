"""Curves against the number of committed edits: evaluation metrics, retention, editing diagnostics.

Everything is reduced to one long frame (``campaign, model, dataset, method_label, metric, x, mean, lo,
hi, n``) that the plots draw and that is also written as ``tables/curves.csv``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pandas as pd

from rayedit.report.load import CampaignData
from rayedit.report.stats import mean_ci
from rayedit.report.tables import (
    EDIT_METRICS,
    EDIT_SUCCESS,
    PER_BATCH_LAYER,
    EvalScales,
    Metric,
    edits_through,
    eval_metric_columns,
    layer_keys,
    layer_metric,
)

MAX_POINTS = 60  # edit-level curves with more steps are binned into about this many points


@dataclass(frozen=True)
class CurveSpec:
    """One plotted quantity: its id (metric column of the long frame), section and how to show it."""

    mid: str
    section: str  # "evaluation" or "editing"
    metric: Metric
    band: str  # what the shaded band means


def _point(camp: CampaignData, model: str, dataset: str, label: str, mid: str, x: int, mean: float, lo: float,
           hi: float, n: int) -> dict[str, Any]:
    return {"campaign": camp.cid, "model": model, "dataset": dataset, "method_label": label, "metric": mid,
            "x": x, "mean": mean, "lo": lo, "hi": hi, "n": n}


def _bins(steps: list[int]) -> dict[int, int]:
    """step → bin index, so that a curve has at most MAX_POINTS points (consecutive steps pooled)."""
    width = max(1, math.ceil(len(steps) / MAX_POINTS))
    return {s: i // width for i, s in enumerate(sorted(steps))}


def edit_curves(camp: CampaignData) -> tuple[list[dict[str, Any]], list[CurveSpec]]:
    e = camp.edits
    if e.empty:
        return [], []
    through = edits_through(camp)
    specs: list[CurveSpec] = []
    points: list[dict[str, Any]] = []
    info = {s.sid: s for s in camp.streams}
    e = e[e["stream"].isin(info)].copy()
    e["x"] = [through[(s, int(t))] for s, t in zip(e["stream"], e["step"], strict=True)]
    emetrics = [m for m in EDIT_METRICS if m.key in e.columns and e[m.key].notna().any()]
    lkeys = layer_keys(e)
    specs += [CurveSpec(f"edit:{m.key}", "editing", m, "95% CI over the step's edits") for m in emetrics]
    specs += [CurveSpec(f"layer:{k}", "editing", layer_metric(k),
                        "line: mean over edited layers; band: min–max over layers") for k in lkeys]
    groups = e.groupby([e["stream"].map(lambda s: info[s].model), e["stream"].map(lambda s: info[s].dataset),
                        e["stream"].map(lambda s: info[s].method_label)], sort=False)
    for (model, dataset, label), g in groups:
        bins = _bins(sorted(g["step"].unique()))
        g = g.assign(bin=g["step"].map(bins))
        for _, b in g.groupby("bin", sort=True):
            x = int(b["x"].max())
            for m in emetrics:
                st = mean_ci(b[m.key])
                half = 0.0 if math.isnan(st.ci95) else st.ci95
                points.append(_point(camp, model, dataset, label, f"edit:{m.key}", x, st.mean, st.mean - half,
                                     st.mean + half, st.n))
            batches = b.drop_duplicates(["stream", "batch"], keep="last")
            last = batches.sort_values("batch").groupby("stream").tail(1)
            for k in lkeys:
                src = batches if k in PER_BATCH_LAYER else last
                vals = src[f"{k}__mean"].dropna()
                if vals.empty:
                    continue
                points.append(_point(camp, model, dataset, label, f"layer:{k}", x, float(vals.mean()),
                                     float(src[f"{k}__min"].min()), float(src[f"{k}__max"].max()), len(vals)))
    return points, specs


def eval_curves(camp: CampaignData, scales: EvalScales) -> tuple[list[dict[str, Any]], list[CurveSpec]]:
    ev = camp.evals
    if ev.empty:
        return [], []
    through = edits_through(camp)
    e = camp.edits
    in_step = e.groupby(["stream", "step"]).size().to_dict() if not e.empty else {}
    specs: dict[str, CurveSpec] = {}
    points: list[dict[str, Any]] = []
    for (suite, protocol), rows in ev.groupby(["suite", "protocol"], sort=True):
        suite, protocol = str(suite), str(protocol)
        cols = eval_metric_columns(rows, protocol, headline_only=True)
        retention = EDIT_SUCCESS.get(protocol)
        if retention not in rows.columns or "record_index" not in rows.columns:
            retention = None
        for col in cols:
            m = scales.metric(protocol, col)
            specs.setdefault(f"eval:{suite}:{protocol}:{col}", CurveSpec(
                f"eval:{suite}:{protocol}:{col}", "evaluation",
                Metric(col, m.label, f"{m.axis} · {suite}", m.scale), "95% CI over evaluated records"))
        if retention:
            m = scales.metric(protocol, retention)
            specs.setdefault(f"retention:{suite}:{protocol}", CurveSpec(
                f"retention:{suite}:{protocol}", "evaluation",
                Metric(retention, "Ret.", f"retention: {m.axis.split(' (')[0]} of earlier edits"
                                          f"{' (%)' if m.scale == 100 else ''} · {suite}", m.scale),
                "95% CI over records edited in earlier steps"))
        x_of = [through.get((str(s), int(t))) for s, t in zip(rows["stream"], rows["step"], strict=True)]
        if "n_edited" in rows.columns:  # a step evaluated without its edit rows at hand
            x_of = [x if x is not None else (None if pd.isna(n) else int(n))
                    for x, n in zip(x_of, rows["n_edited"], strict=True)]
        rows = rows.assign(x=x_of).dropna(subset=["x"])
        for (model, dataset, label, x), g in rows.groupby(["model", "dataset", "method_label", "x"], sort=True):
            for col in cols:
                st = mean_ci(pd.to_numeric(g[col], errors="coerce"), scales.of(protocol, col))
                half = 0.0 if math.isnan(st.ci95) else st.ci95
                points.append(_point(camp, model, dataset, label, f"eval:{suite}:{protocol}:{col}", int(x), st.mean,
                                     st.mean - half, st.mean + half, st.n))
            if retention:
                before = [through.get((str(s), int(t)), 0) - in_step.get((s, t), 0)
                          for s, t in zip(g["stream"], g["step"], strict=True)]
                old = g[pd.to_numeric(g["record_index"], errors="coerce").to_numpy() < before]
                if "scope" in old.columns:  # scope 'batch' evaluates only the step's own edits
                    old = old[old["scope"].astype(str) != "batch"]
                if not old.empty:
                    st = mean_ci(pd.to_numeric(old[retention], errors="coerce"), scales.of(protocol, retention))
                    half = 0.0 if math.isnan(st.ci95) else st.ci95
                    points.append(_point(camp, model, dataset, label, f"retention:{suite}:{protocol}", int(x),
                                         st.mean, st.mean - half, st.mean + half, st.n))
    return points, list(specs.values())


def all_curves(camps: list[CampaignData], scales: EvalScales) -> tuple[pd.DataFrame, list[CurveSpec]]:
    points: list[dict[str, Any]] = []
    specs: dict[str, CurveSpec] = {}
    for camp in camps:
        for p, s in (eval_curves(camp, scales), edit_curves(camp)):
            points += p
            for spec in s:
                specs.setdefault(spec.mid, spec)
    ordered = sorted(specs.values(), key=lambda s: (s.section != "evaluation", s.mid.startswith("retention")))
    cols = ["campaign", "model", "dataset", "method_label", "metric", "x", "mean", "lo", "hi", "n"]
    return pd.DataFrame(points, columns=cols), ordered
