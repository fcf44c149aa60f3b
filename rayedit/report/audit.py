"""The "Audit" section of a campaign report: what the edits cost (general capability, Δ_U, safety, shift).

Audit shards (``rayedit.runtime.audit``) commit ``streams/<sid>/eval/<step>/<suite>/part-<shard>.parquet``
for the suites ``general``, ``uncertainty``, ``safety`` and ``shift``; each model's unedited weights are
audited once as the pseudo-stream ``<model>--unedited-<hash>`` (method ``unedited``, step 0, no edits),
which has no steps of its own. Here:

- :func:`load_audit` reads every committed audit part of a campaign (parts whose ``.done`` marker verifies,
  of committed steps; the pseudo-streams' step-0 parts), one suite at a time because suites differ in columns;
- :func:`audit_tables` turns the rows into one tidy table per suite by (model, method, n_edited, group):
  the set-level numbers of :func:`rayedit.evaluate.audit.summarize_audit` per stream and audited step,
  averaged over the streams (seeds, datasets) of a (model, method); the unedited model's numbers are the
  ``n_edited = 0`` baseline row of every method of that model;
- :func:`audit_section` renders the HTML fragment, the tables and one small-multiples SVG per suite
  (its headline metric against the number of edits, one line per (model, method), the baseline at 0).

``rayedit.evaluate.audit`` (torch) is imported only when a campaign has audit rows, and matplotlib only
when drawing, so a report without audits pays for neither.
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from rayedit.report.load import _dataset, _eval_location, _scalar_column_names
from rayedit.report.plots import MARKERS, Figure, _to_svg, method_colours, style
from rayedit.report.tables import Cell, Table, slug
from rayedit.store import Store, committed_steps
from rayedit.store.layout import eval_part_keys, eval_prefix, list_streams, stream_prefix

#: the audit suites, in report order (``rayedit.evaluate.audit.AUDIT_SUITES``; not imported: it pulls in torch)
AUDIT_SUITES: tuple[str, ...] = ("general", "uncertainty", "safety", "shift")
#: method of the unedited pseudo-streams (``rayedit.runtime.audit.UNEDITED``; the runtime imports Ray)
UNEDITED = "unedited"
#: the group column of each suite's table (``group_kind`` of ``summarize_audit``)
GROUP = {"general": "task", "uncertainty": "role", "safety": "category", "shift": "layer"}
#: metric columns of each suite's table, in order (the set-level numbers of ``summarize_audit``)
METRICS: dict[str, tuple[str, ...]] = {
    "general": ("accuracy", "f1", "f1_new", "invalid_rate"),
    "uncertainty": ("u", "u_pre", "delta_u", "delta_u_ratio_of_means", "delta_u_abs"),
    "safety": ("urr",),
    "shift": ("l2_shift", "rel_shift", "cosine_drift", "D1", "D2"),
}
#: the metric drawn (and shown above the full table) per suite, with its axis label
HEADLINE: dict[str, tuple[str, str]] = {
    "general": ("f1", "weighted F1 of the generated answer"),
    "uncertainty": ("delta_u", "Δ_U (mean per query)"),
    "safety": ("urr", "unsafe-response rate URR (%)"),
    "shift": ("rel_shift", "relative shift ‖h_post − h_pre‖ / ‖h_pre‖"),
}
TITLES = {"general": "General capability", "uncertainty": "Uncertainty growth Δ_U", "safety": "Safety",
          "shift": "Representation shift"}
NOTES = {
    "general": "Zero-shot tasks (general/v1): accuracy and support-weighted F1 of the parsed generated answer "
               "(invalid = wrong), F1 of the candidate-likelihood choice (f1_new), share of unparsable answers; "
               "'mean' = unweighted mean over the tasks.",
    "uncertainty": "SPUQ-style U = ½(U_alea + U_epis) of sampled answers to paraphrases (uncertainty/v1), before "
                   "(u_pre, base weights) and after; Δ_U = (U − U_pre)/U_pre per query, averaged (headline; NaN "
                   "when U_pre ≈ 0), beside the ratio of the means and the mean absolute change Δ_U_abs.",
    "safety": "Unsafe-response rate URR (%) on malicious queries (safety/v1): a response is unsafe unless the "
              "judge finds a refusal; 'all' = every query, then per category.",
    "shift": "Hidden states at the subject's last token per layer (shift/v1), unedited → edited: per-prompt means "
             "of ‖Δh‖ (l2_shift), ‖Δh‖/‖h_pre‖ (rel_shift), 1 − cos (cosine_drift); D1, D2 = KDE overlap of the "
             "pre/post marginals along PC1/PC2 of the pre-edit states (1 = identical).",
}
MAX_PANELS = 8  # small multiples per figure (groups beyond: the first, then evenly spaced; all in the table)
LINESTYLES = ("-", "--", ":", "-.")
_STEP_DIR = re.compile(r"^\d{6,}$")


# --- reading --------------------------------------------------------------------------------------
def _stream_parts(store: Store, cid: str, sid: str) -> tuple[list[int], list[tuple[int, str, list[str]]]]:
    """(committed steps, [(step, suite, committed part keys)]) of one stream's audit suites."""
    parts: list[tuple[int, str, list[str]]] = []
    for name in store.list_children(f"{stream_prefix(cid, sid)}/eval"):
        if not _STEP_DIR.match(name):
            continue
        step = int(name)
        for suite in store.list_children(eval_prefix(cid, sid, step)):
            if suite in AUDIT_SUITES:
                keys = eval_part_keys(store, cid, sid, step, suite)  # .done marker present and verified
                if keys:
                    parts.append((step, suite, keys))
    steps = committed_steps(store, cid, sid) if parts else []
    return steps, parts


