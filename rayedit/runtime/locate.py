"""Locating and tuning as Ray jobs: trace and scan shards on ``LocateReplica`` actors, and ``suggest``.

- **trace**: a seeded sample of facts is cut into fact ranges (shards); each replica loads the model
  once and traces the shards it is given (``rayedit.locate.trace``); parts land in the store under
  ``campaigns/<cid>/trace/`` (``rayedit.locate.parts``: data first, marker last). ν is measured on the
  whole sample in every shard, so results do not depend on sharding; committed shards are skipped on a
  re-run (resume). The driver reads the committed parts and derives the suggested window.
- **scan**: one shard per candidate layer window; each replica edits the same held-out sample of facts
  from its base weights at the candidate's layers and evaluates it (``rayedit.locate.scan``).
- **suggest**: trace → scan → a sweep campaign (the scan's best window; a 2 × 2 grid of the target
  learning rate and norm clamp) run by the ordinary campaign runtime → ranking → preset file.

Ray is imported inside functions only (like ``rayedit.runtime.campaign``).
"""

from __future__ import annotations

import logging
import os
import random
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from rayedit.locate import parts
from rayedit.locate.objectives import DEFAULT_OBJECTIVE, get_objective
from rayedit.runtime.spec import DatasetSpec, model_id, model_path, read_records
from rayedit.store import Store, sanitize_id

log = logging.getLogger(__name__)

#: reference values of the MEMIT-family target optimisation (methods.md §4): v_lr 0.5 (GPT-2 XL, GPT-J,
#: Qwen) / 0.1 (Llama-3); clamp 0.75 (MEMIT/AlphaEdit) / 4 (ROME, EasyEdit's Qwen)
SWEEP_LRS = (0.5, 0.1)
SWEEP_CLAMPS = (0.75, 4.0)


# --- what to locate on ------------------------------------------------------------------------------
def default_dataset(model: str) -> DatasetSpec | None:
    """The toy world's own CounterFact file for ``toyworld:<seed>`` models; else None (must be given)."""
    from rayedit.runtime.spec import toyworld_seed

    seed = toyworld_seed(model)
    return None if seed is None else DatasetSpec(kind="toyworld-counterfact", toyworld_seed=seed)


def default_stats_corpus(model: str) -> str:
    """The toy world's corpus for its model (``toyworld:<seed>``: the keys' own distribution), else the
    builtin corpus."""
    from rayedit.runtime.spec import toyworld_seed

    seed = toyworld_seed(model)
    return "builtin:general" if seed is None else f"toyworld:{seed}"


def model_shape(model: str) -> tuple[int, int | None]:
    """(layers, d_ff) of a model name from its config, without loading weights."""
    if model.startswith("tiny:"):
        from rayedit.models.tiny import tiny_config, tiny_tokenizer

        fam = model.split(":", 1)[1]
        cfg = tiny_config(fam, len(tiny_tokenizer(fam)))
        n = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
        return int(n), getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None)
    from rayedit.models import model_dims

    _t, n_layers, d_ff = model_dims(model_path(model))
    return n_layers, d_ff


