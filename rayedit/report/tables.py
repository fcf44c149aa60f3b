"""Report tables (progress, paper-style evaluation, editing diagnostics) and their CSV/Markdown/HTML forms."""

from __future__ import annotations

import csv
import html
import io
import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from rayedit.report.load import ID_COLUMNS, CampaignData
from rayedit.report.stats import Stat, harmonic_mean, mean_ci

Cell = str | int | float | Stat | None


# --- metrics --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Metric:
    """How a column is shown: short table label, axis label with unit, scale, log axis."""

    key: str
    label: str
    axis: str
    scale: float = 1.0
    log: bool = False

    @property
    def percent(self) -> bool:
        return "(%)" in self.axis


#: headline metrics of the known protocols (paper abbreviations), shown ×100 like ``summarize`` (except UNSCALED)
HEADLINE: dict[str, tuple[tuple[str, str, str], ...]] = {
    "counterfact-prob/v1": (("efficacy_success", "Eff.", "efficacy success (%)"),
                            ("paraphrase_success", "Gen.", "paraphrase success (%)"),
                            ("neighborhood_success", "Spe.", "neighborhood success (%)")),
    "generation/v1": (("fluency", "Flu. (bits)", "fluency (bits, n-gram entropy)"),
                      ("consistency", "Consis.", "consistency (×100, TF-IDF cos)")),
    "zsre-token-acc/v1": (("efficacy", "Eff.", "efficacy (token acc., %)"),
                          ("generalization", "Gen.", "generalization (token acc., %)"),
                          ("specificity", "Spe.", "specificity (token acc., %)")),
    "easyedit/v1": (("reliability", "Rel.", "reliability (%)"),
                    ("generalization", "Gen.", "generalization (%)"),
                    ("locality", "Loc.", "locality (%)")),
}
KNOWN_PROTOCOLS = frozenset(HEADLINE)
#: metrics of known protocols that are not rates: shown in their own unit, not ×100 (``Protocol.unscaled``)
UNSCALED = frozenset({("generation/v1", "fluency")})
#: names for columns of other suites (general ability, safety, stability) when they appear
GENERIC_LABELS = {"delta_u": "Δ_U", "unsafe": "Unsafe", "unsafe_rate": "Unsafe", "retention": "Ret.",
                  "general_acc": "General", "accuracy": "Acc."}
#: the metric whose restriction to earlier edits measures retention
EDIT_SUCCESS = {"counterfact-prob/v1": "efficacy_success", "zsre-token-acc/v1": "efficacy",
                "easyedit/v1": "reliability"}
#: harmonic-mean score, as ``rayedit.evaluate.suites.summarize``
SCORE_OF = {"counterfact-prob/v1": ("efficacy_success", "paraphrase_success", "neighborhood_success")}

#: per-edit diagnostics of edits.parquet (mean ± 95% CI over edits)
EDIT_METRICS = (
    Metric("target_nll", "Target NLL", "target NLL after optimisation (nats/token)"),
    Metric("delta_norm", "‖δ‖", "residual change ‖δ‖ (L2)"),
    Metric("target_steps", "Opt. steps", "target optimisation steps"),
)
#: per-layer diagnostics of the edited matrices (``<key>_by_layer`` columns, one value per batch)
LAYER_METRICS = {
    "weight_fro": Metric("weight_fro", "‖W‖_F", "Frobenius norm of edited W ‖W‖_F"),
    "weight_cond": Metric("weight_cond", "cond(W)", "condition number of edited W (log)", log=True),
    "update_fro": Metric("update_fro", "‖ΔW‖_F", "update norm per batch ‖ΔW‖_F"),
    "weight_sigma_max": Metric("weight_sigma_max", "σ_max", "largest singular value σ_max(W)"),
    "weight_sigma_min": Metric("weight_sigma_min", "σ_min", "smallest singular value σ_min(W)"),
    "resid_norm": Metric("resid_norm", "‖R‖", "residual to distribute ‖R‖ (L2)"),
    "key_norm_mean": Metric("key_norm_mean", "‖k‖", "mean key norm ‖k‖"),
    "nullspace_rank": Metric("nullspace_rank", "null rank", "null-space rank (dimensions)"),
    "nullspace_energy": Metric("nullspace_energy", "null energy", "key energy in the null space tr(PΣ)/tr(Σ)"),
}
#: batch-level quantities: the mean over a step's batches; everything else is read after the step's last batch
PER_BATCH_LAYER = frozenset({"update_fro", "resid_norm", "key_norm_mean"})


