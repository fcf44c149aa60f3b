"""Report sections for locating and tuning: the causal trace, the layer scan and the sweep ranking.

- **trace** (``campaigns/<cid>/trace/`` parts): a figure in ROME's style (mean indirect effect of
  restoring the hidden state / MLP output / attention output, per token group × layer) plus the
  MLP-at-subject-last curve with the suggested window shaded, and a table of the per-layer effects;
- **scan** (``campaigns/<cid>/scan/``): candidates ranked by the stated objective, with diagnostics;
- **sweep ranking**: when the campaign's spec has a hyperparameter grid, its configurations ranked by
  the default objective (``rayedit.locate.sweep``), the rule written under the table.

Everything is read from committed parts only; matplotlib is imported when drawing.
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from rayedit.locate import parts
from rayedit.locate.objectives import DEFAULT_OBJECTIVE
from rayedit.locate.sweep import has_grid, rank_campaign, ranking_table_rows
from rayedit.report.plots import Figure, style
from rayedit.report.tables import Table, slug

ROLES = ("before_subject", "subject_first", "subject_middle", "subject_last", "after_subject", "further", "last")
ROLE_LABELS = {"before_subject": "before subject", "subject_first": "subject first", "subject_middle":
               "subject middle", "subject_last": "subject last", "after_subject": "first after subject",
               "further": "further tokens", "last": "last token"}
KIND_LABELS = {"hidden": "hidden state (block output)", "mlp": "MLP output", "attn": "attention output"}


@dataclass
class LocateSections:
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    summary: list[Table] = field(default_factory=list)  # for the terminal
    html: dict[str, str] = field(default_factory=dict)  # campaign id → HTML of its locate sections


# --- trace ------------------------------------------------------------------------------------------
def trace_means(rows: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Mean indirect effect per (kind, role, layer), over the known facts when any is known."""
    sel = rows
    rule = "all traced facts"
    if "known" in rows.columns and rows["known"].astype(bool).any():
        sel = rows[rows["known"].astype(bool)]
        rule = "facts the clean model predicts (top-1 = the object's first token)"
    means = sel.groupby(["kind", "role", "layer"], sort=False)["indirect_effect"].mean().reset_index()
    return means, f"{rule}; {sel['case_id'].nunique()} of {rows['case_id'].nunique()} facts"


def _svg(fig: Any) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    start = text.find("<svg")
    return text[start:] if start >= 0 else text


