"""The campaign driver: streams fan out over ``ModelReplica`` actors on Ray (local or a cluster).

The driver drives each stream one step per actor call, so progress is visible step by step and a
replica can be handed the next stream the moment one finishes. All commits happen inside the
actors, straight to the store; the driver only reads markers (resume) and summaries.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rayedit.runtime import health
from rayedit.runtime import stats as stats_stage
from rayedit.runtime.audit import AuditShard, plan_audit, plan_unedited, run_audit_shard
from rayedit.runtime.catalog import RunStateWriter, StreamSummary, campaign_summaries, freeze, read_frozen_spec
from rayedit.runtime.evaluation import EvalShard, plan_shards, run_shard
from rayedit.runtime.spec import (
    CampaignSpec,
    SpecError,
    deep_check,
    load_spec,
    pin_files,
    request_of,
    resolve_data_path,
    stream_records,
    streams,
)
from rayedit.runtime.stream import StepReport, StreamJob, StreamRunner, load_lm
from rayedit.store import Store, eval_parts_done, open_store
from rayedit.store.layout import last_committed_step

log = logging.getLogger(__name__)

# Ray 2.60 on a single box: no token auth (clients would fail), loopback only (platform-notes §3).
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


LOCAL_START_ATTEMPTS = 3


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
        return True
    # Ray waits a fixed 30 s for a new raylet to register with its GCS; on a box whose cores are busy
    # (two loaded cores, other Ray clusters starting) that wait can run out although nothing is wrong.
    # Starting a local node again is cheap and harmless, so try a few times before giving up.
    for attempt in range(1, LOCAL_START_ATTEMPTS + 1):
        try:
            ray.init(num_cpus=num_cpus, **kwargs)
            return True
        except Exception as e:  # Ray raises a bare Exception for this
            if "timed out during startup" not in str(e) or attempt == LOCAL_START_ATTEMPTS:
                raise
            log.warning("local Ray node did not register in time (attempt %d of %d); starting it again",
                        attempt, LOCAL_START_ATTEMPTS)
            ray.shutdown()
    return True


class ModelReplica:
    """Body of the ``ModelReplica`` actor: one model copy, loaded once, reused by many streams."""

    def __init__(self, model: str, dtype: str, store_args: dict[str, Any], attn_implementation: str | None = None
                 ) -> None:
        from rayedit.store.uri import reopen_store

        os.environ.setdefault("OMP_NUM_THREADS", "1")
        self.runner = StreamRunner(load_lm(model, dtype, attn_implementation), reopen_store(store_args))
        self.runner.where = node_placement()

    def node(self) -> dict[str, str]:
        return dict(self.runner.where)

    def open(self, job: StreamJob) -> int:
        return self.runner.open(job)

    def step(self, job: StreamJob, step: int | None = None) -> StepReport:
        """Run step ``step`` of ``job`` (default: the runner's next one) and report it.

        Idempotent, because Ray retries the call on a restarted actor (its process or node died): the new
        actor's runner is empty, so it re-opens the stream (= resumes from the store); if ``step`` was
        committed before the old actor died, its report is read back instead of running anything twice."""
        fresh = self.runner.job is None or self.runner.job.sid != job.sid
        if fresh:
            self.runner.open(job)
        if step is None:
            step = self.runner.next_step
        if step >= job.n_steps:
            return StepReport(job.sid, job.n_steps - 1, job.n_steps, 0, False, 0.0, None)
        if step < self.runner.next_step:
            return self.runner.committed_report(step)
        if step > self.runner.next_step:
            raise RuntimeError(f"{job.sid}: step {step} asked for, but the next uncommitted step is "
                               f"{self.runner.next_step}")
        return self.runner.step()

    def evaluate(self, shard: EvalShard | AuditShard, records: list[dict[str, Any]]) -> int:
        if isinstance(shard, AuditShard):
            return run_audit_shard(self.runner, shard, records)
        return run_shard(self.runner, shard, records)

    # the statistics stage (rayedit.runtime.stats)
    def stats_plan(self, mi: int, method: str, hparams: dict[str, Any], corpus: str):
        return stats_stage.plan_on_replica(self.runner, mi, method, hparams, corpus)

    def stats_shard(self, group, shard: int, start: int, stop: int) -> tuple[bool, str]:
        """(computed now, node id): the driver logs where each document range ran."""
        return stats_stage.shard_on_replica(self.runner, group, shard, start, stop), self.runner.where["node_id"]

    def stats_reduce(self, group) -> None:
        stats_stage.reduce_on_replica(self.runner, group)


def node_placement() -> dict[str, str]:
    """The Ray node this process runs on (recorded with every step and shard it commits)."""
    import ray

    return {"node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address()}


def _replica_class():
    import ray

    return ray.remote(ModelReplica)


def replica_options(m: Any, actor_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Ray options of one replica of model spec ``m``.

    Restart after a crash (node lost, spot pre-emption, OOM kill) up to ``max_restarts`` times; the call in
    flight is retried on the new actor, which resumes its stream from the last committed step (application
    errors are not retried). SPREAD puts the replicas on as many nodes as have room, so losing one node
    takes as few replicas as possible with it; ``resources`` keeps them to nodes that advertise those."""
    opts: dict[str, Any] = {"num_cpus": m.cpus_per_replica, "num_gpus": m.gpus_per_replica,
                            "max_restarts": m.max_restarts, "max_task_retries": m.max_restarts,
                            "scheduling_strategy": "SPREAD"}
    if m.resources:
        opts["resources"] = dict(m.resources)
    if actor_env:
        opts["runtime_env"] = {"env_vars": dict(actor_env)}
    return opts


class Progress:
    """Per-stream progress in edits (the numbering of a spec's ``at:``), with the step count beside it: rich
    bars on a terminal, plain lines otherwise (logs, CI, Ray jobs)."""

    def __init__(self, totals: dict[str, int], enabled: bool = True,
                 edits_after: Callable[[int], int] | None = None) -> None:
        self.totals = totals  # steps per stream
        self.enabled = enabled
        self.edits_after = edits_after or (lambda step: step + 1)
        self.rich = None
        if enabled and sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self.rich = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("edits"), TimeElapsedColumn())
            self.tasks = {sid: self.rich.add_task(sid, total=self.edits(n)) for sid, n in totals.items()}
            self.rich.start()

    def edits(self, steps_done: int) -> int:
        """Edits made once ``steps_done`` steps are committed."""
        return self.edits_after(steps_done - 1) if steps_done > 0 else 0

    def line(self, sid: str, done: int) -> str:
        n = self.totals[sid]
        return f"{sid}: edits {self.edits(done)}/{self.edits(n)} (step {done}/{n})"

    def update(self, sid: str, done: int, note: str = "") -> None:
        """``done``: committed steps of the stream."""
        if not self.enabled:
            return
        if self.rich is not None:
            self.rich.update(self.tasks[sid], completed=self.edits(done))
        else:
            print(f"[{time.strftime('%H:%M:%S')}] {self.line(sid, done)} {note}".rstrip(), flush=True)

    def note(self, text: str) -> None:
        if not self.enabled:
            return
        if self.rich is not None:
            self.rich.console.print(text)
        else:
            print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    def close(self) -> None:
        if self.rich is not None:
            self.rich.stop()