def fact_sample(records: list[Any], seed: int, start: int, stop: int) -> list[Any]:
    """Records ``[start, stop)`` of a seeded shuffle: disjoint ranges are disjoint (held-out) samples."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    return [records[i] for i in order[start:stop]]


def default_cid(kind: str, model: str, dataset: DatasetSpec) -> str:
    return sanitize_id(f"{kind}--{model}--{dataset.label}")


# --- jobs (plain data: they cross the Ray boundary) -------------------------------------------------
@dataclass
class TraceJob:
    cid: str
    facts: list[dict[str, Any]]  # all facts of the trace (ν is measured on all of them)
    settings: dict[str, Any]
    shard_size: int

    @property
    def n_shards(self) -> int:
        return -(-len(self.facts) // self.shard_size)


@dataclass
class ScanJob:
    cid: str
    records: list[dict[str, Any]]  # CounterFact records (model_dump)
    settings: dict[str, Any]
    candidates: list[list[int]]


class LocateWorker:
    """Body of the ``LocateReplica`` actor: one model copy, loaded once, serving many shards."""

    def __init__(self, model: str, dtype: str, store_args: dict[str, Any]) -> None:
        from rayedit.runtime.stream import load_lm
        from rayedit.store import StoreBlobCache
        from rayedit.store.uri import reopen_store

        os.environ.setdefault("OMP_NUM_THREADS", "1")
        self.model = model
        self.lm = load_lm(model, dtype)
        self.store = reopen_store(store_args)
        self.cache = StoreBlobCache(self.store)  # covariance statistics shared through the store

    def trace(self, job: TraceJob, shard: int) -> int:
        """Trace one fact range and commit its part; 0 if it was already committed."""
        from rayedit.locate.trace import TraceFact, TraceSettings, trace_facts

        if self.store.exists(parts.done_key(job.cid, "trace", shard)):
            return 0
        facts = [TraceFact(**f) for f in job.facts]
        roles = job.settings.get("roles")
        settings = TraceSettings(**{**job.settings, "kinds": tuple(job.settings["kinds"]),
                                    "roles": tuple(roles) if roles else None})
        a, b = shard * job.shard_size, min((shard + 1) * job.shard_size, len(facts))
        rows = trace_facts(self.lm, facts[a:b], settings, noise_facts=facts,
                           extra_columns={"campaign": job.cid, "model": self.model, "shard": shard})
        parts.commit_part(self.store, job.cid, "trace", shard, pa.Table.from_pylist(rows),
                          {"rows": len(rows), "facts": [a, b]})
        return len(rows)

    def scan(self, job: ScanJob, shard: int) -> int:
        """Edit the sample at candidate ``shard``, evaluate, commit; 0 if it was already committed."""
        from rayedit.data.schema import CounterFactRecord
        from rayedit.locate.scan import Candidate, ScanSettings, scan_candidate

        if self.store.exists(parts.done_key(job.cid, "scan", shard)):
            return 0
        records = [CounterFactRecord.model_validate(r) for r in job.records]
        settings = ScanSettings(**job.settings)
        rows = scan_candidate(self.lm, records, Candidate(tuple(job.candidates[shard])), settings,
                              stats_cache=self.cache,
                              extra_columns={"campaign": job.cid, "model": self.model, "shard": shard})
        parts.commit_part(self.store, job.cid, "scan", shard, pa.Table.from_pylist(rows),
                          {"rows": len(rows), "candidate": job.candidates[shard]})
        return len(rows)


def actor_env() -> dict[str, str]:
    """Non-secret settings the replicas need to find the same toy world and caches as the driver."""
    return {k: os.environ[k] for k in ("RAYEDIT_TOYWORLD_CACHE", "RAYEDIT_CACHE", "HF_HUB_OFFLINE", "OMP_NUM_THREADS")
            if k in os.environ}


class ReplicaPool:
    """``LocateReplica`` actors holding one model each, created on first use and reused by trace and scan
    (``suggest`` runs both on the same pool, so each replica loads the model once)."""

    def __init__(self, model: str, dtype: str, store: Store, *, replicas: int = 2, cpus: float = 0.5,
                 address: str | None = None) -> None:
        self.model, self.dtype, self.store = model, dtype, store
        self.replicas, self.cpus, self.address = replicas, cpus, address
        self.actors: list[Any] = []
        self._started = False

    def _ensure(self, n: int) -> list[Any]:
        import ray

        from rayedit.runtime.campaign import init_ray

        if not self.actors:
            self._started = init_ray(self.address)
        Replica = ray.remote(max_restarts=1, max_task_retries=1)(LocateWorker)
        env = actor_env()
        opts: dict[str, Any] = {"num_cpus": self.cpus}
        if env:
            opts["runtime_env"] = {"env_vars": env}
        while len(self.actors) < max(1, min(self.replicas, n)):
            self.actors.append(Replica.options(**opts).remote(self.model, self.dtype, self.store.open_args()))
        return self.actors

    def run(self, method: str, job: Any, shards: list[int], *, progress: bool, what: str) -> None:
        """Run ``method`` (trace | scan) for every shard, one shard per call, on free replicas."""
        if not shards:
            return
        import ray

        actors = self._ensure(len(shards))
        queue = deque(shards)
        pending: dict[Any, tuple[Any, int]] = {}
        t0 = time.perf_counter()

        def submit(actor: Any) -> None:
            if queue:
                sh = queue.popleft()
                pending[getattr(actor, method).remote(job, sh)] = (actor, sh)

        for a in actors:
            submit(a)
        done = 0
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            actor, sh = pending.pop(ready[0])
            n = ray.get(ready[0])  # an error in a shard fails the job (committed shards stay valid)
            done += 1
            if progress:
                print(f"[{time.strftime('%H:%M:%S')}] {what}: shard {sh} done ({n} rows), {done}/{len(shards)} "
                      f"in {time.perf_counter() - t0:.1f}s", flush=True)
            submit(actor)

    def close(self) -> None:
        import ray

        for a in self.actors:  # also on errors: replicas must not outlive the driver on a shared cluster
            ray.kill(a)
        self.actors = []
        if self._started:
            ray.shutdown()
            self._started = False

    def __enter__(self) -> ReplicaPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _run_shards(pool: ReplicaPool | None, model: str, dtype: str, store: Store, method: str, job: Any,
                shards: list[int], *, replicas: int, cpus: float, address: str | None, progress: bool,
                what: str) -> None:
    if not shards:
        return
    if pool is not None:
        pool.run(method, job, shards, progress=progress, what=what)
        return
    with ReplicaPool(model, dtype, store, replicas=replicas, cpus=cpus, address=address) as own:
        own.run(method, job, shards, progress=progress, what=what)


# --- trace ---------------------------------------------------------------------------------------------
@dataclass
class TraceResult:
    cid: str
    n_facts: int
    n_layers: int
    noise: float
    noise_rule: str
    effects: dict[str, list[float]]  # "<kind>@<role>" → mean indirect effect per layer
    suggestion: dict[str, Any]
    seconds: float
    rows: int


def run_trace(model: str, dataset: DatasetSpec, store: Store, *, cid: str | None = None, limit: int = 32,
              seed: int = 0, settings: Any = None, width: int | None = None, replicas: int = 2,
              shard_size: int = 8, cpus: float = 0.5, dtype: str = "float32", address: str | None = None,
              base_dir: Path | None = None, progress: bool = True, pool: ReplicaPool | None = None) -> TraceResult:
    """Trace ``limit`` facts of ``dataset`` (a seeded sample) on Ray; parts + summary in the store."""
    from rayedit.locate.trace import TraceSettings, facts_from_records

    settings = settings or TraceSettings(seed=seed)
    cid = cid or default_cid("trace", model, dataset)
    t0 = time.perf_counter()
    facts = facts_from_records(fact_sample(read_records(dataset, base_dir), seed, 0, limit))
    if not facts:
        raise ValueError(f"dataset {dataset.label} has no facts to trace")
    job = TraceJob(cid, [asdict(f) for f in facts], settings.to_dict(), shard_size)
    parts.freeze_job(store, cid, "trace", {"model": model, "dtype": dtype, "dataset": dataset.model_dump(),
                                           "sample_seed": seed, "case_ids": [f.case_id for f in facts],
                                           "settings": job.settings, "shard_size": shard_size})
    done = set(parts.parts_done(store, cid, "trace"))
    todo = [s for s in range(job.n_shards) if s not in done]
    _run_shards(pool, model, dtype, store, "trace", job, todo, replicas=replicas, cpus=cpus, address=address,
                progress=progress, what=f"trace {cid}")
    return summarize_trace(store, cid, width=width, seconds=time.perf_counter() - t0)


def summarize_trace(store: Store, cid: str, *, width: int | None = None, seconds: float = 0.0) -> TraceResult:
    """Per-layer effects and the suggested window from the committed parts; written to summary.json."""
    from rayedit.locate.trace import layer_effects, suggest_window

    table = parts.read_table(store, cid, "trace")
    if table is None:
        raise ValueError(f"campaign {cid!r} has no committed trace parts")
    rows = table.to_pylist()
    n_facts = len({r["case_id"] for r in rows})
    rows = [r for r in rows if r["kind"] != "clean"]  # known_only: a fact the model does not predict
    if not rows:
        raise ValueError(f"campaign {cid!r}: the model predicts none of the {n_facts} traced facts (top-1 = the "
                         "object's first token), so nothing was restored; trace more facts (--limit)")
    n_layers = max(int(r["layer"]) for r in rows) + 1
    effects = {}
    for kind in sorted({r["kind"] for r in rows}):
        for role in ("subject_first", "subject_last", "after_subject", "last"):
            e = layer_effects(rows, n_layers, kind, role)
            effects[f"{kind}@{role}"] = e.effects
    sug = suggest_window(layer_effects(rows, n_layers, "mlp", "subject_last"), width)
    first = rows[0]
    res = TraceResult(cid, n_facts, n_layers, float(first["noise"]),
                      str(first.get("noise_rule") or ""), effects, sug.to_dict(), seconds, len(rows))
    parts.write_json(store, parts.summary_key(cid, "trace"), asdict(res))
    return res


# --- scan ----------------------------------------------------------------------------------------------
@dataclass
class ScanResult:
    cid: str
    ranking: list[dict[str, Any]]  # summarize_scan rows, best first
    objective: str
    statement: str
    n_records: int
    seconds: float

    @property
    def best(self) -> dict[str, Any]:
        return self.ranking[0]


def run_scan(model: str, dataset: DatasetSpec, store: Store, *, method: str = "memit",
             hparams: dict[str, Any] | None = None, candidates: list[list[int]] | None = None,
             cid: str | None = None, limit: int = 16, offset: int = 0, seed: int = 0,
             objective: str = DEFAULT_OBJECTIVE, batch_size: int | None = None, stats_corpus: str | None = None,
             replicas: int = 2, cpus: float = 0.5, dtype: str = "float32", address: str | None = None,
             base_dir: Path | None = None, progress: bool = True, pool: ReplicaPool | None = None) -> ScanResult:
    """Edit a held-out sample (records ``[offset, offset+limit)`` of the seeded order) at each candidate."""
    from rayedit.locate.scan import ScanSettings, candidate_windows
    from rayedit.locate.trace import default_width

    get_objective(objective)  # fail before any work
    if dataset.record_kind != "counterfact":
        raise ValueError(f"a scan evaluates counterfact-prob/v1 and needs CounterFact records; "
                         f"dataset {dataset.label} is kind {dataset.kind!r}")
    cid = cid or default_cid("scan", model, dataset)
    t0 = time.perf_counter()
    n_layers, _d_ff = model_shape(model)
    if candidates is None:
        candidates = [list(c.layers) for c in candidate_windows(n_layers, default_width(n_layers))]
    bad = [c for c in candidates if not c or any(not 0 <= x < n_layers for x in c)]
    if bad:
        raise ValueError(f"layer windows {bad} are outside the model's layers 0..{n_layers - 1}")
    records = read_records(dataset, base_dir)
    known_note = None
    if dataset.known:  # edit only facts the model knows, as the campaign will (cached per model and records)
        from rayedit.runtime.campaign import init_ray
        from rayedit.runtime.known import known_records

        started = init_ray(address)
        try:
            records, res = known_records(model, dtype, store, records, label=f"dataset {dataset.label}", cpus=cpus)
        finally:
            if started:
                import ray

                ray.shutdown()
        known_note = {"criterion": res["criterion"], "n_kept": res["n_kept"], "n_records": res["n_records"]}
        if progress:
            print(f"known filter: kept {res['n_kept']} of {res['n_records']} records of {dataset.label}")
    records = fact_sample(records, seed, offset, offset + limit)
    if not records:
        raise ValueError(f"dataset {dataset.label} has no records in [{offset}, {offset + limit})")
    settings = ScanSettings(method=method, hparams=dict(hparams or {}), batch_size=batch_size, seed=seed,
                            stats_corpus=stats_corpus or default_stats_corpus(model), model_name=model_id(model))
    job = ScanJob(cid, [r.model_dump() for r in records], settings.to_dict(), [list(c) for c in candidates])
    identity = {"model": model, "dtype": dtype, "dataset": dataset.model_dump(), "sample_seed": seed,
                "case_ids": [r.case_id for r in records], "settings": job.settings, "candidates": job.candidates}
    parts.freeze_job(store, cid, "scan", identity | ({"known": known_note} if known_note else {}))
    done = set(parts.parts_done(store, cid, "scan"))
    todo = [s for s in range(len(candidates)) if s not in done]
    _run_shards(pool, model, dtype, store, "scan", job, todo, replicas=replicas, cpus=cpus, address=address,
                progress=progress, what=f"scan {cid}")
    return summarize_scan_store(store, cid, objective, seconds=time.perf_counter() - t0)


def summarize_scan_store(store: Store, cid: str, objective: str = DEFAULT_OBJECTIVE, *,
                         seconds: float = 0.0) -> ScanResult:
    from rayedit.locate.scan import summarize_scan

    table = parts.read_table(store, cid, "scan")
    if table is None:
        raise ValueError(f"campaign {cid!r} has no committed scan parts")
    rows = table.to_pylist()
    ranking = summarize_scan(rows, objective)
    obj = get_objective(objective)
    statement = f"{obj.statement}; ties: the harmonic-mean score, then the candidates' order"
    res = ScanResult(cid, ranking, obj.name, statement, len({r["case_id"] for r in rows}), seconds)
    parts.write_json(store, parts.summary_key(cid, "scan"), asdict(res))
    return res


# --- suggest: trace + scan + sweep → preset -------------------------------------------------------------
@dataclass
class SuggestResult:
    cid: str
    trace: TraceResult
    scan: ScanResult
    preset: Any  # rayedit.locate.presets.Preset
    ranking: Any  # rayedit.locate.sweep.SweepRanking
    seconds: dict[str, float] = field(default_factory=dict)
    report: str | None = None


def scan_candidates_around(window: list[int], n_layers: int, last_layer: bool = True) -> list[list[int]]:
    """The trace's window, the same window shifted one layer down and up (never onto the last layer),
    and (``last_layer``) the last layer alone, the baseline the trace argues against. On a real model that
    baseline's statistics need a forward through every layer over the statistics corpus (SmolLM2: 3× the
    passes of a window at layers 4–8), which is why it can be left out."""
    out = [list(window)]
    for shift in (-1, 1):
        moved = [x + shift for x in window]
        if moved[0] >= 0 and moved[-1] < n_layers - 1:
            out.append(moved)
    if last_layer:
        out.append([n_layers - 1])
    uniq: list[list[int]] = []
    for c in out:
        if c not in uniq:
            uniq.append(c)
    return uniq


def sweep_spec(cid: str, model: str, dataset: DatasetSpec, method: str, layers: list[int],
               base_hparams: dict[str, Any], *, lrs: tuple[float, ...], clamps: tuple[float, ...], edits: int,
               batch_size: int, seed: int, stats_corpus: str, store_uri: str, dtype: str, replicas: int):
    """The sweep campaign of ``suggest``: one method, its grid over v_lr × clamp_norm_factor, evaluated at the end."""
    from rayedit.runtime.spec import CampaignSpec

    return CampaignSpec.model_validate({
        "name": cid, "mode": "sequential_batches",
        "models": [{"name": model, "dtype": dtype, "replicas": replicas, "cpus_per_replica": 0.5}],
        "methods": [{"name": method, "hparams": {**base_hparams, "layers": list(layers)},
                     "grid": {"v_lr": list(lrs), "clamp_norm_factor": list(clamps)}}],
        "datasets": [dataset.model_dump(exclude_defaults=True)], "seeds": [seed],
        "edits_per_stream": edits, "batch_size": batch_size, "checkpoint_every": 1, "store": store_uri,
        "stats_corpus": stats_corpus,
        "evaluation": {"at": "end", "suites": ["counterfact"], "shard_size": max(edits, 1)},
    })


def suggest(model: str, store: Store, *, dataset: DatasetSpec | None = None,
            trace_dataset: DatasetSpec | None = None, method: str = "memit",
            cid: str | None = None, n_trace: int = 32, n_scan: int = 16, sweep_edits: int = 16,
            sweep_batch: int = 4, lrs: tuple[float, ...] = SWEEP_LRS, clamps: tuple[float, ...] = SWEEP_CLAMPS,
            hparams: dict[str, Any] | None = None, trace_settings: Any = None, width: int | None = None,
            objective: str = DEFAULT_OBJECTIVE, seed: int = 0, stats_corpus: str | None = None,
            stats_samples: int | None = None, replicas: int = 2, dtype: str = "float32",
            address: str | None = None, out: Path | None = None, report: bool = True,
            progress: bool = True, last_layer: bool = True) -> SuggestResult:
    """Trace → scan (held-out facts) → sweep campaign → ranking → preset (saved to ``out`` if given).

    Everything lands in one campaign ``cid`` of the store: ``trace/``, ``scan/``, the sweep's streams and
    the report, so the preset's provenance (the campaign id) leads to every number behind it.
    ``trace_dataset``: trace other facts than the edited ones (ROME's ``known_1000``); by default the first
    ``n_trace`` facts of ``dataset``'s seeded order, and the scan edits the next ``n_scan`` (held out).
    """
    from rayedit.locate.presets import make_preset, resolved_hparams, save_preset
    from rayedit.locate.sweep import preset_dict, rank_campaign
    from rayedit.report.load import load_campaign
    from rayedit.runtime.campaign import execute, init_ray

    dataset = dataset or default_dataset(model)
    if dataset is None:
        raise ValueError(f"model {model!r}: give a CounterFact-format dataset (--dataset)")
    cid = cid or sanitize_id(f"suggest--{model}--{method}")
    stats_corpus = stats_corpus or default_stats_corpus(model)
    base = dict(hparams or {})
    if stats_samples is not None:
        base.setdefault("mom2_n_samples", stats_samples)
    n_layers, d_ff = model_shape(model)
    secs: dict[str, float] = {}
    started = init_ray(address)  # one Ray session for all three stages
    try:
        with ReplicaPool(model, dtype, store, replicas=replicas, address=address) as pool:
            t = time.perf_counter()
            tr = run_trace(model, trace_dataset or dataset, store, cid=cid, limit=n_trace, seed=seed,
                           settings=trace_settings, width=width, dtype=dtype, progress=progress, pool=pool)
            secs["trace"] = time.perf_counter() - t
            t = time.perf_counter()
            cands = scan_candidates_around(tr.suggestion["layers"], n_layers, last_layer)
            sc = run_scan(model, dataset, store, method=method, hparams=base, candidates=cands, cid=cid,
                          limit=n_scan, offset=0 if trace_dataset else n_trace, seed=seed, objective=objective,
                          stats_corpus=stats_corpus, dtype=dtype, progress=progress, pool=pool)
            secs["scan"] = time.perf_counter() - t
        t = time.perf_counter()  # the pool's replicas are gone: the campaign's replicas get the CPUs
        spec = sweep_spec(cid, model, dataset, method, list(sc.best["layers"]), base, lrs=lrs, clamps=clamps,
                          edits=sweep_edits, batch_size=min(sweep_batch, sweep_edits), seed=seed,
                          stats_corpus=stats_corpus, store_uri=store.uri, dtype=dtype, replicas=replicas)
        execute(spec, store, address=address, progress=progress, actor_env=actor_env() or None)
        secs["sweep"] = time.perf_counter() - t
    finally:
        if started:
            import ray

            ray.shutdown()
    ranking = rank_campaign(load_campaign(store, cid), objective)
    data = preset_dict(ranking, model, source="suggest", stats_corpus=stats_corpus, store=store.uri, extra={
        "trace": {k: tr.suggestion[k] for k in ("layers", "score", "rule", "kind", "role", "effects", "n_facts")}
        | {"noise": tr.noise, "noise_rule": tr.noise_rule, "dataset": (trace_dataset or dataset).label},
        "scan": {"objective": sc.statement, "best": sc.best["candidate"],
                 "ranking": [{"candidate": r["candidate"], "rank": r["rank"], "score": r["objective_value"],
                              "efficacy": r["efficacy_success"], "neighborhood": r["neighborhood_success"]}
                             for r in sc.ranking]}})
    data["hparams"] = resolved_hparams(method, model_id(model), n_layers, data["hparams"], d_ff)
    preset = make_preset(data, n_layers=n_layers, d_ff=d_ff, origin=f"campaign {cid}")
    if out is not None:
        save_preset(preset, out)
    res = SuggestResult(cid, tr, sc, preset, ranking, secs)
    if report:
        from rayedit.report import make_report

        try:
            _rep, res.report = make_report(store, [cid])
        except Exception as exc:  # the results and the preset are written; only the report is missing
            print(f"warning: report not written ({type(exc).__name__}: {exc})", file=sys.stderr)
    return res
