"""Audit shards: what edits cost (general capability, Δ_U, safety, representation shift), per step.

An audit shard is (stream, committed step, audit suite, record range). It runs on any replica of the
stream's base model exactly like an evaluation shard — the step's tensors are swapped into the
replica's base copy — and commits ``eval/<step>/<suite>/part-<shard>.parquet`` with its marker last,
so a re-run never writes a part twice. Suites that compare with the unedited model (uncertainty's Δ_U,
shift) get a ``base`` context under which the same model object carries the base weights; with
``audit.unedited`` each model's unedited weights are also audited once, as the pseudo-stream
``<model>--unedited`` (method ``unedited``, step 0, no edits): the baseline of every comparison.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rayedit.runtime.spec import CampaignSpec, Stream, toyworld_seed

UNEDITED = "unedited"


@dataclass(frozen=True)
class AuditShard:
    cid: str
    sid: str  # the stream, or the model's unedited pseudo-stream
    records_sid: str  # whose edit records feed record-based suites (uncertainty, shift defaults)
    step: int
    suite: str
    shard: int
    start: int
    stop: int
    n_edited: int  # records_sid's first n_edited records are the edits made (0: unedited model)
    record_kind: str
    settings: dict[str, Any]
    world: str | None  # the toy world's folder when the model is a toy-world model
    unedited: bool = False
    columns: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, int, str, int]:
        return (self.sid, self.step, self.suite, self.shard)


def unedited_sid(model: str) -> str:
    from rayedit.store import sanitize_id

    return sanitize_id(f"{model}--{UNEDITED}")


def world_of(model: str) -> str | None:
    seed = toyworld_seed(model)
    if seed is None:
        return None
    from rayedit.runtime.spec import toyworld_dir

    return str(toyworld_dir(seed))


def suite_records(suite: str, settings: dict[str, Any], edit_records: list[Any], n_edited: int,
                  world: str | None) -> list[Any]:
    """The records an audit suite iterates over at a step (deterministic: the driver and the replica agree).

    uncertainty probes the facts edited so far (their paraphrases and neighbourhood) unless the suite
    names its own source; shift reads a fixed prompt set — the stream's whole edit dataset — so the same
    prompts are compared at every step; general and safety read their own files (the toy world's
    malicious queries by default on a toy-world model).
    """
    from rayedit.evaluate.audit import audit_records

    if settings.get("source") or suite in ("general", "safety"):
        return audit_records(suite, settings, None, world=world)
    if suite == "uncertainty":
        if n_edited == 0:  # the unedited model is probed on the facts the streams will edit
            return audit_records(suite, settings, edit_records, world=world)
        return audit_records(suite, settings, edit_records[:n_edited], world=world)
    return audit_records(suite, settings, edit_records, world=world)


def audit_steps(spec: CampaignSpec) -> list[int]:
    return [] if spec.audit is None else spec.steps_at(spec.audit.at)


def _resolved(settings: dict[str, Any], base_dir: Path | None) -> dict[str, Any]:
    """Relative input files of a suite resolved against the spec's folder (replicas may run elsewhere)."""
    from rayedit.runtime.spec import _is_hub, resolve_data_path

    out = dict(settings)
    if out.get("source") and not _is_hub(out["source"]):
        out["source"] = str(resolve_data_path(out["source"], base_dir).resolve())
    if out.get("files"):
        out["files"] = [{**f, "path": str(resolve_data_path(f["path"], base_dir).resolve())} for f in out["files"]]
    return out


def _shards(spec: CampaignSpec, sid: str, records_sid: str, step: int, n_edited: int, kind: str,
            edit_records: list[Any], world: str | None, columns: dict[str, Any], unedited: bool,
            base_dir: Path | None) -> list[AuditShard]:
    a = spec.audit
    assert a is not None
    out = []
    for s in a.suites:
        settings = _resolved(s.model_dump(mode="json"), base_dir)
        n = len(suite_records(s.suite, settings, edit_records, n_edited, world))
        out += [AuditShard(spec.campaign_id, sid, records_sid, step, s.suite, i, lo, min(lo + a.shard_size, n),
                           n_edited, kind, settings, world, unedited, columns)
                for i, lo in enumerate(range(0, n, a.shard_size))]
    return out


def plan_audit(spec: CampaignSpec, stream: Stream, step: int, kind: str, edit_records: list[Any],
               columns: dict[str, Any], base_dir: Path | None = None) -> list[AuditShard]:
    if spec.audit is None or step not in audit_steps(spec):
        return []
    return _shards(spec, stream.sid, stream.sid, step, spec.edits_after(step), kind, edit_records,
                   world_of(stream.model), columns, False, base_dir)


def plan_unedited(spec: CampaignSpec, stream: Stream, kind: str, edit_records: list[Any],
                  base_dir: Path | None = None) -> list[AuditShard]:
    """The unedited model's audit (once per model; ``stream`` is the model's first stream)."""
    if spec.audit is None or not spec.audit.unedited:
        return []
    cols = {"model": stream.model, "method": UNEDITED, "method_label": UNEDITED, "dataset": stream.dataset,
            "seed": stream.seed}
    return _shards(spec, unedited_sid(stream.model), stream.sid, 0, 0, kind, edit_records, world_of(stream.model),
                   cols, True, base_dir)


def run_audit_shard(runner: Any, shard: AuditShard, records: list[dict[str, Any]]) -> int:
    """Run one audit shard on a ``StreamRunner``'s model; returns the rows committed (0 if already done)."""
    import pyarrow as pa

    from rayedit.evaluate.audit import run_audit_suite
    from rayedit.runtime.evaluation import decode_records
    from rayedit.store import commit_eval_part
    from rayedit.store.layout import eval_done_key

    store = runner.store
    if store.exists(eval_done_key(shard.cid, shard.sid, shard.step, shard.suite, shard.shard)):
        return 0
    memo = runner.__dict__.setdefault("_audit_records", {})
    mkey = (shard.records_sid, shard.suite, shard.n_edited, repr(sorted(shard.settings.items())))
    if mkey not in memo:
        memo[mkey] = suite_records(shard.suite, shard.settings, decode_records(shard.record_kind, records),
                                   shard.n_edited, shard.world)
    recs = memo[mkey]
    weights = {} if shard.unedited else runner.step_weights(shard.cid, shard.sid, shard.step)
    current = runner.snapshot()

    @contextmanager
    def use_base():  # the same model object with the unedited weights, then the step's weights again
        runner.checkout({})
        try:
            yield runner.lm.model
        finally:
            runner.checkout(weights)

    extra = {"campaign": shard.cid, "stream": shard.sid, **shard.columns, "step": shard.step,
             "n_edited": shard.n_edited, "suite": shard.suite, "shard": shard.shard}
    cache = runner.__dict__.setdefault("_audit_cache", {})  # base-model results (U_pre, BEFORE states)
    try:
        runner.checkout(weights)
        rows = run_audit_suite(shard.suite, runner.lm.model, runner.lm.tokenizer, recs, shard.settings,
                               base=use_base, start=shard.start, stop=shard.stop, keep_raw=False,
                               extra_columns=extra, cache=cache)
    finally:
        runner.checkout(current)
    for r in rows:
        r.update(extra)
        r.update(getattr(runner, "where", {}))  # which node ran the shard (node_id, node_ip)
    commit_eval_part(store, shard.cid, shard.sid, shard.step, shard.suite, shard.shard, pa.Table.from_pylist(rows),
                     {"rows": len(rows), "start": shard.start, "stop": shard.stop})
    return len(rows)
