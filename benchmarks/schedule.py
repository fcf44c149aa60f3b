"""Replay rayedit's scheduler on a big audit with simulated durations: how busy do 16, 32 and 64 GPUs stay?

The decisions are the real ones: ``rayedit.runtime.campaign.Scheduler.decide`` (which free replica opens which
stream, edits its next step, or takes an evaluation shard) on a real ``CampaignSpec``, whose evaluation shards
come from the real ``plan_shards``. Only Ray is replaced, by an event clock that charges each piece of work a
simulated duration. The campaign: 3 models × 4 methods (MEMIT, AlphaEdit, MOSE, SAME) × 2,000 sequential
CounterFact edits in batches of 100, evaluation after every 100 edits of the edits made so far (shards of
100 records), one GPU per replica, ⌊GPUs / 3⌋ replicas per model.

Durations, Llama-3-8B on one A100-class GPU (scaled from this machine, stated so they can be changed):
  - edit: 2.0 s per fact. Measured here: ~20 s per fact for SmolLM2-135M on one CPU core, 95 % of it the target
    optimisation's forward/backward passes; Llama-3-8B has ~59× the FLOPs per token, an A100 runs ~30 % of its
    312 bf16 TFLOP/s on these small batches vs ~50 GFLOP/s for one core here: 20 × 59 × 0.05 / 94 ≈ 0.6 s,
    rounded up ×3 for the short sequences' poor GPU efficiency (published MEMIT runs: hours per 10k edits).
  - solve and commit per step: 10 s (5 layers: a 14,336² solve each, and 1.2 GB of float32 deltas uploaded).
  - evaluation: 0.1 s per CounterFact record (~30 short forward passes: prompt, paraphrases, neighbourhood).
  - replica start (weights from the store): 60 s; opening a stream: 2 s.
Store requests counted per step (5 delta objects, the edit rows, the step marker, the run state: 8 PUT, 1 GET)
and per shard (rows, marker: 2 PUT; the done-check: 1 GET).

    python benchmarks/schedule.py [--gpus 16,32,64] [--edit-s 2.0] [--record-s 0.1]
"""

from __future__ import annotations

import argparse
import heapq
import itertools
from collections import defaultdict
from dataclasses import dataclass

from rayedit.runtime.campaign import Scheduler
from rayedit.runtime.evaluation import plan_shards
from rayedit.runtime.spec import CampaignSpec, streams

METHODS = ("memit", "alphaedit", "mose", "same")


@dataclass(frozen=True)
class Costs:
    edit_s: float = 2.0
    step_fixed_s: float = 10.0
    record_s: float = 0.1
    start_s: float = 60.0
    open_s: float = 2.0
    step_requests: int = 9
    shard_requests: int = 3


@dataclass
class SimStream:  # what Scheduler.decide reads of a StreamJob
    sid: str
    n_steps: int


def audit_spec(replicas: int, seeds: int = 1, shard_size: int = 100) -> CampaignSpec:
    return CampaignSpec.model_validate({
        "name": "audit", "mode": "sequential_batches", "seeds": list(range(seeds)),
        "models": [{"name": f"meta-llama/Meta-Llama-3-8B#{i}", "replicas": replicas, "gpus_per_replica": 1}
                   for i in range(3)],
        "methods": [{"name": m} for m in METHODS],
        "datasets": [{"kind": "counterfact", "path": "counterfact.json"}],
        "edits_per_stream": 2000, "batch_size": 100,
        "evaluation": {"at": list(range(100, 2001, 100)), "suites": ["counterfact"], "shard_size": shard_size}})


