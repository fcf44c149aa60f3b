"""Paper-style figures (matplotlib, Agg backend) as SVG text: one panel per campaign, shared axes.

matplotlib is imported lazily, inside functions, so that importing ``rayedit.report`` stays cheap.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pandas as pd

from rayedit.report.curves import CurveSpec

# Colour-blind-safe palette (Okabe–Ito) first, then matplotlib's tab20 for many methods.
OKABE_ITO = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def method_colours(labels: Iterable[str]) -> dict[str, str]:
    """One colour per method label, stable across every plot of a report (sorted order)."""
    out: dict[str, str] = {}
    extra: list[str] = []
    for i, label in enumerate(sorted(set(labels))):
        if i < len(OKABE_ITO):
            out[label] = OKABE_ITO[i]
        else:
            if not extra:
                from matplotlib import colormaps
                from matplotlib.colors import to_hex

                extra = [to_hex(c) for c in colormaps["tab20"].colors]
            out[label] = extra[(i - len(OKABE_ITO)) % len(extra)]
    return out


@dataclass
class Figure:
    name: str  # file stem under figures/
    title: str
    caption: str
    svg: str


_STYLE = {
    "font.size": 9, "axes.titlesize": 9, "axes.labelsize": 9, "xtick.labelsize": 8, "ytick.labelsize": 8,
    "legend.fontsize": 8, "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True,
    "grid.alpha": 0.3, "grid.linewidth": 0.5, "lines.linewidth": 1.5, "lines.markersize": 3.5,
    "svg.fonttype": "none", "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans", "Helvetica", "Arial", "Liberation Sans", "sans-serif"],
}


def style() -> Any:
    """The plot style as a context manager; wrap every ``curve_figure`` of a report in one of these."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt.rc_context(_STYLE)


def _to_svg(fig: Any) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    start = text.find("<svg")
    return text[start:] if start >= 0 else text


def curve_figure(data: pd.DataFrame, spec: CurveSpec, campaigns: list[str], colours: dict[str, str],
                 name: str, title: str) -> Figure:
    """One row of panels (one per campaign) sharing both axes; a line (+ band) per method.

    Call inside ``style()`` (entering it once per report instead of per figure saves time).
    """
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    n = max(1, len(campaigns))
    # Fixed margins (inches), no constrained layout / tight bbox: each costs a full extra draw.
    width, height, left, right, bottom, top, gap = 3.0 * n + 0.35 * (n - 1) + 1.0, 2.6, 0.85, 0.15, 0.5, 0.3, 0.35
    fig, axes = plt.subplots(1, n, figsize=(width, height), sharex=True, sharey=True, squeeze=False)
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height,
                        top=1 - top / height, wspace=gap / 3.0)
    handles: dict[str, Any] = {}
    labels_all = sorted(colours)
    for ax, cid in zip(axes[0], campaigns, strict=True):
        sub = data[data["campaign"] == cid]
        for label, g in sub.groupby("method_label", sort=True):
            g = g.sort_values("x")
            if spec.metric.percent:  # an interval of a rate never leaves [0, 100]
                g = g.assign(lo=g["lo"].clip(0, 100), hi=g["hi"].clip(0, 100))
            c = colours[str(label)]
            marker = MARKERS[labels_all.index(str(label)) % len(MARKERS)]
            (line,) = ax.plot(g["x"], g["mean"], color=c, marker=marker, label=str(label),
                              markevery=max(1, len(g) // 15))
            handles.setdefault(str(label), line)
            finite = g[["lo", "hi"]].notna().all(axis=1)
            if len(g) > 1 and finite.any() and (g["hi"] - g["lo"]).abs().max() > 0:
                ax.fill_between(g["x"], g["lo"], g["hi"], color=c, alpha=0.15, linewidth=0)
            elif len(g) == 1 and finite.all():
                ax.errorbar(g["x"], g["mean"], yerr=[g["mean"] - g["lo"], g["hi"] - g["mean"]], color=c,
                            capsize=3, linewidth=1)
        ax.set_title(cid, loc="left")
        ax.set_xlabel("number of edits")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
        if spec.metric.log and (sub["mean"] > 0).all() and not sub.empty:
            ax.set_yscale("log")
        if spec.metric.percent:
            ax.set_ylim(-3, 103)
        if sub.empty:
            ax.text(0.5, 0.5, "no data yet", transform=ax.transAxes, ha="center", va="center", color="0.5")
    axes[0][0].set_ylabel(_wrap(spec.metric.axis, 34))
    if handles:
        axes[0][-1].legend(handles.values(), handles.keys(), loc="best", frameon=False, title="method",
                           title_fontsize=8)
    svg = _to_svg(fig)
    plt.close(fig)
    return Figure(name, title, spec.band, svg)


def _wrap(text: str, width: int) -> str:
    words, lines, cur = text.split(" "), [], ""
    for w in words:
        if cur and len(cur) + 1 + len(w) > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}" if cur else w
    lines.append(cur)
    return "\n".join(lines)


def colour_key_svg(colours: dict[str, str]) -> str:
    """A tiny inline legend of the method colours (plain SVG, no matplotlib)."""
    import html

    items = sorted(colours.items())
    h = 18 * max(1, math.ceil(len(items) / 4))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="720" height="{h}" role="img" '
             f'aria-label="method colours">']
    for i, (label, c) in enumerate(items):
        x, y = 180 * (i % 4), 18 * (i // 4)
        parts.append(f'<rect x="{x}" y="{y + 4}" width="18" height="10" fill="{c}"/>'
                     f'<text x="{x + 24}" y="{y + 13}" font-size="12" font-family="sans-serif">'
                     f'{html.escape(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)