SUMMARY_COLUMNS = ("stream", "state", "edits", "steps", "mean target NLL", "seconds", "eval parts")


def summary_rows(rows: list[StreamSummary], planned: dict[str, dict[str, int]] | None = None,
                 states: dict[str, str] | None = None) -> list[list[str]]:
    """The cells of the per-stream table: counts read "done/planned" when the plan is known."""
    def of(done: int, sid: str, what: str) -> str:
        total = (planned or {}).get(sid, {}).get(what)
        if total == 0 and done == 0:
            return "-"  # nothing planned (no evaluation schedule)
        return str(done) if total is None else f"{done}/{total}"

    return [[r.sid, (states or {}).get(r.sid, "-"), of(r.edits, r.sid, "edits"), of(r.steps_committed, r.sid, "steps"),
             "-" if r.mean_target_nll is None else f"{r.mean_target_nll:.3f}", f"{r.seconds:.1f}",
             of(r.eval_parts, r.sid, "eval_parts")] for r in rows]


def print_summary(cid: str, rows: list[StreamSummary], planned: dict[str, dict[str, int]] | None = None,
                  states: dict[str, str] | None = None, width: int | None = None) -> None:
    """The per-stream table (stream ids in full). A terminal too narrow for it (``width``: the terminal's, or
    no limit in logs) gets two lines per stream instead."""
    from rich.console import Console
    from rich.table import Table

    cells = summary_rows(rows, planned, states)
    keep = [i for i, c in enumerate(SUMMARY_COLUMNS) if c != "state" or states is not None]
    widths = [max([len(SUMMARY_COLUMNS[i])] + [len(r[i]) for r in cells]) for i in keep]
    need = sum(widths) + 3 * len(keep) + 1
    if width is None and not sys.stdout.isatty():
        width = max(140, need)  # logs: never wrap
    console = Console(width=width)
    if console.width < need:
        console.print(f"campaign {cid}", highlight=False)
        for r in cells:
            console.print(r[0], highlight=False, soft_wrap=True)
            console.print("    " + ", ".join(f"{SUMMARY_COLUMNS[i]} {r[i]}" for i in keep[1:]), highlight=False)
        return
    table = Table(title=f"campaign {cid}")
    for i in keep:
        table.add_column(SUMMARY_COLUMNS[i], no_wrap=True)
    for r in cells:
        table.add_row(*(r[i] for i in keep))
    console.print(table)