def simulate(gpus: int, costs: Costs, seeds: int = 1, shard_size: int = 100) -> dict[str, float]:
    replicas = gpus // 3
    spec = audit_spec(replicas, seeds, shard_size)
    sched = Scheduler()
    limit: dict[str, int] = {}
    n_edited: dict[tuple[str, int], int] = {}
    step_s = costs.step_fixed_s + costs.edit_s * spec.batch_size
    for s in streams(spec):
        job = SimStream(s.sid, len(spec.eval_steps()))
        limit[s.sid] = job.n_steps
        sched.streams[s.model_index].append(job)
    actors = [(mi, f"replica-{mi}-{r}") for mi in range(3) for r in range(replicas)]
    for _, a in actors:
        sched.owner[a] = None
    clock, busy, requests = 0.0, 0.0, 0
    events: list[tuple[float, int, str, int, str, object]] = []
    seq = itertools.count()
    next_step: dict[str, int] = {}
    idle: set[str] = set()

    def run(actor: str, mi: int, kind: str, item: object, start: float) -> None:
        nonlocal busy
        cost = {"open": costs.open_s, "step": step_s}.get(kind)
        if kind == "eval":
            cost = (item.stop - item.start) * costs.record_s
        busy += cost
        heapq.heappush(events, (start + cost, next(seq), actor, mi, kind, item))

    def dispatch(actor: str, mi: int, nxt: int | None, now: float) -> None:
        kind, item = sched.decide(actor, mi, actors, limit, nxt)
        if kind == "idle":
            idle.add(actor)
        else:
            run(actor, mi, kind, item, now)

    for mi, a in actors:
        dispatch(a, mi, None, costs.start_s)
    last_step_end: dict[str, float] = {}
    while events:
        clock, _, actor, mi, kind, item = heapq.heappop(events)
        if kind == "eval":
            requests += costs.shard_requests
            owner = sched.owner[actor]
            dispatch(actor, mi, next_step.get(owner.sid) if owner else None, clock)
            continue
        if kind == "open":
            nxt = 0
        else:
            step = next_step[item.sid]
            nxt = step + 1
            requests += costs.step_requests
            last_step_end[item.sid] = clock
            new = plan_shards(spec, item.sid, step, "counterfact", {})
            for sh in new:
                n_edited[(sh.sid, sh.step)] = sh.n_edited
            sched.push_evals(mi, new)
            for m2, a2 in actors:  # the real driver wakes idle replicas of the model for new shards
                if new and m2 == mi and a2 in idle and sched.evals[mi]:
                    idle.discard(a2)
                    run(a2, mi, "eval", sched.take_eval(a2, mi), clock)
        next_step[item.sid] = nxt
        dispatch(actor, mi, nxt, clock)
    n_steps = len(spec.eval_steps())
    last_shard_s = shard_size * costs.record_s
    critical = costs.start_s + costs.open_s + n_steps * step_s + last_shard_s  # one stream's chain, then its last shard
    work_bound = costs.start_s + busy / (3 * replicas)  # every GPU a replica can use busy all the time
    bound = max(critical, work_bound)
    return {"gpus": gpus, "replicas": 3 * replicas, "streams": len(limit), "makespan_h": clock / 3600,
            "bound_h": bound / 3600, "binds": "work" if work_bound >= critical else "path",
            "ratio": clock / bound, "util": busy / (gpus * clock), "req_per_s": requests / clock}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", default="16,32,64")
    ap.add_argument("--edit-s", type=float, default=Costs.edit_s)
    ap.add_argument("--record-s", type=float, default=Costs.record_s)
    args = ap.parse_args()
    costs = Costs(edit_s=args.edit_s, record_s=args.record_s)
    print("3 models × 4 methods × 2,000 sequential edits (batches of 100), evaluation every 100 edits; "
          f"edit {costs.edit_s} s/fact, eval {costs.record_s} s/record (Llama-3-8B, A100-class, see docstring)")
    head = f"{'variant':<22}{'GPUs':>5}{'repl':>6}{'streams':>8}{'makespan h':>12}{'bound h':>9}{'binds':>7}" \
           f"{'ratio':>7}{'util':>7}{'store req/s':>12}"
    print(head)
    variants = [("12 streams", 1), ("24 streams (2 seeds)", 2), ("48 streams (4 seeds)", 4)]
    rows = defaultdict(list)
    for label, seeds in variants:
        for g in (int(x) for x in args.gpus.split(",")):
            r = simulate(g, costs, seeds=seeds)
            rows[label].append(r)
            print(f"{label:<22}{g:>5}{r['replicas']:>6}{r['streams']:>8}{r['makespan_h']:>12.2f}{r['bound_h']:>9.2f}"
                  f"{r['binds']:>7}{r['ratio']:>7.2f}{r['util']:>7.2f}{r['req_per_s']:>12.2f}")
    print("targets: util ≥ 0.85 where the bound is set by total work; makespan ≤ 1.15 × bound")


if __name__ == "__main__":
    main()
