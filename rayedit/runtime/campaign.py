"""The campaign driver: streams fan out over ``ModelReplica`` actors on Ray (local or a cluster).

The driver drives each stream one step per actor call, so progress is visible step by step and a
replica can be handed the next stream the moment one finishes. All commits happen inside the
actors, straight to the store; the driver only reads markers (resume) and summaries.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rayedit.runtime.catalog import StreamSummary, campaign_summaries, freeze_spec, read_frozen_spec
from rayedit.runtime.spec import (
    CampaignSpec,
    SpecError,
    deep_check,
    load_spec,
    stream_requests,
    streams,
)
from rayedit.runtime.stream import StepReport, StreamJob, StreamRunner, load_lm
from rayedit.store import Store, open_store
from rayedit.store.layout import last_committed_step

log = logging.getLogger(__name__)

# Ray 2.60 on a single box: no token auth (clients would fail), loopback only (platform-notes §3).
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def init_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """ray.init unless already initialised; returns True if this call started it (and should stop it)."""
    import ray

    if ray.is_initialized():
        return False
    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, **kwargs)
    return True


class ModelReplica:
    """Body of the ``ModelReplica`` actor: one model copy, loaded once, reused by many streams."""

    def __init__(self, model: str, dtype: str, store_args: dict[str, Any]) -> None:
        from rayedit.store.uri import reopen_store

        os.environ.setdefault("OMP_NUM_THREADS", "1")
        self.runner = StreamRunner(load_lm(model, dtype), reopen_store(store_args))

    def open(self, job: StreamJob) -> int:
        return self.runner.open(job)

    def step(self, job: StreamJob) -> StepReport:
        # After an actor restart the runner is empty: re-open (= resume from the store) and go on.
        fresh = self.runner.job is None or self.runner.job.sid != job.sid
        if fresh and self.runner.open(job) >= job.n_steps:
            return StepReport(job.sid, job.n_steps - 1, job.n_steps, 0, False, 0.0, None)
        return self.runner.step()


def _replica_class():
    import ray

    # Restart after a crash (node lost, OOM kill); the in-flight step is retried on the new actor,
    # which resumes the stream from its last committed step. Application errors are not retried.
    return ray.remote(max_restarts=1, max_task_retries=1)(ModelReplica)


class Progress:
    """Per-stream progress: rich bars on a terminal, plain lines otherwise (logs, CI, Ray jobs)."""

    def __init__(self, totals: dict[str, int], enabled: bool = True) -> None:
        self.totals = totals
        self.enabled = enabled
        self.rich = None
        if enabled and sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self.rich = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn())
            self.tasks = {sid: self.rich.add_task(sid, total=n) for sid, n in totals.items()}
            self.rich.start()

    def update(self, sid: str, done: int, note: str = "") -> None:
        if not self.enabled:
            return
        if self.rich is not None:
            self.rich.update(self.tasks[sid], completed=done)
        else:
            print(f"[{time.strftime('%H:%M:%S')}] {sid}: step {done}/{self.totals[sid]} {note}".rstrip(), flush=True)

    def close(self) -> None:
        if self.rich is not None:
            self.rich.stop()


def print_summary(cid: str, rows: list[StreamSummary]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"campaign {cid}")
    for col in ("stream", "steps committed", "last step", "edits", "mean target NLL", "seconds"):
        table.add_column(col)
    for r in rows:
        table.add_row(r.sid, str(r.steps_committed), "-" if r.last_step is None else str(r.last_step), str(r.edits),
                      "-" if r.mean_target_nll is None else f"{r.mean_target_nll:.3f}", f"{r.seconds:.1f}")
    Console(width=None if sys.stdout.isatty() else 140).print(table)  # logs: do not wrap at 80


def build_jobs(spec: CampaignSpec, base_dir: Path | None) -> list[tuple[int, StreamJob]]:
    """(model index, job) for every stream of the spec, requests included."""
    out = []
    for s in streams(spec):
        reqs = stream_requests(spec, s, base_dir)
        out.append((s.model_index, StreamJob(
            cid=spec.campaign_id, sid=s.sid, model=s.model, method=s.method, method_label=s.method_label,
            hparams=s.hparams, dataset=s.dataset, seed=s.seed, mode=spec.mode, batch_size=spec.batch_size,
            checkpoint_every=spec.checkpoint_every, stats_corpus=spec.stats_corpus,
            requests=[r.model_dump() for r in reqs])))
    return out


def execute(spec: CampaignSpec, store: Store, *, base_dir: Path | None = None, address: str | None = None,
            max_steps: int | None = None, progress: bool = True,
            on_step: Callable[[StepReport], None] | None = None) -> list[StreamSummary]:
    """Run (or resume) every stream of a validated spec on Ray; returns per-stream summaries.

    ``max_steps`` stops each stream once it has that many committed steps (tests: interruption).
    """
    import ray

    problems = deep_check(spec, base_dir)
    if problems:
        raise SpecError(problems)
    cid = spec.campaign_id
    freeze_spec(store, spec)
    jobs = build_jobs(spec, base_dir)
    limit = {job.sid: job.n_steps if max_steps is None else min(job.n_steps, max_steps) for _, job in jobs}
    by_model: dict[int, deque[StreamJob]] = defaultdict(deque)
    for mi, job in jobs:
        last = last_committed_step(store, cid, job.sid)
        if last is None or last + 1 < limit[job.sid]:  # finished streams need no replica (and no Ray)
            by_model[mi].append(job)
    if not any(by_model.values()):
        log.info("campaign %s: every stream is already complete", cid)
        return campaign_summaries(store, cid)
    started = init_ray(address)
    bar: Progress | None = None
    actors: list[tuple[int, Any]] = []
    try:
        Replica = _replica_class()
        bar = Progress({job.sid: job.n_steps for q in by_model.values() for job in q}, enabled=progress)
        store_args = store.open_args()
        for mi, queue in by_model.items():
            m = spec.models[mi]
            for _ in range(min(m.replicas, len(queue))):
                opts = {"num_cpus": m.cpus_per_replica, "num_gpus": m.gpus_per_replica}
                actors.append((mi, Replica.options(**opts).remote(m.name, m.dtype, store_args)))
        pending: dict[Any, tuple[Any, int, StreamJob, str]] = {}  # ref → (actor, model, job, kind)

        def assign(actor: Any, mi: int) -> None:
            if by_model[mi]:
                job = by_model[mi].popleft()
                pending[actor.open.remote(job)] = (actor, mi, job, "open")

        for mi, actor in actors:
            assign(actor, mi)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            ref = done[0]
            actor, mi, job, kind = pending.pop(ref)
            result = ray.get(ref)  # an edit error fails the campaign (committed steps stay valid)
            if kind == "open":
                nxt = int(result)
                bar.update(job.sid, nxt, "(resumed)" if nxt else "")
            else:
                rep: StepReport = result
                nxt = rep.step + 1
                if on_step:
                    on_step(rep)
                nll = "" if rep.mean_target_nll is None else f"target NLL {rep.mean_target_nll:.3f}"
                bar.update(job.sid, nxt, f"{rep.edits} edits {rep.seconds:.1f}s {nll}")
            if nxt < limit[job.sid]:
                pending[actor.step.remote(job)] = (actor, mi, job, "step")
            else:
                assign(actor, mi)
    finally:
        if bar is not None:
            bar.close()
        for _, a in actors:  # also on errors: replicas must not outlive the driver on a shared cluster
            ray.kill(a)
        if started:
            ray.shutdown()
    return campaign_summaries(store, cid)


def run_campaign(spec_path: str | Path, store_uri: str | None = None, address: str | None = None, *,
                 max_steps: int | None = None, progress: bool = True, summary: bool = True) -> list[StreamSummary]:
    """``rayedit run``: load + validate the spec, freeze it in the store, run/resume all streams."""
    spec = load_spec(spec_path)
    store = open_store(store_uri or spec.store)
    out = execute(spec, store, base_dir=Path(spec_path).resolve().parent, address=address,
                  max_steps=max_steps, progress=progress)
    if summary:
        print_summary(spec.campaign_id, out)
    return out


def resume_campaign(cid: str, store_uri: str, address: str | None = None, *, max_steps: int | None = None,
                    progress: bool = True, summary: bool = True) -> list[StreamSummary]:
    """``rayedit resume``: the frozen spec from the store drives the run (data paths relative to cwd)."""
    store = open_store(store_uri, create=False)
    spec = read_frozen_spec(store, cid)
    out = execute(spec, store, address=address, max_steps=max_steps, progress=progress)
    if summary:
        print_summary(spec.campaign_id, out)
    return out


def summaries_as_dicts(rows: list[StreamSummary]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]