class Interrupted(KeyboardInterrupt):
    """The driver got SIGINT (Ctrl-C) or SIGTERM: it stopped cleanly, committed work stays, and ``rayedit resume``
    continues. ``committed``: each stream's summary when it stopped; ``exit_code``: 128 + the signal number."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)
        self.cid: str | None = None
        self.store_hint: str | None = None  # what to pass to --store
        self.committed: list[StreamSummary] = []
        self.planned: dict[str, dict[str, int]] = {}
        self.hint: str | None = None  # how to continue, when it is not `rayedit resume`

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def lines(self) -> list[str]:
        """A few plain lines for the terminal: what is committed per stream, and how to continue."""
        out = [f"interrupted ({self.signal_name}): stopped cleanly; every committed step is kept"]
        for r in self.committed:
            p = self.planned.get(r.sid, {})
            steps, edits = p.get("steps"), p.get("edits")
            if r.steps_committed == 0:
                out.append(f"  {r.sid}: not started" + (f" (0/{edits} edits)" if edits else ""))
            else:
                out.append(f"  {r.sid}: {r.edits}{f'/{edits}' if edits else ''} edits committed "
                           f"(step {r.steps_committed}{f'/{steps}' if steps else ''})")
        if self.hint:
            out.append(self.hint)
        elif self.cid:
            out.append(f"continue with: rayedit resume {self.cid} --store {self.store_hint}")
        return out


def store_hint(store: Store) -> str:
    """The ``--store`` argument that reopens ``store`` from any folder (a local store by its absolute path)."""
    root = getattr(store, "root", None)
    return str(root) if isinstance(root, Path) else store.uri


# The signal the driver got: Ray's blocking calls may turn the handler's ``Interrupted`` into a plain
# KeyboardInterrupt on its way up, and the state, message and exit code must still name SIGTERM.
_RECEIVED: list[int] = []


def _interruption(exc: KeyboardInterrupt) -> Interrupted:
    if isinstance(exc, Interrupted):
        return exc
    return Interrupted(_RECEIVED[0] if _RECEIVED else signal.SIGINT)


@contextmanager
def interrupt_signals() -> Iterator[Callable[[], None]]:
    """SIGINT and SIGTERM raise ``Interrupted`` in the main thread (instead of Ray's SIGTERM handler, which
    dumps a native stack trace and exits with a SystemExit), so both take the KeyboardInterrupt path: run state
    "interrupted", actors killed, Ray shut down. A second signal during that cleanup exits at once. Yields a
    function that installs the handlers again: ``ray.init`` replaces the SIGTERM one."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return
    fired = _RECEIVED
    fired.clear()

    def handler(signum: int, frame: Any) -> None:
        if fired:  # asked again while stopping: do not wait for the cleanup
            os._exit(128 + signum)
        fired.append(signum)
        raise Interrupted(signum)

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def install() -> None:
        for sig in previous:
            signal.signal(sig, handler)

    install()
    try:
        yield install
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h if h is not None else signal.SIG_DFL)