def layer_metric(key: str) -> Metric:
    return LAYER_METRICS.get(key, Metric(key, key, f"{key} (per layer)"))


def layer_keys(edits: pd.DataFrame) -> list[str]:
    """The ``*_by_layer`` quantities present (known ones first, in a fixed order)."""
    present = [c[: -len("__mean")] for c in edits.columns if c.endswith("__mean")]
    present = [k for k in present if edits[f"{k}__mean"].notna().any()]
    known = [k for k in LAYER_METRICS if k in present]
    return known + sorted(k for k in present if k not in LAYER_METRICS)


def _numeric(df: pd.DataFrame, col: str) -> bool:
    """Numbers and booleans (success flags) are metrics; strings are not."""
    return col in df.columns and (pd.api.types.is_numeric_dtype(df[col]) or pd.api.types.is_bool_dtype(df[col]))


def eval_metric_columns(rows: pd.DataFrame, protocol: str, *, headline_only: bool) -> list[str]:
    """Metric columns of one protocol's rows: the headline ones of a known protocol, else every number."""
    if protocol in HEADLINE and headline_only:
        return [k for k, _, _ in HEADLINE[protocol] if k in rows.columns and rows[k].notna().any()]
    cols = [c for c in rows.columns if c not in ID_COLUMNS and _numeric(rows, c) and rows[c].notna().any()]
    if protocol in HEADLINE:
        order = [k for k, _, _ in HEADLINE[protocol]]
        cols.sort(key=lambda c: (order.index(c) if c in order else len(order), c))
    return cols


@dataclass
class EvalScales:
    """×100 for metrics of known protocols (as ``summarize``) and for unknown ones that are all in [0, 1]."""

    scale: dict[tuple[str, str], float] = field(default_factory=dict)

    @classmethod
    def from_frames(cls, frames: list[pd.DataFrame]) -> EvalScales:
        out: dict[tuple[str, str], float] = {}
        lo: dict[tuple[str, str], float] = {}
        hi: dict[tuple[str, str], float] = {}
        for df in frames:
            if df.empty:
                continue
            for protocol, rows in df.groupby("protocol", sort=False):
                for col in eval_metric_columns(rows, str(protocol), headline_only=False):
                    key = (str(protocol), col)
                    vals = pd.to_numeric(rows[col], errors="coerce").astype(float)
                    lo[key] = min(lo.get(key, math.inf), float(vals.min()))
                    hi[key] = max(hi.get(key, -math.inf), float(vals.max()))
        for key in lo:
            out[key] = 1.0 if key in UNSCALED else (
                100.0 if key[0] in KNOWN_PROTOCOLS or (lo[key] >= 0.0 and hi[key] <= 1.0) else 1.0)
        return cls(out)

    def of(self, protocol: str, col: str) -> float:
        return self.scale.get((protocol, col), 1.0)

    def metric(self, protocol: str, col: str) -> Metric:
        scale = self.of(protocol, col)
        for k, label, axis in HEADLINE.get(protocol, ()):
            if k == col:
                return Metric(col, label, axis, scale)
        unit = " (%)" if scale == 100.0 else ""
        label = GENERIC_LABELS.get(col, col)
        pretty = label if col in GENERIC_LABELS else col.replace("_", " ")
        return Metric(col, label, f"{pretty}{unit}", scale)