def trace_figure(rows: pd.DataFrame, name: str, title: str, window: list[int] | None) -> Figure:
    """Heatmaps of the mean indirect effect (token group × layer) per kind, and the MLP curve at the
    subject's last token with the suggested window shaded."""
    import matplotlib.pyplot as plt

    means, facts_rule = trace_means(rows)
    kinds = [k for k in ("hidden", "mlp", "attn") if (means["kind"] == k).any()]
    n_layers = int(rows["layer"].max()) + 1
    roles = [r for r in ROLES if (means["role"] == r).any()]
    with style():
        n = len(kinds) + 1
        fig, axes = plt.subplots(1, n, figsize=(3.4 * n + 0.6, 3.0), squeeze=False)
        fig.subplots_adjust(left=0.1, right=0.98, bottom=0.18, top=0.84, wspace=0.55)
        for ax, kind in zip(axes[0], kinds, strict=False):
            grid = [[math.nan] * n_layers for _ in roles]
            sub = means[means["kind"] == kind]
            for r in sub.itertuples(index=False):
                grid[roles.index(r.role)][int(r.layer)] = float(r.indirect_effect)
            # one colour scale per kind (as ROME's figures): MLP effects are much smaller than hidden ones
            vmax = max(1e-9, float(sub["indirect_effect"].max()))
            im = ax.imshow(grid, aspect="auto", cmap="Purples", vmin=0.0, vmax=vmax, interpolation="nearest")
            ax.set_title(f"restore {KIND_LABELS.get(kind, kind)}", loc="left")
            ax.set_xlabel("layer")
            ax.set_xticks(range(n_layers))
            ax.set_yticks(range(len(roles)))
            ax.set_yticklabels([ROLE_LABELS[r] for r in roles] if ax is axes[0][0] else [""] * len(roles))
            ax.grid(False)
            fig.colorbar(im, ax=ax, fraction=0.06, pad=0.03).ax.tick_params(labelsize=7)
        ax = axes[0][-1]
        sub = means[(means["kind"] == "mlp") & (means["role"] == "subject_last")].sort_values("layer")
        if not sub.empty:
            ax.plot(sub["layer"], sub["indirect_effect"], color="#0072B2", marker="o", label="MLP @ subject last")
        hid = means[(means["kind"] == "hidden") & (means["role"] == "subject_last")].sort_values("layer")
        if not hid.empty:
            ax.plot(hid["layer"], hid["indirect_effect"], color="#D55E00", marker="s", linestyle="--",
                    label="hidden @ subject last")
        if window:
            ax.axvspan(min(window) - 0.4, max(window) + 0.4, color="#009E73", alpha=0.15, linewidth=0,
                       label=f"suggested layers {min(window)}–{max(window)}")
        ax.set_xticks(range(n_layers))
        ax.set_xlabel("layer")
        ax.set_ylabel("indirect effect (ΔP)")
        ax.set_title("subject's last token", loc="left")
        ax.legend(loc="best", frameon=False, fontsize=7)
        fig.suptitle(title, x=0.01, ha="left", fontsize=9)
        svg = _svg(fig)
        plt.close(fig)
    caption = (f"Indirect effect = P(object | corrupted subject, one state restored) − P(object | corrupted); "
               f"means over {facts_rule}.")
    return Figure(name, title, caption, svg)


def trace_table(cid: str, rows: pd.DataFrame, summary: dict[str, Any] | None) -> Table:
    means, facts_rule = trace_means(rows)
    n_layers = int(rows["layer"].max()) + 1
    out: list[list[Any]] = []
    for kind in ("hidden", "mlp", "attn"):
        for role in ("subject_last", "last"):
            sub = means[(means["kind"] == kind) & (means["role"] == role)]
            if sub.empty:
                continue
            vals = dict(zip(sub["layer"].astype(int), sub["indirect_effect"].astype(float), strict=True))
            out.append([kind, ROLE_LABELS[role], *[vals.get(i, math.nan) for i in range(n_layers)]])
    first = rows.iloc[0]
    note = [f"Mean indirect effect (probability of the true object, restored − corrupted) over {facts_rule}; "
            f"noise ν = {float(first['noise']):.4g} ({first.get('noise_rule') or 'given'}), "
            f"{int(first['samples'])} noise draws per fact, window {int(first['window'])}."]
    if summary and summary.get("suggestion"):
        sug = summary["suggestion"]
        note.append(f"Suggested edit layers {sug['layers']}: {sug['rule']}.")
    return Table(f"{cid}--trace", f"{cid}: causal trace (mean indirect effect per layer)",
                 ["kind", "token", *[f"L{i}" for i in range(n_layers)]], out, note=" ".join(note))


# --- scan -------------------------------------------------------------------------------------------
def scan_table(cid: str, summary: dict[str, Any]) -> Table:
    rows = []
    for r in summary.get("ranking", []):
        rows.append([r["rank"], r["candidate"], r.get("method"), 100 * _f(r.get("efficacy_success")),
                     100 * _f(r.get("paraphrase_success")), 100 * _f(r.get("neighborhood_success")),
                     _f(r.get("objective_value")), _f(r.get("target_nll")), _f(r.get("delta_norm")),
                     _f(r.get("update_fro_mean")), r.get("status")])
    return Table(f"{cid}--scan", f"{cid}: layer scan ({summary.get('n_records')} held-out facts per candidate)",
                 ["rank", "layers", "method", "Eff. (%)", "Gen. (%)", "Spe. (%)",
                  f"objective: {summary.get('objective')}", "target NLL", "‖δ‖", "‖ΔW‖_F", "status"], rows,
                 note=f"Each candidate edits the same facts from the base weights; ranked by "
                      f"{summary.get('statement')}. ‖ΔW‖_F: mean over the candidate's layers.")


