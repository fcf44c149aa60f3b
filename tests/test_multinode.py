"""A campaign on a real three-node Ray cluster on loopback (tests/multinode.py), submitted with
`rayedit submit`: replicas placed by the spec's resources on the two worker nodes, the statistics stage
sharded across both, then both workers lost one after the other — one in the middle of a stream step, one
in the middle of an evaluation shard — and a replacement node joining. The campaign must finish by itself
and equal an uninterrupted run (bitwise deltas, sorted tables, no row lost or twice); the Parquet says
which node ran each step and shard."""

from __future__ import annotations

import re
import shutil
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "faults"))

import faultmatrix as fm  # noqa: E402
from multinode import LoopbackCluster  # noqa: E402

from rayedit import faults  # noqa: E402
from rayedit.store import committed_steps, eval_parts_done, open_store, read_committed_step  # noqa: E402
from rayedit.store.layout import EDITS, list_streams  # noqa: E402

pytestmark = pytest.mark.slow
JOB_TIMEOUT_S = 300.0
REPLICA = {"replica": 1}  # what a replica needs; only worker nodes advertise it (the head has none)


def write_campaign(folder: Path, stats_samples: int = 1500) -> Path:
    """The fault matrix's campaign (2 streams × 3 steps, evaluation after every step) with replicas that need
    the ``replica`` resource, and a statistics corpus of 1500 documents (two ranges of ≤ 1000)."""
    spec_path = fm.write_inputs(folder / "inputs")
    spec = yaml.safe_load(spec_path.read_text())
    spec["models"][0]["resources"] = dict(REPLICA)
    spec["stats_samples"] = stats_samples
    for m in spec["methods"]:
        m["hparams"].pop("mom2_n_samples", None)
    project = folder / "project"  # what `rayedit submit` ships: the package and the spec (data: absolute paths)
    shutil.copytree(ROOT / "rayedit", project / "rayedit", ignore=shutil.ignore_patterns("__pycache__"))
    (project / "spec.yaml").write_text(yaml.safe_dump(spec))
    return project / "spec.yaml"


def submit(dashboard: str, spec: Path, store: str) -> str:
    from typer.testing import CliRunner

    from rayedit.cli import app

    res = CliRunner().invoke(app, ["submit", str(spec), "--address", dashboard, "--store", store,
                                   "--working-dir", str(spec.parent)])
    assert res.exit_code == 0, res.output
    found = re.search(r"submitted (\S+) to", res.output)
    assert found, res.output
    return found.group(1)


