"""Health policy: stop or flag a stream whose edits degrade the model past the spec's bounds.

Events are small JSON objects under ``<stream>/health/`` written with ``put_if_absent`` (one per step and
check), so a re-run never duplicates them and a resumed campaign sees every earlier decision: a stream
stopped by its policy stays stopped. No Ray here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from rayedit.runtime.spec import EFFICACY_METRIC, CampaignSpec, HealthSpec
from rayedit.store import Store, eval_parts_done
from rayedit.store.layout import eval_part_keys, stream_prefix


@dataclass(frozen=True)
class HealthEvent:
    sid: str
    step: int
    check: str  # max_weight_growth | max_condition_number | min_efficacy | min_fluency
    value: float
    bound: float
    action: str  # stop | flag

    def describe(self, edits_after: Callable[[int], int] | None = None) -> str:
        """One line; with ``edits_after`` (``CampaignSpec.edits_after``) it says when in edits, as ``at:`` does."""
        rel = ">" if self.check.startswith("max_") else "<"
        verb = "stopped" if self.action == "stop" else "flagged"
        when = f"after {edits_after(self.step)} edits (step {self.step + 1})" if edits_after is not None \
            else f"at step {self.step + 1}"
        return (f"{self.sid}: {verb} {when}: {self.check.removeprefix('max_').removeprefix('min_')} "
                f"{self.value:.4g} {rel} bound {self.bound:.4g}")


def _key(cid: str, sid: str, step: int, check: str) -> str:
    return f"{stream_prefix(cid, sid)}/health/{step:06d}-{check}.json"


def _violations(h: HealthSpec, sid: str, step: int, values: dict[str, float | None]) -> list[HealthEvent]:
    out = []
    for check, value in values.items():
        bound = getattr(h, check)
        if bound is None or value is None:
            continue
        bad = (value > bound or math.isnan(value)) if check.startswith("max_") else (value < bound or math.isnan(value))
        if bad:
            out.append(HealthEvent(sid, step, check, float(value), float(bound), h.action))
    return out


def check_step(h: HealthSpec | None, sid: str, step: int, max_weight_growth: float | None,
               max_condition_number: float | None) -> list[HealthEvent]:
    """Weight bounds of a committed step (values from its diagnostics)."""
    if h is None:
        return []
    return _violations(h, sid, step, {"max_weight_growth": max_weight_growth,
                                      "max_condition_number": max_condition_number})


def eval_means(store: Store, cid: str, sid: str, step: int, suites: list[str]) -> dict[str, float]:
    """Mean efficacy (over the efficacy-bearing suites) and fluency of a step's committed evaluation parts."""
    sums: dict[str, list[float]] = {"min_efficacy": [], "min_fluency": []}
    for suite in suites:
        metric = EFFICACY_METRIC.get(suite) or ("fluency" if suite == "generation" else None)
        if metric is None or not eval_parts_done(store, cid, sid, step, suite):
            continue
        check = "min_fluency" if suite == "generation" else "min_efficacy"
        for key in eval_part_keys(store, cid, sid, step, suite):
            tbl = store.read_parquet(key)
            if metric not in tbl.column_names:
                continue
            sums[check] += [float(v) for v in tbl.column(metric).to_pylist() if v is not None]
    return {k: sum(v) / len(v) for k, v in sums.items() if v}


def check_eval(spec: CampaignSpec, store: Store, sid: str, step: int) -> list[HealthEvent]:
    """Efficacy/fluency bounds of a step whose evaluation shards are all committed."""
    h, ev = spec.health, spec.evaluation
    if h is None or ev is None or (h.min_efficacy is None and h.min_fluency is None):
        return []
    means = eval_means(store, spec.campaign_id, sid, step, list(ev.suites))
    return _violations(h, sid, step, {"min_efficacy": means.get("min_efficacy"),
                                      "min_fluency": means.get("min_fluency")})


def record(store: Store, cid: str, events: list[HealthEvent]) -> list[HealthEvent]:
    """Write events; returns those this call wrote (an event already recorded by an earlier run is not new)."""
    new = []
    for e in events:
        if store.put_if_absent(_key(cid, e.sid, e.step, e.check), json.dumps(asdict(e), sort_keys=True).encode()):
            new.append(e)
    return new


def stream_events(store: Store, cid: str, sid: str) -> list[HealthEvent]:
    out = []
    for key in store.list(f"{stream_prefix(cid, sid)}/health"):
        if key.endswith(".json"):
            try:
                out.append(HealthEvent(**json.loads(store.get_bytes(key))))
            except (ValueError, TypeError):  # a foreign object in the folder is not an event
                continue
    return sorted(out, key=lambda e: (e.step, e.check))


def stopped_at(store: Store, cid: str, sid: str) -> HealthEvent | None:
    """The first stop event of a stream, if its policy stopped it."""
    return next((e for e in stream_events(store, cid, sid) if e.action == "stop"), None)


def summary(events: list[HealthEvent]) -> dict[str, Any]:
    return {"events": len(events), "stopped": any(e.action == "stop" for e in events)}