def _f(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


# --- sweep ranking ----------------------------------------------------------------------------------
def ranking_table(camp: Any, objective: str = DEFAULT_OBJECTIVE) -> Table | None:
    ranking = rank_campaign(camp, objective)
    if not ranking.ranked:
        return None
    headers, rows = ranking_table_rows(ranking)
    note = ranking.rule[0].upper() + ranking.rule[1:] + "."
    if ranking.notes:
        note += " " + " ".join(n[0].upper() + n[1:] + "." for n in ranking.notes)
    note += f" `rayedit presets rank {camp.cid}` writes the winner as a preset."
    return Table(f"{camp.cid}--sweep-ranking", f"{camp.cid}: configurations ranked ({ranking.objective.name})",
                 headers, rows, note=note)


# --- assembly ---------------------------------------------------------------------------------------
def _img(svg: str, alt: str) -> str:
    b64 = base64.b64encode(svg.encode("utf-8")).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/svg+xml;base64,{b64}">'


def locate_sections(store: Any, camps: list[Any]) -> LocateSections:
    """Trace, scan and sweep-ranking sections of every campaign that has them."""
    out = LocateSections()
    for camp in camps:
        cid = camp.cid
        h: list[str] = []
        if parts.has_parts(store, cid, "trace"):
            table = parts.read_table(store, cid, "trace")
            assert table is not None
            rows = table.select([c for c in ("case_id", "kind", "layer", "role", "indirect_effect", "known",
                                             "noise", "noise_rule", "samples", "window", "model")
                                 if c in table.column_names]).to_pandas()
            summary = parts.read_json(store, parts.summary_key(cid, "trace"))
            window = (summary or {}).get("suggestion", {}).get("layers")
            model = str(rows["model"].iloc[0]) if "model" in rows.columns else cid
            fig = trace_figure(rows, f"{slug(cid)}--trace", f"{model}: causal trace", window)
            tt = trace_table(cid, rows, summary)
            out.figures.append(fig)
            out.tables.append(tt)
            h += ["<h3>Causal trace</h3>", f"<div class='figs'><figure>{_img(fig.svg, fig.title)}<figcaption>"
                  f"{html.escape(fig.caption)}</figcaption></figure></div>", tt.to_html()]
        if parts.has_parts(store, cid, "scan"):
            summary = parts.read_json(store, parts.summary_key(cid, "scan"))
            if summary is None:  # parts without the driver's summary (interrupted): rank them here
                from rayedit.locate.scan import summarize_scan

                table = parts.read_table(store, cid, "scan")
                assert table is not None
                ranking = summarize_scan(table.to_pylist())
                summary = {"ranking": ranking, "objective": ranking[0]["objective"],
                           "statement": ranking[0]["objective_statement"],
                           "n_records": ranking[0]["n_records"]}
            st = scan_table(cid, summary)
            out.tables.append(st)
            out.summary.append(st)
            h += ["<h3>Layer scan</h3>", st.to_html()]  # ranked already; ties would bold arbitrarily
        if has_grid(camp.spec or {}):
            rt = ranking_table(camp)
            if rt is not None:
                out.tables.append(rt)
                out.summary.append(rt)
                obj_col = next(i for i, hd in enumerate(rt.headers) if hd.startswith("objective:"))
                h += ["<h3>Sweep ranking</h3>", rt.to_html({obj_col: "max"})]
        if h:
            out.html[cid] = "\n".join(h)
    return out
