"""Assemble a report (tables, figures, one self-contained HTML page) and write it to a folder or the store."""

from __future__ import annotations

import base64
import datetime as _dt
import html
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rayedit.faults import fault_point
from rayedit.report.audit import AuditParts, audit_parts
from rayedit.report.curves import CurveSpec, all_curves
from rayedit.report.load import CampaignData, load_campaign
from rayedit.report.locate import locate_sections
from rayedit.report.plots import Figure, colour_key_svg, curve_figure, method_colours, style
from rayedit.report.tables import (
    HEADLINE,
    EvalScales,
    Table,
    all_metrics_rows,
    datasets_of,
    diagnostics_table,
    eval_table,
    progress_table,
    rows_to_csv,
    slug,
)
from rayedit.store import Store, open_store, sanitize_id
from rayedit.store.layout import campaign_prefix

log = logging.getLogger(__name__)

REPORT_DIR = "report"


@dataclass
class Report:
    campaigns: list[CampaignData]
    progress: list[Table]
    tables: list[Table]  # paper-style (evaluation) and editing diagnostics tables
    summary: list[Table]  # what the terminal shows: evaluation tables, else editing diagnostics
    figures: list[Figure]
    extra_csv: dict[str, str]  # tables/<name>.csv that are not Tables (long formats)
    html: str
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)

    def files(self) -> dict[str, bytes]:
        out: dict[str, bytes] = {"report.html": self.html.encode("utf-8")}
        for t in [*self.progress, *self.tables]:
            out[f"tables/{t.name}.csv"] = t.to_csv().encode("utf-8")
            out[f"tables/{t.name}.md"] = t.to_markdown().encode("utf-8")
        for name, text in self.extra_csv.items():
            out[f"tables/{name}.csv"] = text.encode("utf-8")
        for f in self.figures:
            out[f"figures/{f.name}.svg"] = f.svg.encode("utf-8")
        return out


def build_report(store: Store, cids: Sequence[str]) -> Report:
    """Read the campaigns' committed results and build every table, figure and the HTML page."""
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    camps = [load_campaign(store, cid) for cid in cids]
    timings["read"] = time.perf_counter() - t0
    scales = EvalScales.from_frames([c.evals for c in camps])
    progress = [progress_table(c) for c in camps]
    tables: list[Table] = []
    summary: list[Table] = []
    for c in camps:
        for d in datasets_of(c):
            ev = eval_table(c, d, scales)
            diag = diagnostics_table(c, d)
            tables += [t for t in (ev, diag) if t is not None]
            summary.append(ev if ev is not None else diag)
    extra: dict[str, str] = {}
    for c in camps:
        rows = all_metrics_rows(c, scales)
        if rows:
            extra[f"{c.cid}--eval-metrics"] = rows_to_csv(rows)
    t1 = time.perf_counter()
    curves, specs = all_curves(camps, scales)
    if not curves.empty:
        extra["curves"] = curves.to_csv(index=False, lineterminator="\n")
    colours = method_colours(s.method_label for c in camps for s in c.streams)
    figures, groups = _figures(curves, specs, [c.cid for c in camps], colours)
    timings["plots"] = time.perf_counter() - t1
    loc = locate_sections(store, camps)  # trace, layer scan and sweep ranking (rayedit.report.locate)
    try:  # what the edits cost (rayedit.report.audit); a malformed audit part must not cost the whole report
        aud = audit_parts(store, [c.cid for c in camps], colours)
    except (KeyError, ValueError, TypeError) as exc:
        log.warning("audit section skipped: %s: %s", type(exc).__name__, exc)
        aud = AuditParts()
    sections = {cid: aud.html.get(cid, "") + loc.html.get(cid, "") for cid in set(aud.html) | set(loc.html)}
    page = render_html(camps, progress, tables, figures, groups, colours, store.uri, sections)
    rep = Report(camps, progress, tables + aud.tables + loc.tables, summary + loc.summary,
                 figures + aud.figures + loc.figures, extra, page, timings=timings)
    rep.seconds = time.perf_counter() - t0
    return rep


