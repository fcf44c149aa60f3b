"""A campaign on a real three-node Ray cluster on loopback (tests/multinode.py), submitted with
`rayedit submit`: replicas placed by the spec's resources on the two worker nodes, the statistics stage
sharded across both, then both workers lost one after the other — one in the middle of a stream step, one
in the middle of an evaluation shard — and a replacement node joining. The campaign must finish by itself
and equal an uninterrupted run (bitwise deltas, sorted tables, no row lost or twice); the Parquet says
which node ran each step and shard."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "faults"))

import faultmatrix as fm  # noqa: E402
from multinode import (  # noqa: E402
    LoopbackCluster,
    assert_same_statistics,
    job_logs,
    placement,
    submit,
    wait_fired,
    wait_job,
    write_campaign,
)

from rayedit import faults  # noqa: E402
from rayedit.store import open_store  # noqa: E402

pytestmark = pytest.mark.slow


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
    assert_same_statistics(loss_store, ref_store)

