"""The fault matrix: small campaigns on a local Ray cluster with an S3 server on loopback, each cell one
kind of fault at a random point, then ``rayedit resume``, then a comparison with an uninterrupted run.

Shared by ``tests/faults`` (CI: one trial per cell) and ``benchmarks/faults.py`` (N trials per cell).

Every campaign is a ``rayedit`` CLI subprocess (the driver) connected to one shared Ray cluster that
this process started (so every Ray worker is our descendant, and faults reach the workers through the
job's runtime environment, see ``rayedit/faults.py``). A cell survives when:

- the fault really happened (its record in the fault folder, a killed process, injected S3 faults);
- before resuming, every committed step and evaluation part verifies (sizes and sha256) and the
  object the fault interrupted is not committed (no half-written object is read as committed);
- ``rayedit resume`` exits 0;
- the committed results equal the uninterrupted reference run: delta tensors bit for bit, edit rows
  and evaluation rows as sorted tables, with no row lost and none duplicated;
- a message says what went wrong or what was retried (S3 retries, disk full, a killed replica).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))  # s3server, s3fault_proxy (also when imported by benchmarks/)

import s3server  # noqa: E402
from s3fault_proxy import FaultProxy, Rule  # noqa: E402

from rayedit import faults  # noqa: E402
from rayedit.store import committed_steps, eval_parts_done, open_store, read_committed_step, sanitize_id  # noqa: E402
from rayedit.store.layout import DELTA, EDITS, eval_part_key, list_streams  # noqa: E402

CAMPAIGN = "Fault Matrix"
CID = sanitize_id(CAMPAIGN)
N_STEPS = 3  # per stream; 2 streams (memit, alphaedit) on tiny:llama (saved as a folder)
SUITE = "counterfact"
RUN_TIMEOUT_S = 420.0
FACTS = [("Paris", "France", "Italy"), ("Rome", "Italy", "Spain"), ("Tokyo", "Japan", "China"),
         ("Berlin", "Germany", "Poland"), ("Madrid", "Spain", "France"), ("Oslo", "Norway", "Sweden")]
VOLATILE = ["seconds", "peak_memory_mb", "node_id", "node_ip"]  # timings and the Ray node differ between runs


# --- inputs -------------------------------------------------------------------------------------------
def write_inputs(folder: Path) -> Path:
    """The campaign spec (its CounterFact file, its model) in ``folder``; returns the spec path.

    The model is tiny:llama saved once as a local folder: every replica of every run loads it in well
    under a second, where ``tiny:llama`` would train its BPE tokenizer again in each new process (~5 s
    of CPU per replica, two replicas per driver, two drivers per trial).
    """
    import yaml

    from rayedit.models import save_tiny_model

    folder.mkdir(parents=True, exist_ok=True)
    model = save_tiny_model("llama", folder / "tiny-llama")
    recs = []
    for i, (s, true, new) in enumerate(FACTS):
        other = FACTS[(i + 1) % len(FACTS)][0]
        recs.append({"case_id": i, "requested_rewrite": {
            "prompt": "{} is a city in", "subject": s, "target_new": {"str": new}, "target_true": {"str": true}},
            "paraphrase_prompts": [f"Everyone knows that {s} is in"],
            "neighborhood_prompts": [f"{other} is a city in"],
            "attribute_prompts": [f"People of {new} like"], "generation_prompts": [f"{s} is famous for"]})
    (folder / "cf.json").write_text(json.dumps(recs))
    fast = {"mom2_n_samples": 200, "v_num_grad_steps": 4}
    spec = {
        "name": CAMPAIGN,
        "mode": "sequential_batches",
        "models": [{"name": str(model), "replicas": 2}],
        "methods": [{"name": "memit", "hparams": {**fast, "mom2_update_weight": 100}},
                    {"name": "alphaedit", "hparams": fast}],
        "datasets": [{"kind": "counterfact", "path": str(folder / "cf.json")}],
        "edits_per_stream": N_STEPS,
        "batch_size": 1,
        "evaluation": {"at": "every_step", "suites": [SUITE], "scope": "edited_so_far", "shard_size": 2},
    }
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


# --- processes -----------------------------------------------------------------------------------------
def descendants(pid: int | None = None) -> list[int]:
    """Pids of every process below ``pid`` (default: this one), from /proc."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [os.getpid() if pid is None else pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