def _figures(curves, specs: list[CurveSpec], cids: list[str], colours: dict[str, str]
             ) -> tuple[list[Figure], list[tuple[str, str, list[tuple[str, Figure]]]]]:
    """Figures per (model, dataset) group, each metric one row of per-campaign panels."""
    figures: list[Figure] = []
    groups: list[tuple[str, str, list[tuple[str, Figure]]]] = []
    if curves.empty:
        return figures, groups
    with style():
        for (model, dataset), g in curves.groupby(["model", "dataset"], sort=False):
            groups.append(_group_figures(str(model), str(dataset), g, specs, cids, colours, figures))
    return figures, groups


def _group_figures(model: str, dataset: str, g, specs: list[CurveSpec], cids: list[str], colours: dict[str, str],
                   figures: list[Figure]) -> tuple[str, str, list[tuple[str, Figure]]]:
    in_group = [c for c in cids if (g["campaign"] == c).any()]
    items: list[tuple[str, Figure]] = []
    for spec in specs:
        data = g[g["metric"] == spec.mid]
        if data.empty or data["mean"].isna().all():
            continue
        name = f"{slug(str(model))}--{slug(str(dataset))}--{slug(spec.mid.replace(':', '-'))}"
        fig = curve_figure(data, spec, in_group, colours, name, spec.metric.axis)
        figures.append(fig)
        items.append((spec.section, fig))
    return model, dataset, items