# --- the Table type -------------------------------------------------------------------------------
@dataclass
class Table:
    name: str  # file stem under tables/
    title: str
    headers: list[str]
    rows: list[list[Cell]]
    note: str = ""

    def _plain(self, cell: Cell, digits: int = 2) -> str:
        if cell is None:
            return "–"
        if isinstance(cell, Stat):
            return cell.fmt(digits)
        if isinstance(cell, float):
            return "–" if math.isnan(cell) else f"{cell:.{digits}f}"
        return str(cell)

    def to_csv(self) -> str:
        """Numbers in full precision; a Stat column becomes ``<h> mean``, ``<h> ci95``, ``<h> n``."""
        stat_cols = {i for i, _ in enumerate(self.headers) if any(isinstance(r[i], Stat) for r in self.rows)}
        head: list[str] = []
        for i, h in enumerate(self.headers):
            head += [f"{h} mean", f"{h} ci95", f"{h} n"] if i in stat_cols else [h]
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(head)
        for r in self.rows:
            out: list[Any] = []
            for i, c in enumerate(r):
                if i in stat_cols:
                    s = c if isinstance(c, Stat) else Stat(math.nan, math.nan, 0)
                    out += [_num(s.mean), _num(s.ci95), s.n]
                else:
                    out.append("" if c is None else (_num(c) if isinstance(c, float) else c))
            w.writerow(out)
        return buf.getvalue()

    def to_markdown(self) -> str:
        def esc(s: str) -> str:
            return s.replace("|", "\\|")

        lines = [f"**{esc(self.title)}**", "", "| " + " | ".join(esc(h) for h in self.headers) + " |",
                 "|" + "|".join("---" if i < 2 else "---:" for i in range(len(self.headers))) + "|"]
        lines += ["| " + " | ".join(esc(self._plain(c)) for c in r) + " |" for r in self.rows]
        if self.note:
            lines += ["", esc(self.note)]
        return "\n".join(lines) + "\n"

    def to_html(self, best: dict[int, str] | None = None) -> str:
        """``best``: column index → 'max'/'min'; the best mean of such a column is shown in bold."""
        bold: dict[int, int] = {}
        for i, how in (best or {}).items():
            means = [(r[i].mean if isinstance(r[i], Stat) else float(r[i]), j) for j, r in enumerate(self.rows)
                     if isinstance(r[i], Stat | float) and not math.isnan(r[i].mean if isinstance(r[i], Stat)
                                                                        else float(r[i]))]
            if len(means) > 1:
                bold[i] = (max(means) if how == "max" else min(means))[1]
        out = [f'<table class="t"><caption>{html.escape(self.title)}</caption><thead><tr>']
        out += [f"<th>{html.escape(h)}</th>" for h in self.headers]
        out.append("</tr></thead><tbody>")
        for j, r in enumerate(self.rows):
            out.append("<tr>")
            for i, c in enumerate(r):
                text = html.escape(self._plain(c))
                if bold.get(i) == j:
                    text = f"<b>{text}</b>"
                cls = ' class="num"' if isinstance(c, Stat | int | float) and not isinstance(c, bool) else ""
                out.append(f"<td{cls}>{text}</td>")
            out.append("</tr>")
        out.append("</tbody></table>")
        if self.note:
            out.append(f'<p class="note">{html.escape(self.note)}</p>')
        return "".join(out)

    def to_rich(self, drop: tuple[str, ...] = ()) -> Any:
        from rich.table import Table as RichTable

        keep = [i for i, h in enumerate(self.headers) if h not in drop]
        t = RichTable(title=self.title, title_justify="left")
        for i in keep:
            t.add_column(self.headers[i], justify="left" if i < 2 else "right", overflow="fold")
        for r in self.rows:
            t.add_row(*(self._plain(r[i]) for i in keep))
        return t


def _num(x: Any) -> Any:
    if isinstance(x, float):
        return "" if math.isnan(x) else repr(x)
    return x


# --- helpers --------------------------------------------------------------------------------------
def _group_order(streams: list[Any], dataset: str) -> list[tuple[str, str]]:
    """(model, method label) rows in spec order."""
    seen: dict[tuple[str, str], None] = {}
    for s in streams:
        if s.dataset == dataset:
            seen.setdefault((s.model, s.method_label), None)
    return list(seen)


def datasets_of(camp: CampaignData) -> list[str]:
    return list(dict.fromkeys(s.dataset for s in camp.streams))


def _last_batch_rows(edits: pd.DataFrame) -> pd.DataFrame:
    """One row per (stream, batch): the per-layer columns repeat on each edit row of a batch."""
    return edits.drop_duplicates(["stream", "batch"], keep="last")


# --- tables ---------------------------------------------------------------------------------------
def _edits_per_step(spec: dict[str, Any]) -> int | None:
    """Edits a committed step holds (batch_size × checkpoint_every), from the frozen spec."""
    try:
        edits = int(spec["edits_per_stream"])
        bs = edits if spec.get("mode") == "batch" else int(spec.get("batch_size", 1))
        return min(edits, bs * int(spec.get("checkpoint_every", 1)))
    except (KeyError, TypeError, ValueError):
        return None