def load_audit(store: Store, cid: str) -> pd.DataFrame:
    """Every committed audit row of a campaign (all suites, NaN where a suite lacks a column).

    Committed = the part's ``.done`` marker verifies, and the part belongs to a committed step of its
    stream — or, for a stream without steps (the unedited pseudo-streams), is a step-0 part whose rows
    say method ``unedited``. ``stream``, ``step`` and ``suite`` are taken from the key, whatever a row says.
    Empty DataFrame when the campaign has no audit parts.
    """
    sids = list_streams(store, cid)
    with ThreadPoolExecutor(max_workers=8) as pool:
        listed = list(pool.map(lambda sid: _stream_parts(store, cid, sid), sids))
    by_suite: dict[str, list[str]] = {}
    committed: dict[str, set[int]] = {}
    for sid, (steps, parts) in zip(sids, listed, strict=True):
        committed[sid] = set(steps)
        for step, suite, keys in parts:
            if steps and step not in committed[sid]:
                continue  # a part of a step that is not committed (cannot happen in order; never trusted)
            by_suite.setdefault(suite, []).extend(keys)
    frames = []
    for suite in [s for s in AUDIT_SUITES if s in by_suite]:
        dset = _dataset(store, by_suite[suite])
        assert dset is not None
        df = dset.to_table(columns=[*_scalar_column_names(dset.schema), "__filename"]).to_pandas()
        where = df.pop("__filename").map(_eval_location)
        df["stream"] = [w[0] for w in where]
        df["step"] = [w[1] for w in where]
        df["suite"] = suite
        if "method_label" not in df.columns:
            df["method_label"] = df.get("method")
        df["method_label"] = df["method_label"].fillna(df.get("method"))
        # a stream without committed steps contributes only unedited step-0 rows
        stepless = ~df["stream"].map(lambda s: bool(committed.get(s))).astype(bool)
        keep = ~stepless | ((df.get("method") == UNEDITED) & (df["step"] == 0))
        frames.append(df[keep])
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, ignore_index=True, sort=False)