# --- HTML -----------------------------------------------------------------------------------------
_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"DejaVu Sans",Arial,sans-serif;margin:24px auto;max-width:1400px;
color:#222;padding:0 16px;line-height:1.4}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
h3{margin-top:1.2em}.meta{color:#666;font-size:.9em}
table.t{border-collapse:collapse;margin:.6em 0 .2em;font-size:.88em}
table.t caption{text-align:left;font-weight:600;padding-bottom:.3em}
table.t th,table.t td{border-bottom:1px solid #e3e3e3;padding:3px 9px;text-align:left;white-space:nowrap}
table.t th{border-bottom:2px solid #999}table.t td.num{text-align:right;font-variant-numeric:tabular-nums}
.note{color:#666;font-size:.82em;margin:.1em 0 1em;max-width:1000px}
.figs{display:flex;flex-wrap:wrap;gap:14px}figure{margin:0;border:1px solid #eee;padding:6px;background:#fff}
figure img{display:block;max-width:100%}figcaption{font-size:.78em;color:#666;max-width:330px}
.bar{display:inline-block;width:120px;height:9px;background:#eee;border-radius:4px;vertical-align:middle}
.bar span{display:block;height:9px;background:#0072B2;border-radius:4px}
pre{background:#f6f6f6;padding:10px;overflow:auto;font-size:.82em}
.badge{display:inline-block;padding:1px 8px;border-radius:9px;font-size:.8em;color:#fff}
.run{background:#E69F00}.fin{background:#009E73}
"""


def _bars(camp: CampaignData) -> str:
    out = ['<table class="t"><thead><tr><th>stream</th><th>progress (committed steps)</th><th></th></tr></thead>'
           "<tbody>"]
    for s in camp.streams:
        frac = 0.0 if not s.total_steps else min(1.0, len(s.steps) / s.total_steps)
        total = "?" if s.total_steps is None else s.total_steps
        out.append(f"<tr><td>{html.escape(s.model)} · {html.escape(s.method_label)} · {html.escape(s.dataset)}"
                   f" · seed {s.seed}</td><td><span class='bar'><span style='width:{100 * frac:.0f}%'></span>"
                   f"</span></td><td class='num'>{len(s.steps)}/{total} steps · {s.edits_done} edits</td></tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _best(t: Table) -> dict[int, str]:
    """Columns whose best value is bolded: the known success/accuracy metrics and Score (higher is better)."""
    if not t.name.endswith("--eval"):
        return {}
    better = {label for rows in HEADLINE.values() for _, label, _ in rows} - {"Flu. (bits)"}
    return {i: "max" for i, h in enumerate(t.headers)
            if i >= 3 and (h.split(" [")[0] in better or h.startswith("Score"))}


def _img(svg: str, alt: str) -> str:
    b64 = base64.b64encode(svg.encode("utf-8")).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/svg+xml;base64,{b64}">'


def render_html(camps: list[CampaignData], progress: list[Table], tables: list[Table], figures: list[Figure],
                groups: list[tuple[str, str, list[tuple[str, Figure]]]], colours: dict[str, str],
                store_uri: str, extra_html: dict[str, str] | None = None) -> str:
    cids = [c.cid for c in camps]
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    h: list[str] = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
                    "<meta name='viewport' content='width=device-width, initial-scale=1'>",
                    f"<title>rayedit report · {html.escape(', '.join(cids))}</title><style>{_CSS}</style></head><body>",
                    f"<h1>rayedit report: {html.escape(', '.join(cids))}</h1>",
                    f"<p class='meta'>Store <code>{html.escape(store_uri)}</code> · generated {now} · committed "
                    "steps and committed evaluation parts only.</p>",
                    "<p class='meta'>Method colours (the same in every plot):</p>", colour_key_svg(colours),
                    "<ul>"]
    h += [f"<li><a href='#c-{html.escape(c)}'>campaign {html.escape(c)}</a></li>" for c in cids]
    h.append("<li><a href='#curves'>curves against the number of edits</a></li></ul>")
    for camp, prog in zip(camps, progress, strict=True):
        badge = "<span class='badge fin'>finished</span>" if camp.finished else \
            "<span class='badge run'>running / incomplete</span>"
        h.append(f"<h2 id='c-{html.escape(camp.cid)}'>Campaign {html.escape(camp.cid)} {badge}</h2>")
        h.append(_bars(camp))
        h.append(prog.to_html())
        for t in tables:
            if t.name.startswith(f"{camp.cid}--"):
                h.append(t.to_html(_best(t)))
        h.append((extra_html or {}).get(camp.cid, ""))  # locate sections of this campaign
        h.append(f"<details><summary>Frozen spec (<code>campaigns/{html.escape(camp.cid)}/spec.yaml</code>)"
                 f"</summary><pre>{html.escape(camp.spec_text or '(no spec found)')}</pre></details>")
    h.append("<h2 id='curves'>Curves against the number of edits</h2>")
    if not groups:
        h.append("<p>No committed steps yet.</p>")
    h.append("<p class='note'>x: edits committed so far in the stream (cumulative). Several campaigns are drawn "
             "side by side with shared axes. Evaluation metrics are means over the records evaluated at that "
             "step; editing diagnostics come from edits.parquet.</p>")
    for model, dataset, items in groups:
        h.append(f"<h3>{html.escape(model)} · {html.escape(dataset)}</h3>")
        for section, title in (("evaluation", "Evaluation"), ("editing", "Editing and edited matrices")):
            figs = [f for s, f in items if s == section]
            if not figs:
                continue
            h.append(f"<h4>{title}</h4><div class='figs'>")
            for f in figs:
                h.append(f"<figure>{_img(f.svg, f.title)}<figcaption>{html.escape(f.title)} — "
                         f"{html.escape(f.caption)}</figcaption></figure>")
            h.append("</div>")
    h.append("</body></html>")
    return "\n".join(h)


# --- writing --------------------------------------------------------------------------------------
def default_location(cids: Sequence[str]) -> str:
    """Store key prefix of a report: ``campaigns/<cid>/report`` (several: a ``compare--…`` sub-folder)."""
    base = f"{campaign_prefix(cids[0])}/{REPORT_DIR}"
    if len(cids) == 1:
        return base
    return f"{base}/{sanitize_id('compare--' + '--'.join(cids[1:]))}"


def write_report(rep: Report, store: Store, cids: Sequence[str], out: str | Path | None = None) -> str:
    """Write every file of ``rep``; returns where (a store URI + prefix or a local folder).

    ``out=None``: into the store (``default_location``) through the Store API, so S3 works too.
    ``out`` with ``://``: another store, written at its root. Otherwise a local folder.
    """
    files = rep.files()
    if out is None:
        prefix = default_location(cids)
        for key, data in files.items():
            fault_point("report")  # fault matrix (rayedit/faults.py): while the final report is written
            store.put_bytes(f"{prefix}/{key}", data)
        return f"{store.uri.rstrip('/')}/{prefix}"
    if "://" in str(out):
        target = open_store(str(out))
        for key, data in files.items():
            target.put_bytes(key, data)
        return target.uri
    folder = Path(out)
    for key, data in files.items():
        p = folder / key
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return str(folder.resolve())


def make_report(store: Store | str, cids: Sequence[str], out: str | Path | None = None) -> tuple[Report, str]:
    """Build and write a report (what ``rayedit report`` and the end of ``run``/``resume`` call)."""
    st = open_store(store, create=False) if isinstance(store, str) else store
    rep = build_report(st, cids)
    where = write_report(rep, st, cids, out)
    return rep, where