def progress_table(camp: CampaignData) -> Table:
    """Per stream: edits and steps done of planned, and the latest evaluation of each suite, in edits (the
    numbering of the spec's ``at:``)."""
    rows: list[list[Cell]] = []
    through = edits_through(camp)
    per_step = _edits_per_step(camp.spec)
    for s in camp.streams:
        total = "?" if s.total_steps is None else str(s.total_steps)
        tedits = "?" if s.total_edits is None else str(s.total_edits)
        evals = ", ".join(f"{suite}@{through.get((s.sid, max(steps)), f'step {max(steps) + 1}')}"
                          for suite, steps in sorted(s.eval_steps.items())) or "–"
        rows.append([s.model, s.method_label, s.dataset, "–" if s.seed is None else s.seed,
                     f"{len(s.steps)}/{total}", f"{s.edits_done}/{tedits}", "–" if per_step is None else per_step,
                     evals, s.status, s.sid])
    done = sum(s.done for s in camp.streams)
    state = "finished" if camp.finished else "running (or interrupted)"
    return Table(f"{camp.cid}--progress", f"{camp.cid}: progress of {len(camp.streams)} streams",
                 ["model", "method", "dataset", "seed", "steps", "edits", "edits per step",
                  "evaluated (suite@edits)", "status", "stream"], rows,
                 note=f"{done}/{len(camp.streams)} streams finished; campaign {state}. Committed steps only; "
                      "suite@N: latest evaluation, after N edits.")


def diagnostics_table(camp: CampaignData, dataset: str) -> Table:
    """Editing diagnostics from edits.parquet: per (model, method), over committed edits."""
    e = camp.edits
    e = e[e["dataset"] == dataset] if not e.empty and "dataset" in e.columns else e
    lkeys = [k for k in ("update_fro", "weight_fro", "weight_cond") if not e.empty and f"{k}__mean" in e.columns]
    emetrics = [m for m in EDIT_METRICS if not e.empty and m.key in e.columns and e[m.key].notna().any()]
    headers = ["model", "method", "edits"] + [m.label for m in emetrics]
    for k in lkeys:
        headers.append(f"{layer_metric(k).label} (per batch)" if k in PER_BATCH_LAYER
                       else f"{layer_metric(k).label} (final)")
    headers += ["s / edit", "peak MB"]
    rows: list[list[Cell]] = []
    for model, label in _group_order(camp.streams, dataset):
        ss = [s for s in camp.streams if s.dataset == dataset and s.model == model and s.method_label == label]
        total = sum(s.total_edits or 0 for s in ss)
        g = e[e["stream"].isin([s.sid for s in ss])] if not e.empty else e
        row: list[Cell] = [model, label, f"{sum(s.edits_done for s in ss)}/{total or '?'}"]
        row += [mean_ci(g[m.key]) if not g.empty else Stat(math.nan, math.nan, 0) for m in emetrics]
        batches = _last_batch_rows(g) if not g.empty else g
        for k in lkeys:
            if batches.empty:
                row.append(Stat(math.nan, math.nan, 0))
            elif k in PER_BATCH_LAYER:  # over batches, each the mean over edited layers
                row.append(mean_ci(batches[f"{k}__mean"]))
            else:  # after the last committed batch of each stream, mean over layers, then over streams
                last = batches.sort_values("batch").groupby("stream").tail(1)
                row.append(mean_ci(last[f"{k}__mean"]))
        if g.empty:
            row += [None, None]
        else:
            secs = float(batches["seconds"].sum()) if "seconds" in batches else math.nan
            row.append(secs / len(g) if len(g) else math.nan)
            row.append(float(g["peak_memory_mb"].max()) if "peak_memory_mb" in g else math.nan)
        rows.append(row)
    return Table(f"{camp.cid}--{_slug(dataset)}--editing", f"{camp.cid} · {dataset}: editing diagnostics", headers,
                 rows, note="Mean ± 95% t-interval over committed edits (NLL, ‖δ‖, steps) or batches (‖ΔW‖_F, "
                            "mean over edited layers); final = after each stream's last committed step, mean "
                            "over edited layers (± over streams when several seeds).")


def _eval_selection(camp: CampaignData, dataset: str, suite: str) -> pd.DataFrame:
    """Rows of a suite at each stream's latest evaluated (committed) step."""
    ev = camp.evals
    rows = ev[(ev["suite"] == suite) & (ev["dataset"] == dataset)]
    if rows.empty:
        return rows
    last = rows.groupby("stream")["step"].transform("max")
    return rows[rows["step"] == last]


def edits_through(camp: CampaignData) -> dict[tuple[str, int], int]:
    """(stream, step) → number of committed edits up to and including that step."""
    e = camp.edits
    if e.empty:
        return {}
    per = e.groupby(["stream", "step"]).size().reset_index(name="n").sort_values(["stream", "step"])
    per["cum"] = per.groupby("stream")["n"].cumsum()
    return {(str(r.stream), int(r.step)): int(r.cum) for r in per.itertuples()}