# --- tables ---------------------------------------------------------------------------------------
def _records(sub: pd.DataFrame) -> list[dict[str, Any]]:
    """Row dicts as the suites wrote them: NaN → None in text columns (floats keep NaN, as the summaries expect)."""
    sub = sub.dropna(axis=1, how="all")
    out = sub.to_dict("records")
    text = [c for c in sub.columns if not pd.api.types.is_numeric_dtype(sub[c])]
    for r in out:
        for c in text:
            v = r[c]
            if isinstance(v, float) and math.isnan(v):
                r[c] = None
    return out


def _group_rank(suite: str, order: list[str]) -> dict[str, int]:
    """Rank of each group in a table: the overall group first (safety's 'all'), layers numerically, 'mean' last,
    the others in order of first appearance (the task order of the files, roles, categories)."""
    def key(item: tuple[int, str]) -> tuple[int, float, int]:
        i, g = item
        if g in ("all", "mean"):
            return (0 if g == "all" else 2, 0.0, i)
        if suite == "shift":
            try:
                return (1, float(g), i)
            except ValueError:
                pass
        return (1, 0.0, i)

    return {g: r for r, (_, g) in enumerate(sorted(enumerate(order), key=key))}


def _stream_summaries(suite: str, sub: pd.DataFrame) -> pd.DataFrame:
    """Set-level metrics per (stream, step, group): ``summarize_audit`` over each stream's rows of a step."""
    from rayedit.evaluate.audit import summarize_audit  # lazy: imports torch

    tidy = summarize_audit(_records(sub), by=("stream", "step"))
    if not tidy:
        return pd.DataFrame()
    cells: dict[tuple[Any, Any, str], dict[str, Any]] = {}
    for r in tidy:  # one row per (stream, step, group), the metrics as columns
        cells.setdefault((r["stream"], r["step"], r["group"]), {"stream": r["stream"], "step": r["step"],
                                                              "group": r["group"]})[r["metric"]] = r["value"]
    wide = pd.DataFrame(list(cells.values()))
    order = list(dict.fromkeys(r["group"] for r in tidy))
    if suite == "general" and not wide.empty:  # the unweighted mean over tasks, per stream and step
        cols = [m for m in METRICS["general"] if m in wide.columns]
        mean = wide.groupby(["stream", "step"], sort=False)[cols].mean().reset_index()
        mean["n"] = wide.groupby(["stream", "step"], sort=False)["n"].sum().to_numpy() if "n" in wide else math.nan
        mean["group"] = "mean"
        wide = pd.concat([wide, mean], ignore_index=True)
        order.append("mean")
    wide["_order"] = wide["group"].map(_group_rank(suite, order))
    return wide