def build_jobs(spec: CampaignSpec, base_dir: Path | None, known: dict[tuple[int, int], set[str]] | None = None
               ) -> list[tuple[int, StreamJob, list[dict[str, Any]]]]:
    """(model index, job, record dicts in edit order) for every stream of the spec."""
    out = []
    for s in streams(spec):
        recs = stream_records(spec, s, base_dir, (known or {}).get((s.model_index, s.dataset_index)))
        hparams = dict(s.hparams)
        for k in ("safety_malicious", "safety_benign"):  # prompt files: relative to the spec, read by replicas
            v = hparams.get(k)
            if isinstance(v, str) and v != "builtin:general" and not v.startswith("toyworld:"):
                hparams[k] = str(resolve_data_path(v, base_dir).resolve())
        out.append((s.model_index, StreamJob(
            cid=spec.campaign_id, sid=s.sid, model=s.model, method=s.method, method_label=s.method_label,
            hparams=hparams, dataset=s.dataset, seed=s.seed, mode=spec.mode, batch_size=spec.batch_size,
            checkpoint_every=spec.checkpoint_every, stats_corpus=spec.stats_corpus_for(s.model_index),
            requests=[request_of(r).model_dump() for r in recs]), [r.model_dump() for r in recs]))
    return out


def _columns(job: StreamJob) -> dict[str, Any]:
    return {"model": job.model, "method": job.method, "method_label": job.method_label, "dataset": job.dataset,
            "seed": job.seed}


def missing_shards(spec: CampaignSpec, store: Store, job: StreamJob, record_kind: str,
                   upto: int | None) -> list[EvalShard]:
    """Evaluation shards of committed steps ``<= upto`` whose part is not committed yet (resume)."""
    if spec.evaluation is None or upto is None:
        return []
    out: list[EvalShard] = []
    for step in spec.eval_steps():
        if step > upto:
            break
        done = {suite: set(eval_parts_done(store, job.cid, job.sid, step, suite)) for suite in spec.evaluation.suites}
        out += [sh for sh in plan_shards(spec, job.sid, step, record_kind, _columns(job))
                if sh.shard not in done[sh.suite]]
    return out


def missing_audits(spec: CampaignSpec, store: Store, stream: Any, kind: str, decoded: list[Any],
                   upto: int | None, columns: dict[str, Any], base_dir: Path | None = None) -> list[AuditShard]:
    """Audit shards of committed steps ``<= upto`` whose part is not committed yet (resume)."""
    from rayedit.runtime.audit import audit_steps

    if spec.audit is None or upto is None:
        return []
    out: list[AuditShard] = []
    for step in audit_steps(spec):
        if step > upto:
            break
        out += plan_audit(spec, stream, step, kind, decoded, columns, base_dir)
    return _not_done(store, out)


def _not_done(store: Store, shards: list[Any]) -> list[Any]:
    done: dict[tuple[str, int, str], set[int]] = {}
    out = []
    for sh in shards:
        k = (sh.sid, sh.step, sh.suite)
        if k not in done:
            done[k] = set(eval_parts_done(store, sh.cid, sh.sid, sh.step, sh.suite))
        if sh.shard not in done[k]:
            out.append(sh)
    return out


class _NoState:
    def write(self, force: bool = False, **changes: Any) -> None:
        pass


