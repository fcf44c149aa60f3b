"""Rank the configurations of a campaign (hyperparameter grids → streams) by a stated objective.

A spec method with a ``grid`` expands into one stream per combination (``MethodSpec.variants`` in
``rayedit.runtime.spec``; the same rule is applied here to the frozen spec's plain YAML, so this module
needs neither the runtime nor torch). For every (model, method variant) the evaluation rows of its
streams at their **last evaluated committed step** (or at a given number of edits) are pooled, the
objective's metrics are averaged over records (0–1), and configurations are ranked, best first. The
winner becomes a preset (``rayedit.locate.presets``) with the campaign id, objective and score as
provenance.

Input is duck-typed (``rayedit.report.load.CampaignData``: ``cid``, ``spec`` dict, ``streams`` with
``sid/model/method/method_label``, and ``evals`` rows with ``stream``, ``step``, ``protocol``,
``n_edited`` and metric columns), so the report and the CLI share this code.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import json
import math
from dataclasses import dataclass, field
from typing import Any

from .objectives import DEFAULT_OBJECTIVE, Objective, get_objective

RANKING_RULE = ("configurations ranked by {statement}, computed over the pooled evaluation records of their "
                "streams at {where}; ties keep the spec's order")


@dataclass(frozen=True)
class Config:
    """One configuration of a campaign: a method variant on a model (all its datasets and seeds)."""

    model: str
    method: str
    label: str
    hparams: dict[str, Any]
    grid: dict[str, Any]  # the grid values that make this variant (empty for a method without a grid)


def method_variants(method: dict[str, Any]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(label, overrides, grid values) per combination, as ``MethodSpec.variants`` names them."""
    name = str(method.get("name"))
    base = dict(method.get("hparams") or {})
    grid = method.get("grid") or {}
    if not grid:
        return [(name, base, {})]
    keys = sorted(grid)
    out = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        values = dict(zip(keys, combo, strict=True))
        label = name + "".join(f"-{k}={json.dumps(v)}" for k, v in values.items())
        out.append((label, base | values, values))
    return out


def campaign_configs(spec: dict[str, Any]) -> list[Config]:
    """Every configuration of a (frozen) spec, in spec order; ``stats_samples`` applied as the runtime does."""
    out: list[Config] = []
    samples = spec.get("stats_samples")
    for m in spec.get("models") or []:
        for meth in spec.get("methods") or []:
            for label, hp, values in method_variants(meth):
                if samples is not None and meth.get("name") != "ft":
                    hp = {"mom2_n_samples": samples} | hp
                out.append(Config(str(m["name"]), str(meth["name"]), label, hp, values))
    return out


def has_grid(spec: dict[str, Any]) -> bool:
    return any(meth.get("grid") for meth in spec.get("methods") or [])


@dataclass
class RankedConfig:
    config: Config
    means: dict[str, float]
    value: float
    n_records: int
    n_edits: list[int]  # edits made by the evaluated step(s) (one value when all streams agree)
    streams: int
    evaluated: bool
    rank: int | None = None

    def row(self) -> dict[str, Any]:
        c = self.config
        return {"rank": self.rank, "model": c.model, "method": c.method, "config": c.label, **c.grid,
                **self.means, "objective_value": self.value, "n_records": self.n_records,
                "n_edits": (self.n_edits[0] if len(self.n_edits) == 1 else
                            f"{min(self.n_edits)}–{max(self.n_edits)}" if self.n_edits else None),
                "streams": self.streams}


@dataclass
class SweepRanking:
    cid: str
    objective: Objective
    rule: str
    ranked: list[RankedConfig]
    grid_keys: list[str]
    notes: list[str] = field(default_factory=list)

    def models(self) -> list[str]:
        return list(dict.fromkeys(r.config.model for r in self.ranked))

    def for_model(self, model: str) -> list[RankedConfig]:
        return [r for r in self.ranked if r.config.model == model]

    def winner(self, model: str | None = None) -> RankedConfig:
        models = self.models()
        if model is None:
            if len(models) != 1:
                raise ValueError(f"campaign {self.cid} has {len(models)} models ({', '.join(models)}): "
                                 "say which one the preset is for")
            model = models[0]
        cands = [r for r in self.for_model(model) if r.evaluated and not math.isnan(r.value)]
        if not cands:
            raise ValueError(f"campaign {self.cid}: no configuration of model {model!r} has evaluation rows of "
                             f"{self.objective.protocol} yet (is the campaign finished and evaluated?)")
        return min(cands, key=lambda r: r.rank or 0)

    def rows(self) -> list[dict[str, Any]]:
        return [r.row() for r in self.ranked]


def _num(v: Any) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return math.nan
    return x