def eval_table(camp: CampaignData, dataset: str, scales: EvalScales) -> Table | None:
    """The paper-style table of a dataset: (model × method) × headline metrics, mean ± 95% CI over records."""
    ev = camp.evals
    if ev.empty or "dataset" not in ev.columns or not (ev["dataset"] == dataset).any():
        return None
    through = edits_through(camp)
    cols: list[tuple[str, str, str]] = []  # (suite, protocol, metric)
    for suite in sorted(ev.loc[ev["dataset"] == dataset, "suite"].unique()):
        sel = _eval_selection(camp, dataset, suite)
        for protocol in dict.fromkeys(sel["protocol"]):
            pr = sel[sel["protocol"] == protocol]
            cols += [(suite, str(protocol), c) for c in eval_metric_columns(pr, str(protocol), headline_only=True)]
    labels = [scales.metric(p, c).label for _, p, c in cols]
    dup = {lab for lab in labels if labels.count(lab) > 1}
    headers = ["model", "method", "edits"] + [f"{lab} [{s}]" if lab in dup else lab
                                              for lab, (s, _, _) in zip(labels, cols, strict=True)]
    score_protocols = [p for p in dict.fromkeys(p for _, p, _ in cols) if p in SCORE_OF]
    headers += ["Score" if len(score_protocols) == 1 else f"Score [{p}]" for p in score_protocols]
    rows: list[list[Cell]] = []
    sels = {suite: _eval_selection(camp, dataset, suite) for suite in dict.fromkeys(s for s, _, _ in cols)}
    for model, label in _group_order(camp.streams, dataset):
        row: list[Cell] = [model, label]
        n_edits: set[int] = set()
        for sel in sels.values():
            g = sel[(sel["model"] == model) & (sel["method_label"] == label)]
            for sid, step in g[["stream", "step"]].drop_duplicates().itertuples(index=False):
                n_edits.add(through.get((str(sid), int(step)), -1))
        n_edits.discard(-1)
        row.append("–" if not n_edits else (str(min(n_edits)) if len(n_edits) == 1
                                            else f"{min(n_edits)}–{max(n_edits)}"))
        stats: dict[tuple[str, str], Stat] = {}
        for suite, protocol, col in cols:
            sel = sels[suite]
            g = sel[(sel["model"] == model) & (sel["method_label"] == label) & (sel["protocol"] == protocol)]
            st = mean_ci(pd.to_numeric(g[col], errors="coerce"), scales.of(protocol, col))
            stats[(protocol, col)] = st
            row.append(st)
        for p in score_protocols:
            row.append(harmonic_mean(stats.get((p, m), Stat(math.nan, math.nan, 0)).mean for m in SCORE_OF[p]))
        rows.append(row)
    return Table(f"{camp.cid}--{_slug(dataset)}--eval", f"{camp.cid} · {dataset}: evaluation", headers, rows,
                 note="Mean ± 95% t-interval over evaluated records, at each stream's latest evaluated committed "
                      "step (edits = edits made by then); success/accuracy metrics in %, Flu. in bits, Consis. ×100; "
                      "Score = harmonic mean of Eff., Gen., Spe.")


def all_metrics_rows(camp: CampaignData, scales: EvalScales) -> list[dict[str, Any]]:
    """Long table of every evaluation metric at every evaluated step (for CSV)."""
    ev = camp.evals
    if ev.empty:
        return []
    through = edits_through(camp)
    out: list[dict[str, Any]] = []
    keys = ["dataset", "model", "method_label", "suite", "protocol", "step"]
    for key, g in ev.groupby(keys, sort=True, dropna=False):
        d = dict(zip(keys, key, strict=True))
        streams = sorted(set(g["stream"]))
        n_ed = sorted({through.get((s, int(d["step"])), -1) for s in streams} - {-1})
        for col in eval_metric_columns(g, str(d["protocol"]), headline_only=False):
            st = mean_ci(pd.to_numeric(g[col], errors="coerce"), scales.of(str(d["protocol"]), col))
            out.append({"campaign": camp.cid, **d, "edits": n_ed[-1] if n_ed else None, "metric": col,
                        "scale": scales.of(str(d["protocol"]), col), "mean": st.mean, "ci95": st.ci95, "n": st.n,
                        "streams": len(streams)})
    return out


def rows_to_csv(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _num(v) for k, v in r.items()})
    return buf.getvalue()


def _slug(text: str) -> str:
    out = "".join(c if c.isalnum() or c in "._-" else "-" for c in str(text).lower())
    return out.strip("-") or "x"


slug = _slug