class Scheduler:
    """Per model: a queue of streams and a queue of evaluation shards, served by that model's replicas.

    A replica keeps the stream it was given until the stream ends. Evaluation shards go to replicas
    without a stream (spares, or replicas whose streams are done); when every replica of the model is
    editing, each alternates one shard with one step, so editing is never blocked for long and the
    backlog stays bounded. The driver never waits for evaluations before the next step: with a spare
    replica, step t is evaluated while step t+1 is edited; without one, a stream's evaluation runs
    while the other streams edit.
    """

    def __init__(self) -> None:
        self.streams: dict[int, deque[StreamJob]] = defaultdict(deque)
        self.evals: dict[int, deque[EvalShard]] = defaultdict(deque)
        self.queued: set[tuple[str, int, str, int]] = set()  # never run a shard twice in one driver
        self.owner: dict[Any, StreamJob | None] = {}
        self.took_eval: dict[Any, bool] = {}

    def push_evals(self, mi: int, shards: list[EvalShard]) -> None:
        for sh in shards:
            if sh.key not in self.queued:
                self.queued.add(sh.key)
                self.evals[mi].append(sh)

    def spare(self, mi: int, actors: list[tuple[int, Any]]) -> bool:
        """Does model ``mi`` have a replica without a stream (which then serves the evaluations)?"""
        return any(m == mi and self.owner.get(a) is None for m, a in actors)

    def take_eval(self, actor: Any, mi: int) -> EvalShard:
        self.took_eval[actor] = True
        return self.evals[mi].popleft()

    def decide(self, actor: Any, mi: int, actors: list[tuple[int, Any]], limit: dict[str, int],
               nxt: int | None = None) -> tuple[str, Any]:
        """The next piece of work of a free replica of model ``mi``: ("open", stream) | ("eval", shard) |
        ("step", stream) | ("idle", None). ``nxt`` is the next step of the stream the replica just advanced.
        Pure bookkeeping (no Ray), so benchmarks/schedule.py replays exactly these decisions."""
        job = self.owner[actor]
        if job is not None and nxt is not None and nxt >= limit[job.sid]:
            self.owner[actor] = job = None
        if job is None and self.streams[mi]:
            job = self.owner[actor] = self.streams[mi].popleft()
            return "open", job
        if self.evals[mi] and (job is None or (not self.took_eval.get(actor) and not self.spare(mi, actors))):
            return "eval", self.take_eval(actor, mi)
        if job is not None:
            self.took_eval[actor] = False
            return "step", job
        return "idle", None


def execute(spec: CampaignSpec, store: Store, *, base_dir: Path | None = None, address: str | None = None,
            max_steps: int | None = None, progress: bool = True, stats_only: bool = False,
            on_step: Callable[[StepReport], None] | None = None,
            on_eval_dispatch: Callable[[Any, EvalShard], None] | None = None,
            on_eval_done: Callable[[EvalShard, int], None] | None = None,
            actor_env: dict[str, str] | None = None) -> list[StreamSummary]:
    """Run (or resume) every stream of a validated spec on Ray, with its evaluation schedule.

    Input files are pinned first (absolute paths, identities: ``pin_files``), so a relative data path means
    the same file whatever the working directory of a later resume. ``max_steps`` stops each stream once it has
    that many committed steps (tests: interruption). ``stats_only`` runs only the statistics stage (``rayedit
    stats``). ``on_eval_dispatch``/``on_eval_done``/``actor_env`` are hooks for fault-injection tests and
    benchmarks. SIGINT/SIGTERM stop the run cleanly: ``Interrupted`` (a KeyboardInterrupt) says what is committed.
    """
    spec = pin_files(spec, base_dir)
    problems = deep_check(spec, base_dir)
    if problems:
        raise SpecError(problems)
    if not stats_only:  # statistics may be computed ahead of a campaign whose spec is still changing
        spec, _ = freeze(store, spec, base_dir)  # the frozen stream ids, the files as found now
    with interrupt_signals() as rearm:
        try:
            return _execute(spec, store, base_dir=base_dir, address=address, max_steps=max_steps,
                            progress=progress, stats_only=stats_only, on_step=on_step,
                            on_eval_dispatch=on_eval_dispatch, on_eval_done=on_eval_done, actor_env=actor_env,
                            rearm=rearm)
        except KeyboardInterrupt as exc:
            stop = _interruption(exc)
            if stats_only:  # nothing frozen to resume: the statistics computed so far are in the store's cache
                stop.hint = "statistics computed so far are cached; `rayedit stats` (or `rayedit run`) continues"
                raise stop from None
            stop.cid, stop.store_hint = spec.campaign_id, store_hint(store)
            stop.planned = {s.sid: {"steps": spec.steps_per_stream(), "edits": spec.edits_per_stream}
                            for s in streams(spec)}
            try:
                stop.committed = campaign_summaries(store, spec.campaign_id, [s.sid for s in streams(spec)])
            except Exception as err:  # the store went away with the signal: say so, keep the interruption
                log.warning("committed steps not read back: %s", err)
            raise stop from None