def rank_campaign(camp: Any, objective: str = DEFAULT_OBJECTIVE, *, edits: int | None = None) -> SweepRanking:
    """Rank every configuration of a loaded campaign (see the module docstring). ``edits``: rank at the
    step where that many edits had been made instead of each stream's last evaluated step."""
    obj = get_objective(objective)
    spec = camp.spec or {}
    configs = campaign_configs(spec)
    if not configs:  # no spec in the store: one configuration per method label found in the streams
        seen: dict[tuple[str, str], Config] = {}
        for s in camp.streams:
            seen.setdefault((s.model, s.method_label), Config(s.model, s.method, s.method_label, {}, {}))
        configs = list(seen.values())
    evals = camp.evals
    have = evals is not None and not evals.empty and "protocol" in evals.columns
    rows = evals[evals["protocol"] == obj.protocol] if have else None
    where = (f"the step where {edits} edits had been made" if edits is not None
             else "each stream's last evaluated committed step")
    ranked: list[RankedConfig] = []
    notes: list[str] = []
    for c in configs:
        sids = [s.sid for s in camp.streams if s.model == c.model and s.method_label == c.label]
        sel = None
        if rows is not None and sids:
            g = rows[rows["stream"].isin(sids)]
            if edits is not None and "n_edited" in g.columns:
                g = g[g["n_edited"] == edits]
            elif not g.empty:
                last = g.groupby("stream")["step"].transform("max")
                g = g[g["step"] == last]
            sel = g if not g.empty else None
        if sel is None:
            ranked.append(RankedConfig(c, {m: math.nan for m in obj.metrics}, math.nan, 0, [], len(sids), False))
            continue
        means = {}
        for m in obj.metrics:
            vals = [_num(v) for v in sel[m]] if m in sel.columns else []
            vals = [v for v in vals if not math.isnan(v)]
            means[m] = sum(vals) / len(vals) if vals else math.nan
        n_ed = sorted({int(v) for v in sel["n_edited"]}) if "n_edited" in sel.columns else []
        ranked.append(RankedConfig(c, means, obj.value(means), len(sel), n_ed, int(sel["stream"].nunique()), True))
    # rank within each model: measured configurations by value (desc), then the unmeasured, spec order kept
    for model in dict.fromkeys(r.config.model for r in ranked):
        group = [r for r in ranked if r.config.model == model]
        order = sorted(range(len(group)), key=lambda i: (not group[i].evaluated or math.isnan(group[i].value),
                                                         -(0.0 if math.isnan(group[i].value) else group[i].value), i))
        for pos, i in enumerate(order, start=1):
            group[i].rank = pos
    edits_seen = {tuple(r.n_edits) for r in ranked if r.evaluated}
    if len(edits_seen) > 1:
        notes.append("configurations were evaluated after different numbers of edits (an unfinished campaign?); "
                     "their values are not directly comparable")
    missing = [r.config.label for r in ranked if not r.evaluated]
    if missing:
        notes.append(f"not evaluated yet: {', '.join(missing)}")
    model_order = list(dict.fromkeys(r.config.model for r in ranked))
    ranked.sort(key=lambda r: (model_order.index(r.config.model), r.rank or 0))
    grid_keys = sorted({k for c in configs for k in c.grid})
    return SweepRanking(str(camp.cid), obj, RANKING_RULE.format(statement=obj.statement, where=where), ranked,
                        grid_keys, notes)


def preset_dict(ranking: SweepRanking, model: str | None = None, *, source: str = "sweep",
                stats_corpus: str | None = None, store: str | None = None,
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The winner of ``ranking`` as a preset mapping (validate and write it with ``rayedit.locate.presets``)."""
    win = ranking.winner(model)
    c = win.config
    prov: dict[str, Any] = {
        "campaign": ranking.cid, "objective": ranking.objective.name, "statement": ranking.rule,
        "score": float(win.value), "config": c.label, "metrics": {k: float(v) for k, v in win.means.items()},
        "n_edits": win.n_edits[-1] if win.n_edits else None, "n_records": win.n_records, "source": source,
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "ranking": [{"config": r.config.label, "rank": r.rank, "score": None if math.isnan(r.value) else r.value}
                    for r in ranking.for_model(c.model)],
    }
    if store:
        prov["store"] = store
    prov.update(extra or {})
    return {"format": "rayedit-preset/v1", "method": c.method, "model": c.model, "hparams": dict(c.hparams),
            "stats_corpus": stats_corpus, "provenance": prov}


def ranking_table_rows(ranking: SweepRanking, digits: int = 4) -> tuple[list[str], list[list[Any]]]:
    """(headers, rows) for reports: rank, model, config, grid values, metric means (%), objective, edits."""
    metrics = list(ranking.objective.metrics)
    headers = ["rank", "model", "configuration", *ranking.grid_keys, *[f"{m} (%)" for m in metrics],
               f"objective: {ranking.objective.name}", "edits", "records"]
    out: list[list[Any]] = []
    for r in ranking.ranked:
        row: list[Any] = [r.rank, r.config.model, r.config.label]
        row += [json.dumps(r.config.grid[k]) if k in r.config.grid else "–" for k in ranking.grid_keys]
        row += [100.0 * r.means.get(m, math.nan) for m in metrics]
        row.append(round(r.value, digits) if not math.isnan(r.value) else math.nan)
        row.append(r.row()["n_edits"] if r.evaluated else "–")
        row.append(r.n_records)
        out.append(row)
    return headers, out