def audit_tables(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per suite, a tidy table: one row per (model, method, n_edited, group) with the suite's metric columns.

    Columns: ``model``, ``method`` (the method label), ``n_edited``, ``baseline`` (True on the unedited
    model's row), the group column (``task`` | ``role`` | ``category`` | ``layer``), the metrics of
    :data:`METRICS`, ``n`` (records, summed over streams) and ``streams``. Metrics are computed per stream
    and audited step (set-level numbers such as F1 or the KDE overlaps only mean something there) and then
    averaged over the streams of the cell. The unedited model's rows are repeated as ``n_edited = 0`` of
    every method of that model (a model audited only unedited keeps method ``unedited``).
    """
    if df.empty or "suite" not in df.columns:
        return {}
    label = df["method_label"].fillna(df["method"]) if "method_label" in df.columns else df["method"]
    edited = df["method"] != UNEDITED
    methods_of: dict[str, list[str]] = {}
    for model, lab in zip(df.loc[edited, "model"], label[edited], strict=True):
        methods_of.setdefault(str(model), [])
        if str(lab) not in methods_of[str(model)]:
            methods_of[str(model)].append(str(lab))
    out: dict[str, pd.DataFrame] = {}
    for suite in [s for s in AUDIT_SUITES if (df["suite"] == s).any()]:
        sub = df[df["suite"] == suite]
        per = _stream_summaries(suite, sub)
        if per.empty:
            continue
        ident = sub.assign(method_label=label[sub.index]).groupby(["stream", "step"], sort=False)[
            ["model", "method", "method_label", "n_edited"]].first().reset_index()
        per = per.merge(ident, on=["stream", "step"], how="left")
        metrics = [m for m in METRICS[suite] if m in per.columns]
        keys = ["model", "method_label", "n_edited", "group"]
        agg = per.groupby(keys, sort=False, dropna=False).agg(
            **{m: (m, "mean") for m in metrics}, n=("n", "sum"), streams=("stream", "nunique"),
            _order=("_order", "first"), unedited=("method", lambda s: bool((s == UNEDITED).all()))).reset_index()
        rows = []
        for r in agg.to_dict("records"):
            if r.pop("unedited"):
                for lab in methods_of.get(str(r["model"]), [UNEDITED]):
                    rows.append({**r, "method_label": lab, "n_edited": 0, "baseline": True})
            else:
                rows.append({**r, "baseline": False})
        t = pd.DataFrame(rows)
        models = list(dict.fromkeys(str(m) for m in sub["model"]))
        t["_m"] = t["model"].map({m: i for i, m in enumerate(models)})
        t = t.sort_values(["_m", "method_label", "n_edited", "baseline", "_order"], ascending=[True, True, True,
                                                                                                False, True])
        t = t.rename(columns={"method_label": "method", "group": GROUP[suite]})
        t["n_edited"] = t["n_edited"].astype(int)
        t["n"] = t["n"].astype(int)
        if suite == "shift":
            t["layer"] = [int(x) if str(x).lstrip("-").isdigit() else x for x in t["layer"]]
        out[suite] = t[["model", "method", "n_edited", "baseline", GROUP[suite], *metrics, "n", "streams"]
                       ].reset_index(drop=True)
    return out


class AuditTable(Table):
    """A report table whose numbers keep three significant digits (shift and Δ_U are often ≪ 1)."""

    def _plain(self, cell: Cell, digits: int = 3) -> str:
        if isinstance(cell, float) and not math.isnan(cell):
            return f"{cell:.0f}" if abs(cell) >= 1000 else f"{cell:.{digits}g}"
        return super()._plain(cell, digits)


def frame_table(name: str, df: pd.DataFrame, title: str, note: str = "") -> AuditTable:
    """A DataFrame as a report Table (CSV with full precision, Markdown and HTML with 3 significant digits)."""
    rows: list[list[Cell]] = []
    for rec in df.itertuples(index=False):
        row: list[Cell] = []
        for v in rec:
            if isinstance(v, bool):
                row.append("true" if v else "false")
            elif isinstance(v, int | str) or v is None:
                row.append(v)
            else:
                try:
                    row.append(float(v))
                except (TypeError, ValueError):
                    row.append(str(v))
        rows.append(row)
    return AuditTable(name, title, [str(c) for c in df.columns], rows, note)


def headline_table(suite: str, t: pd.DataFrame, max_groups: int = 12) -> pd.DataFrame:
    """The suite's headline metric as (model, method, edits) × group — what the HTML shows above the details."""
    metric = HEADLINE[suite][0]
    gcol = GROUP[suite]
    groups = _pick(list(dict.fromkeys(t[gcol])), max_groups)
    rows = []
    for (model, method, n_ed), g in t.groupby(["model", "method", "n_edited"], sort=False):
        vals = dict(zip(g[gcol], g[metric], strict=True)) if metric in g.columns else {}
        rows.append({"model": model, "method": method, "edits": int(n_ed),
                     **{f"{gcol} {x}" if suite == "shift" else str(x): vals.get(x, math.nan) for x in groups}})
    return pd.DataFrame(rows)


def _pick(groups: list[Any], k: int) -> list[Any]:
    """At most ``k`` groups: all if few, else the first and evenly spaced ones through the last."""
    if len(groups) <= k:
        return groups
    idx = sorted({round(i * (len(groups) - 1) / (k - 1)) for i in range(k)})
    return [groups[i] for i in idx]


# --- figures --------------------------------------------------------------------------------------
def audit_figure(suite: str, t: pd.DataFrame, colours: dict[str, str], name: str, title: str) -> Figure:
    """Small multiples of the suite's headline metric against edits: one panel per group, one line per
    (model, method) coloured by method (the report's colours), marker and dash by model; 0 edits = unedited."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    metric, axis = HEADLINE[suite]
    gcol = GROUP[suite]
    groups = _pick(list(dict.fromkeys(t[gcol])), MAX_PANELS)
    models = list(dict.fromkeys(t["model"]))
    ncols = min(4, len(groups))
    nrows = math.ceil(len(groups) / ncols)
    n_lines = len({(m, x) for m, x in zip(t["model"], t["method"], strict=True)})
    pw, ph, left, right, bottom, top = 2.5, 2.0, 0.75, 0.15, 0.45, 0.3
    legend = 0.35 + 0.18 * math.ceil(n_lines / 4)  # legend rows under the panels
    width, height = left + right + pw * ncols + 0.3 * (ncols - 1), bottom + top + ph * nrows + 0.45 * (nrows - 1)
    height += legend
    with style():
        fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), sharex=True, sharey=True, squeeze=False)
        fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=(bottom + legend) / height,
                            top=1 - top / height, wspace=0.3 / pw, hspace=0.45 / ph)
        handles: dict[str, Any] = {}
        for ax, grp in zip(axes.flat, groups, strict=False):
            sub = t[t[gcol] == grp]
            for (model, method), g in sub.groupby(["model", "method"], sort=False):
                g = g.sort_values("n_edited")
                mi = models.index(model)
                (line,) = ax.plot(g["n_edited"], g[metric], color=colours.get(str(method), "#555555"),
                                  marker=MARKERS[mi % len(MARKERS)], linestyle=LINESTYLES[mi % len(LINESTYLES)],
                                  label=f"{model} · {method}")
                handles.setdefault(f"{model} · {method}", line)
                base = g[g["baseline"]]
                if not base.empty:  # the unedited model: hollow, shared by the model's methods
                    ax.plot(base["n_edited"], base[metric], linestyle="none", marker="o", markersize=6,
                            markerfacecolor="white", markeredgecolor="0.25", zorder=3)
            ax.set_title(f"{gcol} {grp}" if suite == "shift" else str(grp), loc="left")
            if sub[metric].isna().all():  # e.g. Δ_U of queries the unedited model answers without spread
                ax.text(0.5, 0.5, "not defined", transform=ax.transAxes, ha="center", va="center", color="0.5")
            ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
            if suite == "general" or (suite == "shift" and metric in ("D1", "D2")):
                ax.set_ylim(-0.03, 1.03)
            elif suite == "safety":
                ax.set_ylim(-3, 103)
        for ax in list(axes.flat)[len(groups):]:
            ax.set_visible(False)
        for ax in axes[-1]:
            ax.set_xlabel("number of edits")
        for row in axes:
            row[0].set_ylabel(_wrap(axis, 26))
        if handles:
            fig.legend(handles.values(), handles.keys(), loc="lower left", frameon=False, ncol=min(4, len(handles)),
                       bbox_to_anchor=(left / width, 0.0), title="model · method (○ = unedited)", title_fontsize=8)
        svg = _to_svg(fig)
        plt.close(fig)
    shown = "" if len(groups) == len(set(t[gcol])) else f" ({len(groups)} of {len(set(t[gcol]))} {gcol}s shown)"
    caption = f"{axis} per {gcol}{shown}, against edits made; 0 = the unedited model."
    return Figure(name, title, caption, svg)


def _wrap(text: str, width: int) -> str:
    lines, cur = [], ""
    for w in text.split(" "):
        if cur and len(cur) + 1 + len(w) > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}" if cur else w
    lines.append(cur)
    return "\n".join(lines)


# --- the section ----------------------------------------------------------------------------------
def _img(svg: str, alt: str) -> str:
    b64 = base64.b64encode(svg.encode("utf-8")).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/svg+xml;base64,{b64}">'


def table_name(cid: str, suite: str) -> str:
    return f"{cid}--audit-{suite}"


def _section(cid: str, tables: dict[str, pd.DataFrame], colours: dict[str, str] | None
             ) -> tuple[str, list[AuditTable], list[Figure]]:
    labels = sorted({str(m) for t in tables.values() for m in t["method"]})
    colours = {**method_colours(labels), **(colours or {})}
    h = [f"<h3 id='audit-{html.escape(cid)}'>Audit: what the edits cost</h3>",
         "<p class='note'>Audit suites run on the stream's weights at each audited step; x = edits made in the "
         "stream, 0 = the unedited model (audited once per model, the hollow circle every method of the model "
         "starts from). Set-level numbers per stream and step (<code>rayedit.evaluate.audit.summarize_audit"
         "</code>), averaged over the streams (seeds, datasets) of a (model, method). Full tables: "
         f"<code>tables/{html.escape(cid)}--audit-&lt;suite&gt;.csv</code>.</p>"]
    out_tables: list[AuditTable] = []
    figures: list[Figure] = []
    for suite, t in tables.items():
        name = table_name(cid, suite)
        title = TITLES[suite]
        full = frame_table(name, t, f"{cid}: audit · {title} (all metrics)", NOTES[suite])
        out_tables.append(full)
        fig = audit_figure(suite, t, colours, f"{slug(cid)}--audit-{suite}", f"{cid}: {title}")
        figures.append(fig)
        head = frame_table(f"{name}-headline", headline_table(suite, t),
                           f"{cid}: {HEADLINE[suite][1]} per {GROUP[suite]}")
        h += [f"<h4>{html.escape(title)}</h4>",
              f"<div class='figs'><figure>{_img(fig.svg, fig.title)}<figcaption>{html.escape(fig.title)} — "
              f"{html.escape(fig.caption)}</figcaption></figure></div>",
              f"<div style='overflow-x:auto'>{head.to_html()}</div>",
              f"<details><summary>all metrics: {html.escape(title)} (<code>tables/{html.escape(name)}.csv"
              f"</code>)</summary><div style='overflow-x:auto'>{full.to_html()}</div></details>"]
    return "\n".join(h), out_tables, figures


def audit_section(store: Store, cid: str, colours: dict[str, str] | None = None
                  ) -> tuple[str, dict[str, pd.DataFrame], dict[str, str]]:
    """(HTML fragment, tables by file stem, SVG figures by file stem) of a campaign's audit; empty without parts.

    Tables are named ``<cid>--audit-<suite>`` (write them as ``tables/<name>.csv``/``.md``), figures
    ``<cid>--audit-<suite>`` (``figures/<name>.svg``). ``colours``: the report's method colours (default:
    the same rule over the audited methods).
    """
    tables = audit_tables(load_audit(store, cid))
    if not tables:
        return "", {}, {}
    frag, _, figures = _section(cid, tables, colours)
    return frag, {table_name(cid, s): t for s, t in tables.items()}, {f.name: f.svg for f in figures}


@dataclass
class AuditParts:
    """What a report adds for the audits of its campaigns (the shape of ``LocateSections``)."""

    html: dict[str, str] = field(default_factory=dict)  # campaign id → HTML fragment
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)


def audit_parts(store: Store, cids: Iterable[str] | Sequence[str], colours: dict[str, str] | None = None
                ) -> AuditParts:
    """Audit sections of every campaign that has audit parts, as report Tables and Figures."""
    out = AuditParts()
    for cid in cids:
        tables = audit_tables(load_audit(store, cid))
        if not tables:
            continue
        frag, tabs, figs = _section(cid, tables, colours)
        out.html[cid] = frag
        out.tables += tabs
        out.figures += figs
    return out
