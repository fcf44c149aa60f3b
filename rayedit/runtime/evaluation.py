"""Evaluation shards: which (committed step × suite × record range) a campaign evaluates, and running one.

A shard is plain data (it crosses the Ray boundary). Running it on a replica swaps the step's edited
tensors into the replica's base copy (never a reload), evaluates the record range with
``rayedit.evaluate.evaluate_records``, puts the replica's previous weights back, and commits the
Parquet part with its ``.done`` marker last. A shard whose marker exists is skipped, so a re-run
(resume, retry after an actor restart) never writes or counts a part twice.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from rayedit.faults import fault_point
from rayedit.models.gguf import source_label
from rayedit.runtime.spec import CampaignSpec

# test-only fault injection: seconds a replica sleeps inside a shard (so a test can kill it mid-shard)
FAULT_SLEEP_ENV = "RAYEDIT_FAULT_EVAL_SLEEP_S"


@dataclass(frozen=True)
class EvalShard:
    cid: str
    sid: str
    step: int
    suite: str
    shard: int
    start: int  # record range [start, stop) in the stream's edit order
    stop: int
    n_edited: int  # edits made once ``step`` is committed: records[:n_edited] is what the step has seen
    scope: str
    record_kind: str
    keep_raw: bool
    columns: dict[str, Any] = field(default_factory=dict)  # model/method/dataset/seed: identity columns

    @property
    def key(self) -> tuple[str, int, str, int]:
        return (self.sid, self.step, self.suite, self.shard)


def step_ranges(spec: CampaignSpec, step: int) -> list[tuple[int, int, int]]:
    """(shard, start, stop) of one committed step: all edits so far (retention) or only the step's batch."""
    ev = spec.evaluation
    assert ev is not None
    n = spec.edits_after(step)
    lo = 0 if ev.scope == "edited_so_far" else spec.edits_after(step - 1) if step > 0 else 0
    return [(i, a, min(a + ev.shard_size, n)) for i, a in enumerate(range(lo, n, ev.shard_size))]


def plan_shards(spec: CampaignSpec, sid: str, step: int, record_kind: str, columns: dict[str, Any]) -> list[EvalShard]:
    ev = spec.evaluation
    if ev is None or step not in spec.eval_steps():
        return []
    return [EvalShard(spec.campaign_id, sid, step, suite, shard, a, b, spec.edits_after(step), ev.scope, record_kind,
                      ev.keep_raw, columns)
            for suite in ev.suites for shard, a, b in step_ranges(spec, step)]


def decode_records(kind: str, raw: list[dict[str, Any]]) -> list[Any]:
    """Record dicts (model_dump) back to the loaders' record types."""
    from rayedit.data.requests import EditRequest
    from rayedit.data.schema import CounterFactRecord, ZsreRecord

    cls = {"counterfact": CounterFactRecord, "zsre": ZsreRecord, "requests": EditRequest}[kind]
    return [cls.model_validate(r) for r in raw]


def run_shard(runner: Any, shard: EvalShard, records: list[dict[str, Any]]) -> int:
    """Evaluate ``shard`` on a ``StreamRunner``'s model; returns the rows committed (0 if already done)."""
    import pyarrow as pa

    from rayedit.evaluate import evaluate_records
    from rayedit.store import commit_eval_part
    from rayedit.store.layout import eval_done_key

    store = runner.store
    if store.exists(eval_done_key(shard.cid, shard.sid, shard.step, shard.suite, shard.shard)):
        return 0
    recs = decode_records(shard.record_kind, records[: shard.n_edited])
    weights = runner.step_weights(shard.cid, shard.sid, shard.step)
    current = runner.snapshot()  # the replica may be in the middle of another stream: put it back after
    try:
        runner.checkout(weights)
        options: dict[str, Any] = {}
        if shard.suite == "easyedit":
            options["locality_cache"] = runner.locality_cache(recs[shard.start:shard.stop], weights)
        extra = {"campaign": shard.cid, "stream": shard.sid, **shard.columns, "step": shard.step,
                 "n_edited": shard.n_edited, "suite": shard.suite, "scope": shard.scope, "shard": shard.shard,
                 "model_source": source_label(getattr(runner.lm, "source", None))}
        rows = evaluate_records(runner.lm, recs, shard.suite, start=shard.start, stop=shard.stop,
                                keep_raw=shard.keep_raw, extra_columns=extra)
        fault_point("eval-shard")  # fault matrix (rayedit/faults.py): inside an evaluation shard
        delay = float(os.environ.get(FAULT_SLEEP_ENV, "0") or 0)
        if delay:
            time.sleep(delay)
    finally:
        runner.checkout(current)
    for r in rows:  # the identity columns win over same-named metric columns (there are none today)
        r.update(extra)
        r.update(getattr(runner, "where", {}))  # which node ran the shard (node_id, node_ip)
    commit_eval_part(store, shard.cid, shard.sid, shard.step, shard.suite, shard.shard, pa.Table.from_pylist(rows),
                     {"rows": len(rows), "start": shard.start, "stop": shard.stop})
    return len(rows)
