"""Node-loss trials on a real multi-node Ray cluster on loopback (tests/multinode.py): N trials per kill
point, each losing a whole worker node (raylet, agents, workers: SIGKILL by pid) at a random point of a
submitted campaign, with a replacement node joining right after. Prints, per kill point: trials where the
campaign completed by itself, rows lost, rows duplicated, trials with bitwise-equal deltas, trials with
statistics equal to the single-node run, and in how many the replacement node ran steps or shards.

    python benchmarks/node_loss.py --trials 3 [--points editing,eval-shard] [--seed 0] [--json out.json]

The cluster: a head (driver only: it has no ``replica`` resource) and a survivor node ``s`` with room for
both replicas; each trial adds a victim node with the fault in its environment, so the replica SPREAD
onto it pauses at the kill point and the whole node is killed there. The campaign (2 streams × 3 steps
of tiny:llama, MEMIT and AlphaEdit, evaluation after every step, a 2-range statistics stage) is compared
with one uninterrupted reference run on ``s`` alone: the same sorted edit and evaluation rows, each
(stream, step, batch, case) and (stream, step, suite, record) exactly once, delta tensors bit for bit.

Kill points (counted per replica process, n drawn at random per trial):
  editing         inside a step's batch, before anything of the step is written
  delta-upload    a commit in flight: an object of a step or evaluation part written, its marker not
  step-committed  a step committed, its report not yet back at the driver (Ray retries the call)
  eval-shard      inside an evaluation shard
Exit status 1 unless every trial completed with nothing lost, duplicated or different.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import multinode as mn  # noqa: E402
from multinode import fm  # noqa: E402

from rayedit import faults  # noqa: E402
from rayedit.store import open_store  # noqa: E402

POINTS = {"editing": (1, 3), "delta-upload": (1, 3), "step-committed": (1, 3), "eval-shard": (1, 2)}


@dataclass
class Trial:
    point: str
    trial: int
    n: int
    completed: bool = False
    rows_lost: int = 0
    rows_dup: int = 0
    deltas_equal: bool = False
    stats_equal: bool = False
    placement: str = ""  # steps/shards committed by the victim, the survivor and the replacement node
    seconds: float = 0.0
    after_kill_s: float = 0.0  # from the kill to the job's end
    problems: list[str] = field(default_factory=list)


def run_trial(c: mn.LoopbackCluster, spec: Path, ref: str, work: Path, names: dict[str, str], point: str,
              trial: int, n: int) -> Trial:
    t = Trial(point, trial, n)
    t0 = time.perf_counter()
    folder = work / f"faults-{point}-{trial}"
    folder.mkdir(parents=True)
    victim, spare = f"v{point[:3]}{trial}", f"r{point[:3]}{trial}"
    c.add_worker(victim, resources={"replica": 2},
                 env={faults.FAULT_ENV: f"{point}:{n}:PAUSE", faults.FAULT_DIR_ENV: str(folder),
                      faults.PAUSE_ENV: "240"})
    names |= {v: k for k, v in c.wait_alive([victim]).items()}
    store = str(work / f"store-{point}-{trial}")
    job = mn.submit(c.dashboard, spec, store)
    try:
        rec = mn.wait_fired(folder, point, c.dashboard, job)
    except AssertionError as exc:
        t.problems.append(str(exc)[:400])
        mn.wait_job(c.dashboard, job)
        c.stop_node(victim)
        return t
    where = c.node_of_pid(rec["pid"])
    if where != victim:
        t.problems.append(f"the fault fired on {where}, not on the victim {victim}")
    c.kill_node(victim)
    t_kill = time.perf_counter()
    c.add_worker(spare, resources={"replica": 2})  # the spot replacement
    status = mn.wait_job(c.dashboard, job)
    t.after_kill_s = time.perf_counter() - t_kill
    names |= {v: k for k, v in c.wait_alive([spare]).items()}
    if status != "SUCCEEDED":
        t.problems.append(f"job {status}: {mn.job_logs(c.dashboard, job)[-600:]}")
    else:
        try:
            fm.check_complete(open_store(store, create=False))
            t.completed = True
        except AssertionError as exc:
            t.problems.append(f"incomplete: {exc}")
        cmp = fm.compare(store, ref)
        t.rows_lost, t.rows_dup = cmp.rows_lost, cmp.rows_dup
        t.deltas_equal = not any("tensor" in p or "committed steps differ" in p for p in cmp.problems)
        t.problems += cmp.problems
        try:
            mn.assert_same_statistics(store, ref)
            t.stats_equal = True
        except AssertionError as exc:
            t.problems.append(f"statistics differ: {str(exc)[:200]}")
        steps, shards = mn.placement(store, names)
        role = {victim: "victim", "s": "survivor", spare: "replacement"}
        count = {r: [0, 0] for r in role.values()}
        for node in steps.values():
            count[role.get(node, "victim")][0] += 1
        for nodes in shards.values():
            for node in nodes:
                count[role.get(node, "victim")][1] += 1
        t.placement = " ".join(f"{r} {a}/{b}" for r, (a, b) in count.items())
    c.stop_node(spare)  # scale back down: the next trial starts from the head and the survivor again
    t.seconds = time.perf_counter() - t0
    return t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=3, help="trials per kill point (default 3)")
    ap.add_argument("--points", default=",".join(POINTS), help=f"comma-separated subset of {', '.join(POINTS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    points = [p for p in args.points.split(",") if p]
    bad = [p for p in points if p not in POINTS]
    if bad:
        ap.error(f"unknown point(s) {bad}")
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="rayedit-nodeloss-"))
    t0 = time.perf_counter()
    c = mn.LoopbackCluster()
    trials: list[Trial] = []
    try:
        c.start_head(num_cpus=1)
        c.add_worker("s", resources={"replica": 2})
        names = {v: k for k, v in c.wait_alive(["head", "s"]).items()}
        spec = mn.write_campaign(work)
        ref = str(work / "reference")
        ref_job = mn.submit(c.dashboard, spec, ref)
        if mn.wait_job(c.dashboard, ref_job) != "SUCCEEDED":
            raise RuntimeError(f"reference run failed: {mn.job_logs(c.dashboard, ref_job)[-3000:]}")
        fm.check_complete(open_store(ref, create=False))
        logs = mn.job_logs(c.dashboard, ref_job)
        ref_nodes = {names.get(x, "?") for x in re.findall(r"done on node (\w+)", logs)}
        print(f"cluster and single-node reference run ready in {time.perf_counter() - t0:.0f} s "
              f"(statistics ranges on {sorted(ref_nodes)}; {work})", flush=True)
        for trial in range(args.trials):
            for point in points:
                lo, hi = POINTS[point]
                t = run_trial(c, spec, ref, work, names, point, trial, rng.randint(lo, hi))
                trials.append(t)
                ok = t.completed and not t.problems and not t.rows_lost and not t.rows_dup
                print(f"[{time.perf_counter() - t0:6.0f}s] {point:15s} trial {trial} (#{t.n}): "
                      f"{'ok' if ok else 'FAILED'}; lost {t.rows_lost}, dup {t.rows_dup}, "
                      f"deltas {'bitwise equal' if t.deltas_equal else 'DIFFER'}, "
                      f"statistics {'equal' if t.stats_equal else 'DIFFER'}; steps/shards by {t.placement}; "
                      f"{t.after_kill_s:.0f} s from the kill to the end", flush=True)
                for p in t.problems:
                    print(f"{'':10s}problem: {p[:500]}", flush=True)
    finally:
        c.stop()
    print()
    print(f"{'kill point':15s} {'completed':>10s} {'rows lost':>10s} {'rows dup':>9s} {'deltas ==':>10s} "
          f"{'stats ==':>9s}  replacement node used")
    ok = bool(trials)
    for point in points:
        ts = [t for t in trials if t.point == point]
        if not ts:
            continue
        done = sum(t.completed for t in ts)
        lost, dup = sum(t.rows_lost for t in ts), sum(t.rows_dup for t in ts)
        eq, st = sum(t.deltas_equal for t in ts), sum(t.stats_equal for t in ts)
        where = f"{sum(bool(t.placement) and 'replacement 0/0' not in t.placement for t in ts)}/{len(ts)}"
        ok &= done == len(ts) and lost == dup == 0 and eq == st == len(ts) and not any(t.problems for t in ts)
        print(f"{point:15s} {f'{done}/{len(ts)}':>10s} {lost:>10d} {dup:>9d} {f'{eq}/{len(ts)}':>10s} "
              f"{f'{st}/{len(ts)}':>9s}  {where}")
    print(f"\n{sum(t.completed for t in trials)}/{len(trials)} trials completed after losing a node, "
          f"in {time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps([asdict(t) for t in trials], indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