def _execute(spec: CampaignSpec, store: Store, *, base_dir: Path | None, address: str | None,
             max_steps: int | None, progress: bool, stats_only: bool,
             on_step: Callable[[StepReport], None] | None,
             on_eval_dispatch: Callable[[Any, EvalShard], None] | None,
             on_eval_done: Callable[[EvalShard, int], None] | None,
             actor_env: dict[str, str] | None, rearm: Callable[[], None]) -> list[StreamSummary]:
    import ray

    cid = spec.campaign_id
    ray_started = False

    def ensure_ray() -> None:
        nonlocal ray_started
        ray_started = init_ray(address) or ray_started
        rearm()  # ray.init installs its own SIGTERM handler

    from rayedit.runtime import known as known_stage

    kept = known_stage.run_stage(spec, store, base_dir, ensure_ray,
                                 note=lambda m: print(m, file=sys.stderr) if progress else log.info("%s", m))
    jobs = build_jobs(spec, base_dir, kept)
    limit = {job.sid: job.n_steps if max_steps is None else min(job.n_steps, max_steps) for _, job, _ in jobs}
    kinds = {job.sid: spec.datasets[next(s.dataset_index for s in streams(spec) if s.sid == job.sid)].record_kind
             for _, job, _ in jobs}
    records = {job.sid: recs for _, job, recs in jobs}
    by_sid = {s.sid: s for s in streams(spec)}
    decoded: dict[str, list[Any]] = {}  # record objects for audit planning (only with an audit section)
    if spec.audit is not None and not stats_only:
        from rayedit.runtime.evaluation import decode_records

        decoded = {sid: decode_records(kinds[sid], recs) for sid, recs in records.items()}
    sched = Scheduler()
    # evaluation shards still to run per (stream, step): when one reaches 0 the step's health is checked
    eval_left: dict[tuple[str, int], int] = defaultdict(int)
    for mi, job, _ in jobs:
        last = last_committed_step(store, cid, job.sid)
        stop = health.stopped_at(store, cid, job.sid) if spec.health is not None else None
        if stop is not None:  # its health policy stopped it in an earlier run: it stays stopped
            limit[job.sid] = 0 if last is None else last + 1
            log.warning("%s (earlier run)", stop.describe(spec.edits_after))
        if last is None or last + 1 < limit[job.sid]:  # finished streams need no replica (and no Ray)
            sched.streams[mi].append(job)
        if stats_only:
            continue
        shards: list[Any] = missing_shards(spec, store, job, kinds[job.sid], last)
        if spec.audit is not None:
            st = by_sid[job.sid]
            shards += missing_audits(spec, store, st, kinds[job.sid], decoded[job.sid], last, _columns(job),
                                     base_dir)
            if next(x for x in streams(spec) if x.model_index == mi).sid == job.sid:  # once per model
                shards += _not_done(store, plan_unedited(spec, st, kinds[job.sid], decoded[job.sid], base_dir))
        for sh in shards:
            eval_left[(sh.sid, sh.step)] += 1
        sched.push_evals(mi, shards)
    sids = [job.sid for _, job, _ in jobs]
    if not any(sched.streams.values()) and not any(sched.evals.values()):
        log.info("campaign %s: every stream and evaluation is already complete", cid)
        return campaign_summaries(store, cid, sids)
    planned = {job.sid: {"steps": job.n_steps, "edits": len(job.requests), "eval_parts": sum(
        len(plan_shards(spec, job.sid, t, kinds[job.sid], {})) for t in spec.eval_steps())} for _, job, _ in jobs}
    if spec.audit is not None and not stats_only:
        from rayedit.runtime.audit import audit_steps

        for sid, p in planned.items():
            p["eval_parts"] += sum(len(plan_audit(spec, by_sid[sid], t, kinds[sid], decoded[sid], {}, base_dir))
                                   for t in audit_steps(spec))
    state = RunStateWriter(store, cid, planned) if not stats_only else _NoState()
    events: list[health.HealthEvent] = []

    def on_health(found: list[health.HealthEvent]) -> None:
        for e in health.record(store, cid, found):
            events.append(e)
            log.warning("%s", e.describe(spec.edits_after))
            if bar is not None:
                bar.note(f"health: {e.describe(spec.edits_after)}")
            if e.action == "stop":  # no new step for this stream; the one in flight still commits
                limit[e.sid] = min(limit[e.sid], next_step.get(e.sid, e.step + 1))
        if found:
            state.write(force=True, health={e.sid: health.summary([x for x in events if x.sid == e.sid])
                                            for e in events})

    next_step: dict[str, int] = {}
    bar: Progress | None = None
    try:
        started = init_ray(address) or ray_started
        rearm()
    except KeyboardInterrupt as exc:
        state.write(force=True, state="interrupted", error=None, signal=_signal_name(exc))
        raise
    except BaseException as exc:
        state.write(force=True, state="failed", error=f"Ray: {type(exc).__name__}: {exc}")
        raise
    actors: list[tuple[int, Any]] = []
    try:
        Replica = _replica_class()
        bar = Progress({job.sid: job.n_steps for _, job, _ in jobs}, enabled=progress, edits_after=spec.edits_after)
        store_args = store.open_args()
        for mi in sorted(set(sched.streams) | set(sched.evals)):
            m = spec.models[mi]
            # with an evaluation schedule every replica is useful (spares evaluate); else one per stream
            n = m.replicas if spec.evaluation is not None or stats_only else min(m.replicas, len(sched.streams[mi]))
            for _ in range(max(1, n)):
                a = Replica.options(**replica_options(m, actor_env)).remote(m.name, m.dtype, store_args,
                                                                             m.attn_implementation)
                actors.append((mi, a))
                sched.owner[a] = None
        # statistics first: computed once per (model, layer, corpus), sharded over the model's replicas
        stat_actors = [(mi, a) for mi, a in actors if sched.streams[mi]]
        if stat_actors:
            computed = stats_stage.run_stage(spec, store, stat_actors, note=bar.note if progress else None)
            if computed:
                bar.note(f"statistics: {computed} layer statistic(s) computed and cached in the store")
        if stats_only:
            sched.streams.clear()
        rec_refs: dict[str, Any] = {}  # each stream's records go to the object store once, not per shard
        pending: dict[Any, tuple[Any, int, Any, str]] = {}  # ref → (actor, model, job | shard, kind)
        idle: set[Any] = set()

        def eval_on(actor: Any, mi: int, sh: EvalShard) -> None:
            rid = getattr(sh, "records_sid", sh.sid)  # the unedited pseudo-stream reads a real stream's records
            if rid not in rec_refs:
                rec_refs[rid] = ray.put(records[rid])
            pending[actor.evaluate.remote(sh, rec_refs[rid])] = (actor, mi, sh, "eval")
            if on_eval_dispatch:
                on_eval_dispatch(actor, sh)

        def dispatch(actor: Any, mi: int, nxt: int | None = None) -> None:
            """Give a free replica its next piece of work (or mark it idle)."""
            kind, item = sched.decide(actor, mi, actors, limit, nxt)
            if kind == "open":
                pending[actor.open.remote(item)] = (actor, mi, item, "open")
            elif kind == "eval":
                eval_on(actor, mi, item)
            elif kind == "step":
                # the step number makes a retried call (actor restarted) report, not redo, a committed step
                pending[actor.step.remote(item, next_step[item.sid])] = (actor, mi, item, "step")
            else:
                idle.add(actor)

        for mi, actor in actors:
            dispatch(actor, mi)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            ref = done[0]
            actor, mi, item, kind = pending.pop(ref)
            result = ray.get(ref)  # an edit/eval error fails the campaign (committed work stays valid)
            if kind == "eval":
                sh: EvalShard = item
                if on_eval_done:
                    on_eval_done(sh, int(result))
                if progress:
                    when = "unedited model" if getattr(sh, "unedited", False) else \
                        f"after {spec.edits_after(sh.step)} edits"
                    bar.note(f"{sh.sid}: evaluated {when}: {sh.suite} part {sh.shard} ({result} rows)")
                eval_left[(sh.sid, sh.step)] -= 1
                if eval_left[(sh.sid, sh.step)] == 0:
                    on_health(health.check_eval(spec, store, sh.sid, sh.step))
                state.write()
                dispatch(actor, mi, next_step.get(sched.owner[actor].sid) if sched.owner[actor] else None)
                continue
            job = item
            if kind == "open":
                nxt = int(result)
                bar.update(job.sid, nxt, "(resumed)" if nxt else "")
            else:
                rep: StepReport = result
                nxt = rep.step + 1
                if on_step:
                    on_step(rep)
                nll = "" if rep.mean_target_nll is None else f"target NLL {rep.mean_target_nll:.3f}"
                bar.update(job.sid, nxt, f"+{rep.edits} in {rep.seconds:.1f}s {nll}")
                new: list[Any] = plan_shards(spec, job.sid, rep.step, kinds[job.sid], _columns(job))
                if spec.audit is not None:
                    new += plan_audit(spec, by_sid[job.sid], rep.step, kinds[job.sid], decoded[job.sid],
                                      _columns(job), base_dir)
                for sh in new:
                    if sh.key not in sched.queued:
                        eval_left[(sh.sid, sh.step)] += 1
                sched.push_evals(mi, new)
                next_step[job.sid] = nxt
                on_health(health.check_step(spec.health, job.sid, rep.step, rep.max_weight_growth,
                                            rep.max_condition_number))
                state.write()
                for m2, a2 in actors:  # wake idle replicas of this model for the new shards
                    if new and m2 == mi and a2 in idle and sched.evals[mi]:
                        idle.discard(a2)
                        eval_on(a2, mi, sched.take_eval(a2, mi))
            next_step[job.sid] = nxt
            dispatch(actor, mi, nxt)
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM (interrupt_signals): not a failure
        state.write(force=True, state="interrupted", error=None, signal=_signal_name(exc))
        raise
    except BaseException as exc:
        state.write(force=True, state="failed", error=f"{type(exc).__name__}: {exc}"[:2000])
        raise
    else:
        state.write(force=True, state="finished")
    finally:
        if bar is not None:
            bar.close()
        for _, a in actors:  # also on errors: replicas must not outlive the driver on a shared cluster
            ray.kill(a)
        if started:
            ray.shutdown()
    return campaign_summaries(store, cid, sids)