def job_status(dashboard: str, job: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return str(JobSubmissionClient(dashboard).get_job_status(job))


def job_logs(dashboard: str, job: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(dashboard).get_job_logs(job)


def wait_job(dashboard: str, job: str, timeout: float = JOB_TIMEOUT_S) -> str:
    deadline = time.monotonic() + timeout
    while (status := job_status(dashboard, job)) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job} still {status} after {timeout:.0f} s:\n{job_logs(dashboard, job)[-3000:]}")
        time.sleep(1)  # polling a remote job's state
    return status


def wait_fired(folder: Path, point: str, dashboard: str, job: str, timeout: float = JOB_TIMEOUT_S) -> dict:
    deadline = time.monotonic() + timeout
    while (rec := faults.fired(folder, point)) is None:
        status = job_status(dashboard, job)
        if status in ("SUCCEEDED", "FAILED", "STOPPED") or time.monotonic() > deadline:
            raise AssertionError(f"fault point {point} never fired (job {status}):\n"
                                 f"{job_logs(dashboard, job)[-3000:]}")
        time.sleep(0.2)  # polling for the replica to reach its fault point
    return rec


def placement(store_uri: str, names: dict[str, str]) -> tuple[dict[tuple[str, int], str], dict[tuple, set[str]]]:
    """(stream, step) → node name that committed it; (stream, step, suite, shard) → node names in its rows."""
    store = open_store(store_uri, create=False)
    steps, shards = {}, {}
    for sid in list_streams(store, fm.CID):
        for step in committed_steps(store, fm.CID, sid):
            nodes = set(read_committed_step(store, fm.CID, sid, step).table(EDITS).column("node_id").to_pylist())
            assert len(nodes) == 1, (sid, step, nodes)
            steps[(sid, step)] = names.get(nodes.pop(), "?")
            for sh in eval_parts_done(store, fm.CID, sid, step, fm.SUITE):
                import pyarrow.parquet as pq

                fs, [path] = store.pyarrow_paths([fm.eval_part_key(fm.CID, sid, step, fm.SUITE, sh)])
                tbl = pq.read_table(path, filesystem=fs)
                shards[(sid, step, fm.SUITE, sh)] = {names.get(n, "?") for n in tbl.column("node_id").to_pylist()}
    return steps, shards


@pytest.fixture(scope="module")
def cluster():
    c = LoopbackCluster()
    try:
        try:
            c.start_head(num_cpus=1)
        except (RuntimeError, OSError) as exc:
            reason = f"Ray cannot start a head node here: {exc}"
            print(reason)
            pytest.skip(reason)
        yield c
    finally:
        c.stop()


def test_campaign_survives_losing_both_workers_and_uses_the_replacement(cluster: LoopbackCluster,
                                                                          tmp_path: Path) -> None:
    spec = write_campaign(tmp_path)
    fired = tmp_path / "faults"
    fired.mkdir()
    # Each worker advertises room for both replicas (a lost node's replica is recreated on the survivor).
    # The faults reach the replicas through their node's environment: w1's replica pauses inside its 2nd
    # batch (a step in flight, nothing committed), w2's inside its 1st evaluation shard; each fires once.
    common = {faults.FAULT_DIR_ENV: str(fired), faults.PAUSE_ENV: "240"}
    cluster.add_worker("w1", resources={"replica": 2}, env={faults.FAULT_ENV: "editing:2:PAUSE", **common})
    cluster.add_worker("w2", resources={"replica": 2}, env={faults.FAULT_ENV: "eval-shard:1:PAUSE", **common})
    try:
        ids = cluster.wait_alive(["head", "w1", "w2"])
    except RuntimeError as exc:
        reason = f"Ray cannot start worker nodes here: {exc}"
        print(reason)
        pytest.skip(reason)
    names = {v: k for k, v in ids.items()}  # node id → name, kept after the nodes are gone

    loss_store = str(tmp_path / "store-loss")
    job = submit(cluster.dashboard, spec, loss_store)
    rec = wait_fired(fired, "editing", cluster.dashboard, job)
    assert cluster.node_of_pid(rec["pid"]) == "w1", rec
    killed = cluster.kill_node("w1")
    assert rec["pid"] in killed and len(killed) >= 3  # raylet, agents, workers: the whole node
    cluster.add_worker("w3", resources={"replica": 2})  # the spot replacement
    names |= {v: k for k, v in cluster.wait_alive(["w3"]).items()}
    rec2 = wait_fired(fired, "eval-shard", cluster.dashboard, job)
    assert cluster.node_of_pid(rec2["pid"]) == "w2", rec2
    assert rec2["pid"] in cluster.kill_node("w2")
    assert wait_job(cluster.dashboard, job) == "SUCCEEDED", job_logs(cluster.dashboard, job)[-4000:]
    logs = job_logs(cluster.dashboard, job)

    # the uninterrupted reference: the same spec on what is left, the head and w3 (one worker node)
    ref_store = str(tmp_path / "store-ref")
    ref_job = submit(cluster.dashboard, spec, ref_store)
    assert wait_job(cluster.dashboard, ref_job) == "SUCCEEDED", job_logs(cluster.dashboard, ref_job)[-4000:]

    # exactly the uninterrupted results: every step and shard, deltas bit for bit, no row lost or twice
    for uri in (loss_store, ref_store):
        fm.check_complete(open_store(uri, create=False))
    cmp = fm.compare(loss_store, ref_store)
    assert (cmp.rows_lost, cmp.rows_dup, cmp.problems) == (0, 0, [])

    # placement, from the Parquet: replicas spread over both workers, never on the head; after the losses
    # the campaign went on on the survivor (w2) and on the replacement (w3)
    steps, shards = placement(loss_store, names)
    assert set(steps.values()) <= {"w1", "w2", "w3"} and {"w1", "w2"} <= set(steps.values()), steps
    assert "w3" in set(steps.values()) | set().union(*shards.values()), (steps, shards)
    assert set().union(*shards.values()) <= {"w1", "w2", "w3"}, shards
    w1_streams = {sid for (sid, _), n in steps.items() if n == "w1"}
    assert len(w1_streams) == 1  # one replica (one stream) per worker at the start
    (lost_sid,) = w1_streams
    last_w1 = max(s for (sid, s), n in steps.items() if sid == lost_sid and n == "w1")
    assert all(steps[(lost_sid, s)] in ("w2", "w3") for s in range(last_w1 + 1, fm.N_STEPS))
    ref_steps, ref_shards = placement(ref_store, names)
    assert set(ref_steps.values()) | set().union(*ref_shards.values()) == {"w3"}

    # statistics: the two document ranges ran on the two workers, and the reduced covariances equal the
    # single-node (w3-only) result bit for bit (ranges are fixed by the document count, summed in order)
    ran_on = {names.get(n, "?") for n in re.findall(r"statistics: range \d+/2 done on node (\w+)", logs)}
    assert ran_on == {"w1", "w2"}, logs[-3000:]
    _assert_same_statistics(loss_store, ref_store)


def _assert_same_statistics(a_uri: str, b_uri: str) -> None:
    import torch

    from rayedit.editing.covariance import SecondMoment

    a, b = open_store(a_uri, create=False), open_store(b_uri, create=False)
    keys = sorted(a.list("cache/stats"))
    assert keys and keys == sorted(b.list("cache/stats"))
    for key in keys:
        sa, sb = SecondMoment.from_bytes(a.get_bytes(key), key), SecondMoment.from_bytes(b.get_bytes(key), key)
        assert sa.provenance["shards"] == 2 and sa.count == sb.count
        assert torch.equal(sa.sum, sb.sum), (key, float((sa.sum - sb.sum).norm() / sb.sum.norm()))
