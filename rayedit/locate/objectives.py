"""Ranking objectives for layer scans and hyperparameter sweeps (plain Python: reports use them too).

An objective combines per-configuration means of protocol metrics (success rates in [0, 1]) into one
number, larger is better. Its ``statement`` is written next to every ranking and into presets, so a
reader knows exactly what "best" meant.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Objective:
    name: str
    protocol: str
    metrics: tuple[str, ...]
    combine: str  # "product" | "hmean"
    statement: str

    def value(self, means: Mapping[str, float]) -> float:
        """The objective from metric means in [0, 1]; NaN when a metric is missing."""
        vals = [float(means.get(m, math.nan)) for m in self.metrics]
        if any(math.isnan(v) for v in vals):
            return math.nan
        if self.combine == "product":
            out = 1.0
            for v in vals:
                out *= v
            return out
        if any(v <= 0 for v in vals):
            return 0.0
        return len(vals) / sum(1.0 / v for v in vals)


OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Objective("efficacy_x_neighborhood", "counterfact-prob/v1", ("efficacy_success", "neighborhood_success"),
              "product", "efficacy success × neighbourhood success (counterfact-prob/v1 means over the "
                         "evaluated records, 0–1)"),
    Objective("efficacy_x_paraphrase_x_neighborhood", "counterfact-prob/v1",
              ("efficacy_success", "paraphrase_success", "neighborhood_success"), "product",
              "efficacy × paraphrase × neighbourhood success (counterfact-prob/v1 means, 0–1)"),
    Objective("score", "counterfact-prob/v1", ("efficacy_success", "paraphrase_success", "neighborhood_success"),
              "hmean", "harmonic mean of efficacy, paraphrase and neighbourhood success (counterfact-prob/v1 "
                       "Score, 0–1)"),
    Objective("zsre_efficacy_x_specificity", "zsre-token-acc/v1", ("efficacy", "specificity"), "product",
              "ZsRE efficacy × specificity (zsre-token-acc/v1 token accuracy means, 0–1)"),
)}
DEFAULT_OBJECTIVE = "efficacy_x_neighborhood"


def get_objective(name: str) -> Objective:
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}") from None