def _signal_name(exc: KeyboardInterrupt) -> str:
    return _interruption(exc).signal_name


def run_campaign(spec_path: str | Path, store_uri: str | None = None, address: str | None = None, *,
                 max_steps: int | None = None, progress: bool = True, summary: bool = True) -> list[StreamSummary]:
    """``rayedit run``: load + validate the spec, freeze it in the store, run/resume all streams."""
    spec = load_spec(spec_path)
    store = open_store(store_uri or spec.store)
    out = execute(spec, store, base_dir=Path(spec_path).resolve().parent, address=address,
                  max_steps=max_steps, progress=progress)
    if summary:
        print_campaign_summary(store, spec.campaign_id, out)
    return out


def print_campaign_summary(store: Store, cid: str, rows: list[StreamSummary] | None = None) -> None:
    """``print_summary`` with each stream's state and planned totals (from the run state and the frozen spec)."""
    from rayedit.runtime.catalog import planned_totals, read_run_state, stream_state

    rows = campaign_summaries(store, cid) if rows is None else rows
    state = read_run_state(store, cid)
    try:
        spec: CampaignSpec | None = read_frozen_spec(store, cid)
    except SpecError:
        spec = None
    planned = planned_totals(spec, state)
    run_state = None if state is None else state.get("state")
    states = {r.sid: stream_state(r, planned.get(r.sid), run_state,
                                  spec is not None and spec.health is not None
                                  and health.stopped_at(store, cid, r.sid) is not None) for r in rows}
    print_summary(cid, rows, planned, states)


def stats_campaign(spec_path: str | Path, store_uri: str | None = None, address: str | None = None, *,
                   progress: bool = True) -> None:
    """``rayedit stats``: only the statistics stage of a campaign (its spec is not frozen by this)."""
    spec = load_spec(spec_path)
    store = open_store(store_uri or spec.store)
    execute(spec, store, base_dir=Path(spec_path).resolve().parent, address=address, progress=progress,
            stats_only=True)


def resume_campaign(cid: str, store_uri: str, address: str | None = None, *, max_steps: int | None = None,
                    progress: bool = True, summary: bool = True) -> list[StreamSummary]:
    """``rayedit resume``: the frozen spec from the store drives the run (its input files are pinned: absolute
    paths with their identities, so any working directory will do)."""
    store = open_store(store_uri, create=False)
    spec = read_frozen_spec(store, cid)
    out = execute(spec, store, address=address, max_steps=max_steps, progress=progress)
    if summary:
        print_campaign_summary(store, spec.campaign_id, out)
    return out


def summaries_as_dicts(rows: list[StreamSummary]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]