TAG_ENV = "RAYEDIT_FAULT_TAG"  # set in one job's workers (runtime env) so a cell finds its own workers


def _environ(pid: int) -> list[bytes]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def replica_workers(tag: str | None = None) -> list[int]:
    """Our Ray workers that host a ModelReplica actor (process title ``ray::ModelReplica``), optionally
    only those of the job whose runtime environment carries ``RAYEDIT_FAULT_TAG=tag``."""
    out = [p for p in descendants() if cmdline(p).startswith("ray::ModelReplica")]
    if tag is not None:
        out = [p for p in out if f"{TAG_ENV}={tag}".encode() in _environ(p)]
    return out


def kill_descendant(pid: int) -> bool:
    """SIGKILL ``pid`` only if it is one of our descendants (never anyone else's process)."""
    if pid in descendants() and alive(pid):
        os.kill(pid, signal.SIGKILL)
        return True
    return False


@dataclass
class Ctx:
    """What every cell needs: the cluster address, the S3 side, a work folder, the reference."""

    address: str
    work: Path
    spec: Path
    ref: str  # local store URI of the uninterrupted run
    s3: Any  # s3server.S3Server (moto)
    proxy: FaultProxy
    base_env: dict[str, str]

    def driver(self, args: list[str], env: dict[str, str] | None = None, worker_env: dict[str, str] | None = None
               ) -> subprocess.Popen:
        """A ``rayedit`` CLI driver on the shared cluster; ``worker_env`` reaches this job's Ray workers."""
        e = dict(self.base_env, **(env or {}))
        if worker_env:
            e["RAY_JOB_CONFIG_JSON_ENV_VAR"] = json.dumps({"runtime_env": {"env_vars": worker_env}})
        return subprocess.Popen([sys.executable, "-m", "rayedit", *args, "--address", self.address], env=e,
                                cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)

    def s3_env(self, via_proxy: bool = True) -> dict[str, str]:
        env = self.s3.env()
        if via_proxy:
            env["AWS_ENDPOINT_URL"] = self.proxy.endpoint_url
        return env


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAYEDIT_FAULT", "RAYEDIT_S3_", "AWS_"))}
    env.update(RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", AWS_EC2_METADATA_DISABLED="true")
    return env


def finish(proc: subprocess.Popen, timeout: float = RUN_TIMEOUT_S) -> tuple[int, str]:
    """Wait for a driver; returns (exit code, stderr + stdout text). Kills its group on timeout."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
        return -999, (err + out).decode(errors="replace") + "\n[timed out]"
    return proc.returncode, (err + out).decode(errors="replace")


def kill_driver(proc: subprocess.Popen) -> None:
    """SIGKILL the driver (its whole process group: the CLI and anything it forked)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


# --- cluster, S3 and the reference run -------------------------------------------------------------------
@dataclass
class Harness:
    """One Ray cluster (in this process), one moto server and its fault proxy, one reference run."""

    ctx: Ctx
    stop: Callable[[], None]


def start_harness(work: Path) -> Harness:
    """Start S3 (moto + proxy), Ray (2 CPUs, in this process), and run the reference campaign."""
    import ray

    server, s3 = s3server.start_s3_server()
    proxy = FaultProxy(s3.host, s3.port).start()
    saved = {k: os.environ.get(k) for k in s3.env()}
    # Ray workers inherit this process's environment: dummy credentials, so S3 works in every replica
    # (the endpoint itself travels with each store's open arguments). This process reads the results
    # straight from the server (no proxy).
    os.environ.update(s3.env())
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # 4 logical CPUs on a 2-core box: two lanes × 2 replicas × 0.5 CPU, plus actors of a killed driver
    # that Ray is still cleaning up; the lanes, not Ray, bound the concurrency.
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    address = ray.get_runtime_context().gcs_address

    def stop() -> None:
        ray.shutdown()
        proxy.stop()
        s3server.stop_s3_server(server)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    try:
        spec = write_inputs(work / "inputs")
        ctx = Ctx(address=address, work=work, spec=spec, ref=str(work / "reference"), s3=s3, proxy=proxy,
                  base_env={**base_env(), "RAYEDIT_CACHE": str(work / "rayedit-cache")})
        code, text = finish(ctx.driver(["run", str(spec), "--store", ctx.ref, "--no-report"]))
        if code != 0:
            raise RuntimeError(f"reference run failed ({code}):\n{text[-3000:]}")
        check_complete(open_store(ctx.ref, create=False))
    except BaseException:
        stop()
        raise
    return Harness(ctx, stop)


# --- reading and comparing results --------------------------------------------------------------------
def _eval_plan() -> dict[int, list[int]]:
    """step → shards: scope edited_so_far, shard_size 2 → 1, 2, 3 records → shards [0], [0], [0, 1]."""
    return {step: list(range(-(-(step + 1) // 2))) for step in range(N_STEPS)}


def check_complete(store) -> None:
    sids = list_streams(store, CID)
    assert len(sids) == 2, sids
    for sid in sids:
        assert committed_steps(store, CID, sid) == list(range(N_STEPS)), (sid, committed_steps(store, CID, sid))
        for step, shards in _eval_plan().items():
            assert eval_parts_done(store, CID, sid, step, SUITE) == shards, (sid, step)


def verify_commits(store) -> list[str]:
    """Problems with what is committed: every marker's objects must verify by sha256."""
    problems = []
    for sid in list_streams(store, CID):
        marked, good = committed_steps(store, CID, sid, verify="none"), committed_steps(store, CID, sid,
                                                                                         verify="sha256")
        if marked != good:
            problems.append(f"{sid}: committed steps {marked} but only {good} verify")
        for step in marked:
            parts = eval_parts_done(store, CID, sid, step, SUITE, verify="none")
            if parts != eval_parts_done(store, CID, sid, step, SUITE, verify="sha256"):
                problems.append(f"{sid} step {step}: an evaluation part does not verify")
    return problems


def _tables(store):
    """(edit rows, evaluation rows, delta tensors by (sid, step)) of everything committed."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    edits, tensors, keys = [], {}, []
    for sid in list_streams(store, CID):
        for step in committed_steps(store, CID, sid):
            c = read_committed_step(store, CID, sid, step)
            edits.append(c.table(EDITS).drop_columns([v for v in VOLATILE if v in c.table(EDITS).column_names]))
            tensors[(sid, step)] = c.tensors(DELTA)
            keys += [eval_part_key(CID, sid, step, SUITE, sh) for sh in eval_parts_done(store, CID, sid, step, SUITE)]
    fs, paths = store.pyarrow_paths(keys)
    evals = ds.dataset(paths, filesystem=fs, format="parquet", partitioning=None).to_table() if paths else None
    if evals is not None:
        evals = evals.drop_columns([v for v in VOLATILE if v in evals.column_names])
    return (pa.concat_tables(edits, promote_options="default") if edits else None), evals, tensors


EDIT_KEY = ("stream", "step", "batch", "case_id")
EVAL_KEY = ("stream", "step", "suite", "record_index", "protocol")


def _keys(tbl, cols) -> Counter:
    if tbl is None:
        return Counter()
    return Counter(zip(*(tbl.column(c).to_pylist() for c in cols), strict=True))


def _lost_dup(got: Counter, ref: Counter) -> tuple[int, int]:
    lost = sum(1 for k in ref if k not in got)
    dup = sum(n - 1 for n in got.values() if n > 1) + sum(n for k, n in got.items() if k not in ref)
    return lost, dup


def _sorted(tbl, cols):
    return tbl.sort_by([(c, "ascending") for c in cols])


@dataclass
class Comparison:
    rows_lost: int = 0
    rows_dup: int = 0
    problems: list[str] = field(default_factory=list)


def compare(store_uri: str, ref_uri: str) -> Comparison:
    """Rows lost/duplicated against the reference, and whatever else differs (tensors, values)."""
    import torch

    store, ref = open_store(store_uri, create=False), open_store(ref_uri, create=False)
    out = Comparison(problems=verify_commits(store))
    e1, v1, t1 = _tables(store)
    e0, v0, t0 = _tables(ref)
    for got, want, cols in ((e1, e0, EDIT_KEY), (v1, v0, EVAL_KEY)):
        lost, dup = _lost_dup(_keys(got, cols), _keys(want, cols))
        out.rows_lost += lost
        out.rows_dup += dup
        if not lost and not dup and got is not None and want is not None:
            a, b = _sorted(got, cols), _sorted(want.select(got.column_names), cols)
            if not a.equals(b):
                out.problems.append(f"rows keyed by {cols} have the same keys but different values")
    if sorted(t1) != sorted(t0):
        out.problems.append(f"committed steps differ: {sorted(set(t0) ^ set(t1))}")
    for k in sorted(set(t1) & set(t0)):
        (ta, ma), (tb, mb) = t1[k], t0[k]
        if sorted(ta) != sorted(tb) or ma != mb:
            out.problems.append(f"{k}: delta tensor names or metadata differ")
            continue
        for name in ta:
            a, b = ta[name], tb[name]
            if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a.view(torch.uint8), b.view(torch.uint8)):
                out.problems.append(f"{k}: tensor {name} is not bitwise equal")
    return out


# --- cells ------------------------------------------------------------------------------------------------
@dataclass
class Trial:
    cell: str
    trial: int
    survived: bool = False
    rows_lost: int = 0
    rows_dup: int = 0
    seconds: float = 0.0
    fault: str = ""  # what was injected, where
    message: str = ""  # the line that says what went wrong / what was retried
    problems: list[str] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase (run, resume, compare)
    _t: float = field(default_factory=time.perf_counter)

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] = self.phases.get(name, 0.0) + now - self._t
        self._t = now

    def fail(self, why: str) -> Trial:
        self.problems.append(why)
        return self


def _grep(text: str, *needles: str) -> str:
    """The first line of ``text`` that contains any of ``needles`` (case-insensitive), stripped."""
    for line in text.splitlines():
        low = line.lower()
        if any(n.lower() in low for n in needles):
            return line.strip()[:300]
    return ""


def _resume_and_compare(ctx: Ctx, t: Trial, uri: str, env: dict[str, str] | None = None,
                        expect_report: bool = False) -> Trial:
    t.lap("fault")
    args = ["resume", CID, "--store", uri] + ([] if expect_report else ["--no-report"])
    code, text = finish(ctx.driver(args, env=env))
    t.lap("resume")
    if code != 0:
        return t.fail(f"resume exited {code}: {text[-1500:]}")
    if not t.message:  # what the resume says it picked up (or wrote)
        t.message = _grep(text, "report written to") if expect_report else \
            (_grep(text, "(resumed)") or _grep(text, ": edits ", "already complete"))
    cmp = compare(uri, ctx.ref)  # S3: this process has the server's credentials (start_harness), no proxy
    t.rows_lost, t.rows_dup = cmp.rows_lost, cmp.rows_dup
    t.problems += cmp.problems
    if expect_report:
        store = open_store(uri, create=False)
        if not store.exists(f"campaigns/{CID}/report/report.html"):
            t.problems.append("resume did not write the report")
    t.survived = not t.problems and t.rows_lost == 0 and t.rows_dup == 0
    t.lap("compare")
    return t


def _store(ctx: Ctx, name: str) -> str:
    return str(ctx.work / name)


def _wait_fired(proc: subprocess.Popen, folder: Path, point: str, timeout: float = RUN_TIMEOUT_S) -> dict | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rec = faults.fired(folder, point)
        if rec is not None:
            return rec
        if proc.poll() is not None:
            return faults.fired(folder, point)
        time.sleep(0.05)
    return None


def _uncommitted(uri: str, key: str) -> str | None:
    """The problem if the object (a store key) whose commit the fault interrupted is committed (it must not be)."""
    store = open_store(uri, create=False)
    parts = key.split("/")
    if "streams" not in parts:
        return None
    sid = parts[parts.index("streams") + 1]
    if "steps" in parts:
        step = int(parts[parts.index("steps") + 1])
        if step in committed_steps(store, CID, sid):
            return f"step {step} of {sid} is committed although its commit was interrupted"
    elif "eval" in parts:
        step, suite, name = int(parts[parts.index("eval") + 1]), parts[-2], parts[-1]
        shard = int(name.split("-", 1)[1].split(".", 1)[0])
        if shard in eval_parts_done(store, CID, sid, step, suite):
            return f"evaluation part {shard} of {sid} step {step} is committed although its commit was interrupted"
    return None


# Points where a replica pauses while the test kills the driver, and how many times each replica
# reaches them in this campaign (so the random n always lands inside the run).
DRIVER_POINTS = {"editing": 3, "delta-upload": 3, "marker-write": 4, "eval-shard": 2}


def cell_driver_kill(point: str) -> Callable[[Ctx, int, random.Random], Trial]:
    def run(ctx: Ctx, trial: int, rng: random.Random) -> Trial:
        t = Trial(f"driver-kill/{point}", trial)
        n = rng.randint(1, DRIVER_POINTS[point])
        folder = ctx.work / f"faults-{point}-{trial}"
        folder.mkdir(parents=True)
        uri = _store(ctx, f"store-driver-{point}-{trial}")
        proc = ctx.driver(["run", str(ctx.spec), "--store", uri, "--no-report"],
                          worker_env={faults.FAULT_ENV: f"{point}:{n}:PAUSE", faults.FAULT_DIR_ENV: str(folder),
                                      faults.PAUSE_ENV: "120"})
        rec = _wait_fired(proc, folder, point)
        if rec is None:
            finish(proc, 60)
            return t.fail(f"{point}:{n} was never reached (the run ended first)")
        t.lap("run")
        kill_driver(proc)  # the driver dies while a replica is inside `point`
        proc.wait(30)
        t.fault = f"{point} #{n} in replica pid {rec['pid']}: driver SIGKILLed"
        deadline = time.monotonic() + 30  # Ray ends a dead driver's actors; else we do it (ours only)
        while alive(rec["pid"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        if alive(rec["pid"]):
            kill_descendant(rec["pid"])
            t.fault += " (replica killed by the test)"
        if rec.get("detail"):
            problem = _uncommitted(uri, rec["detail"])
            if problem:
                t.problems.append(problem)
        t.problems += verify_commits(open_store(uri, create=False))
        return _resume_and_compare(ctx, t, uri)

    return run


def cell_driver_kill_report(ctx: Ctx, trial: int, rng: random.Random) -> Trial:
    """The driver SIGKILLs itself while writing the final report (after all results are committed)."""
    t = Trial("driver-kill/report", trial)
    n = rng.randint(1, 6)
    folder = ctx.work / f"faults-report-{trial}"
    folder.mkdir(parents=True)
    uri = _store(ctx, f"store-report-{trial}")
    code, text = finish(ctx.driver(["run", str(ctx.spec), "--store", uri],
                                   env={faults.FAULT_ENV: f"report:{n}", faults.FAULT_DIR_ENV: str(folder)}))
    rec = faults.fired(folder, "report")
    if rec is None or code != -signal.SIGKILL:
        return t.fail(f"report:{n} did not kill the driver (exit {code}): {text[-800:]}")
    t.fault = f"report file #{n}: driver SIGKILLed"
    store = open_store(uri, create=False)
    if store.exists(f"campaigns/{CID}/report/report.html") and n == 1:
        t.problems.append("report.html exists although the driver died before writing it")
    return _resume_and_compare(ctx, t, uri, expect_report=True)


def cell_replica_killed(ctx: Ctx, trial: int, rng: random.Random) -> Trial:
    """A replica SIGKILLs itself inside a step: Ray restarts the actor and retries the call."""
    t = Trial("replica-killed", trial)
    n = rng.randint(1, N_STEPS)
    folder = ctx.work / f"faults-replica-{trial}"
    folder.mkdir(parents=True)
    uri = _store(ctx, f"store-replica-{trial}")
    code, text = finish(ctx.driver(["run", str(ctx.spec), "--store", uri, "--no-report"],
                                   worker_env={faults.FAULT_ENV: f"editing:{n}:KILL",
                                               faults.FAULT_DIR_ENV: str(folder)}))
    rec = faults.fired(folder, "editing")
    if rec is None:
        return t.fail(f"editing:{n} never fired: {text[-800:]}")
    t.fault = f"replica pid {rec['pid']} SIGKILLed inside step editing #{n}"
    if code != 0:
        return t.fail(f"the run did not survive the replica's death (exit {code}): {text[-1500:]}")
    t.message = _grep(text, "worker died", "actor died", "unexpectedly", "restart", "was killed") or \
        "(no message in the driver's output)"
    return _resume_and_compare(ctx, t, uri)


def cell_worker_killed(ctx: Ctx, trial: int, rng: random.Random) -> Trial:
    """SIGKILL of a Ray worker process hosting a replica, from outside, after a random number of commits."""
    t = Trial("ray-worker-killed", trial)
    uri = _store(ctx, f"store-worker-{trial}")
    target = rng.randint(1, 8)
    tag = f"worker-{trial}-{os.getpid()}"
    proc = ctx.driver(["run", str(ctx.spec), "--store", uri, "--no-report"], worker_env={TAG_ENV: tag})
    root = Path(uri)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while proc.poll() is None and time.monotonic() < deadline:
        markers = sum(1 for _ in root.rglob("COMMITTED")) + sum(1 for _ in root.rglob("*.done"))
        if markers >= target:
            break
        time.sleep(0.05)
    time.sleep(rng.random() * 0.5)
    workers = [p for p in replica_workers(tag) if alive(p)]
    if proc.poll() is not None or not workers:
        finish(proc, 60)
        return t.fail(f"the run ended before a worker could be killed (target {target} markers)")
    victim = rng.choice(sorted(workers))
    kill_descendant(victim)
    t.fault = f"worker pid {victim} ({cmdline(victim) or 'ray::ModelReplica'}) SIGKILLed after {target} markers"
    code, text = finish(proc)
    if code != 0:
        return t.fail(f"the run did not survive the worker's death (exit {code}): {text[-1500:]}")
    t.message = _grep(text, "worker died", "actor died", "unexpectedly", "restart", "was killed") or \
        "(no message in the driver's output)"
    return _resume_and_compare(ctx, t, uri)


_PROXY_LOCK = threading.Lock()  # one S3 cell at a time owns the proxy's rules (and its statistics)


def _with_proxy(cell: Callable[[Ctx, int, random.Random], Trial]) -> Callable[[Ctx, int, random.Random], Trial]:
    def run(ctx: Ctx, trial: int, rng: random.Random) -> Trial:
        with _PROXY_LOCK:
            return cell(ctx, trial, rng)

    run.uses_proxy = True  # type: ignore[attr-defined]
    return run


S3_RULES: dict[str, Callable[[random.Random], tuple[list[Rule], dict[str, str]]]] = {
    # slow replies: some shorter, some longer than the 1 s read timeout (a lost reply of a landed write)
    "s3-slow": lambda rng: ([Rule("delay", prob=0.15, max_faults=12, delay_s=(0.3, 2.0))],
                            {"RAYEDIT_S3_READ_TIMEOUT": "1"}),
    "s3-reset": lambda rng: ([Rule("reset_before", prob=0.08, max_faults=8),
                              Rule("reset_after", op="PutObject", prob=0.15, max_faults=6)], {}),
    "s3-5xx": lambda rng: ([Rule("status", prob=0.1, max_faults=12, status=rng.choice([500, 503]))], {}),
}


def cell_s3(name: str) -> Callable[[Ctx, int, random.Random], Trial]:
    @_with_proxy
    def run(ctx: Ctx, trial: int, rng: random.Random) -> Trial:
        t = Trial(name, trial)
        bucket = ctx.s3.new_bucket("faults")
        uri = f"s3://{bucket}/{name}-{trial}"
        rules, extra = S3_RULES[name](rng)
        ctx.proxy.set_rules(rules, seed=rng.randrange(2**31))
        env = {**ctx.s3_env(), **extra}
        try:
            code, text = finish(ctx.driver(["run", str(ctx.spec), "--store", uri, "--no-report"], env=env))
        finally:
            stats = ctx.proxy.stats
            ctx.proxy.set_rules([])
        t.fault = f"{stats.total_faults()} faults in {stats.requests} requests: " + \
            ", ".join(f"{k[0]} {k[1]} ×{n}" for k, n in sorted(stats.faults.items()))
        if stats.total_faults() == 0:
            return t.fail("no fault was injected")
        if code != 0:
            return t.fail(f"the run did not survive the S3 faults (exit {code}): {text[-1500:]}")
        t.message = _grep(text, "succeeded after", "reply was lost", "reading it again")
        if not t.message:
            t.problems.append("no message says what was retried")
        return _resume_and_compare(ctx, t, uri, env=ctx.s3_env())

    return run


@_with_proxy
def cell_s3_multipart(ctx: Ctx, trial: int, rng: random.Random) -> Trial:
    """Every attempt of one multipart upload fails (a part, or the completion): the step fails with a
    clear message, the upload is aborted, nothing of it is committed; resume completes."""
    t = Trial("s3-multipart-fails", trial)
    bucket = ctx.s3.new_bucket("faults")
    uri = f"s3://{bucket}/mp-{trial}"
    op = rng.choice(["UploadPart", "CompleteMultipartUpload"])
    skip = rng.randint(0, 2)  # which upload fails: the first, second or third (stats partial, cov, deltas)
    ctx.proxy.set_rules([Rule("status", op=op, status=500, sticky=True, skip=skip, max_faults=10)],
                        seed=rng.randrange(2**31))
    env = {**ctx.s3_env(), "RAYEDIT_S3_MULTIPART_THRESHOLD": str(48 * 1024)}
    try:
        code, text = finish(ctx.driver(["run", str(ctx.spec), "--store", uri, "--no-report"], env=env))
    finally:
        stats = ctx.proxy.stats
        ctx.proxy.set_rules([])
    t.fault = f"{op} of multipart upload #{skip + 1} answered HTTP 500 to every attempt " \
              f"({stats.total_faults()} faults, {stats.ops['CreateMultipartUpload']} multipart uploads)"
    if stats.total_faults() == 0:
        return t.fail("no multipart upload was attempted")
    if code == 0:
        return t.fail("the run succeeded although an upload failed every attempt")
    t.message = _grep(text, "multipart upload (aborted) of '")
    if not t.message:
        t.problems.append(f"no clear message about the failed upload: {text[-1200:]}")
    t.problems += verify_commits(open_store(uri, create=False))
    return _resume_and_compare(ctx, t, uri, env={**ctx.s3_env(), "RAYEDIT_S3_MULTIPART_THRESHOLD": str(48 * 1024)})


def cell_enospc(ctx: Ctx, trial: int, rng: random.Random) -> Trial:
    """A local store write hits ENOSPC half-way (in a replica): the run stops with a clear message,
    the partial file is gone, nothing half-written is committed; resume completes."""
    t = Trial("local-enospc", trial)
    n = rng.randint(1, 8)
    folder = ctx.work / f"faults-enospc-{trial}"
    folder.mkdir(parents=True)
    uri = _store(ctx, f"store-enospc-{trial}")
    code, text = finish(ctx.driver(["run", str(ctx.spec), "--store", uri, "--no-report"],
                                   worker_env={faults.FAULT_ENV: f"local-write:{n}:ENOSPC",
                                               faults.FAULT_DIR_ENV: str(folder)}))
    rec = faults.fired(folder, "local-write")
    if rec is None:
        return t.fail(f"local-write:{n} never fired (exit {code})")
    t.fault = f"ENOSPC half-way through local write #{n} in pid {rec['pid']}"
    if code == 0:
        return t.fail("the run succeeded although a write failed")
    t.message = _grep(text, "the disk is full")
    if not t.message:
        t.problems.append(f"no clear disk-full message: {text[-1200:]}")
    if os.path.exists(rec["detail"]):
        t.problems.append(f"the partial temporary file {rec['detail']} was left behind")
    t.problems += verify_commits(open_store(uri, create=False))
    return _resume_and_compare(ctx, t, uri)


CELLS: dict[str, Callable[[Ctx, int, random.Random], Trial]] = {
    "driver-kill/editing": cell_driver_kill("editing"),
    "driver-kill/delta-upload": cell_driver_kill("delta-upload"),
    "driver-kill/marker-write": cell_driver_kill("marker-write"),
    "driver-kill/eval-shard": cell_driver_kill("eval-shard"),
    "driver-kill/report": cell_driver_kill_report,
    "replica-killed": cell_replica_killed,
    "ray-worker-killed": cell_worker_killed,
    "s3-slow": cell_s3("s3-slow"),
    "s3-reset": cell_s3("s3-reset"),
    "s3-5xx": cell_s3("s3-5xx"),
    "s3-multipart-fails": cell_s3_multipart,
    "local-enospc": cell_enospc,
}


def run_trial(ctx: Ctx, cell: str, trial: int, seed: int = 0) -> Trial:
    rng = random.Random(f"{seed}/{cell}/{trial}")
    t0 = time.perf_counter()
    try:
        t = CELLS[cell](ctx, trial, rng)
    except Exception as exc:  # a harness error is a failed trial with its reason, not a crash of the matrix
        t = Trial(cell, trial, problems=[f"{type(exc).__name__}: {exc}"])
    t.seconds = time.perf_counter() - t0
    return t


def plan(cells: list[str], trials: int) -> list[tuple[str, int]]:
    """(cell, trial) in run order: trial by trial, S3 cells interleaved with the others so that two lanes
    rarely wait for the proxy at the same time."""
    s3 = [c for c in cells if getattr(CELLS[c], "uses_proxy", False)]
    rest = [c for c in cells if c not in s3]
    order: list[str] = []
    while s3 or rest:
        for group in (rest, s3):
            if group:
                order.append(group.pop(0))
    return [(c, t) for t in range(trials) for c in order]


def run_matrix(ctx: Ctx, cells: list[str], trials: int = 1, seed: int = 0, lanes: int = 2,
               on_trial: Callable[[Trial], None] | None = None) -> list[Trial]:
    """Every (cell, trial), ``lanes`` at a time (each lane drives its own campaign on the shared cluster:
    the work is mostly single-threaded process start-up, so two lanes keep both cores busy)."""
    from concurrent.futures import ThreadPoolExecutor

    todo = plan(list(cells), trials)
    lock = threading.Lock()
    out: list[Trial] = []

    def lane() -> None:
        while True:
            with lock:
                if not todo:
                    return
                cell, trial = todo.pop(0)
            t = run_trial(ctx, cell, trial, seed)
            with lock:
                out.append(t)
                if on_trial:
                    on_trial(t)

    with ThreadPoolExecutor(max_workers=max(1, lanes), thread_name_prefix="fault-lane") as pool:
        for f in [pool.submit(lane) for _ in range(max(1, lanes))]:
            f.result()
    return out
