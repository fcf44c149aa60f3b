"""Campaign evaluation shards on Ray: parts land and read back across streams; kill -9 of the driver and
resume gives the uninterrupted results; a replica killed in the middle of a shard still completes."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import s3server
import yaml

from rayedit.runtime.spec import CampaignSpec, SpecError, parse_spec
from rayedit.runtime.stream import PLACEMENT_COLUMNS, VOLATILE_COLUMNS
from rayedit.store import committed_steps, eval_parts_done, open_store, read_committed_step, sanitize_id
from rayedit.store.layout import DELTA, EDITS, eval_part_key, list_streams

s3_server = s3server.s3_server
s3_env = s3server.s3_env
s3_bucket = s3server.s3_bucket

ROOT = Path(__file__).resolve().parents[1]
# CI runs one kill trial per cell; RAYEDIT_KILL_TRIALS=5 (or benchmarks) runs more
CID = sanitize_id("Eval Campaign")
KILL_TRIALS = int(os.environ.get("RAYEDIT_KILL_TRIALS", "1"))
FACTS = [("Paris", "France", "Italy"), ("Rome", "Italy", "Spain"), ("Tokyo", "Japan", "China"),
         ("Berlin", "Germany", "Poland"), ("Madrid", "Spain", "France"), ("Oslo", "Norway", "Sweden")]


def _write_counterfact(path: Path) -> Path:
    recs = []
    for i, (s, true, new) in enumerate(FACTS):
        other = FACTS[(i + 1) % len(FACTS)][0]
        recs.append({"case_id": i, "requested_rewrite": {
            "prompt": "{} is a city in", "subject": s, "target_new": {"str": new}, "target_true": {"str": true}},
            "paraphrase_prompts": [f"Everyone knows that {s} is in"],
            "neighborhood_prompts": [f"{other} is a city in"],
            "attribute_prompts": [f"People of {new} like"], "generation_prompts": [f"{s} is famous for"]})
    path.write_text(json.dumps(recs))
    return path


def _spec_dict(data: Path, **over) -> dict:
    fast = {"mom2_n_samples": 200, "v_num_grad_steps": 4}
    d = {
        "name": "Eval Campaign",
        "mode": "sequential_batches",
        "models": [{"name": "tiny:llama", "replicas": 2}],
        "methods": [{"name": "memit", "hparams": {**fast, "mom2_update_weight": 100}},
                    {"name": "alphaedit", "hparams": fast}],
        "datasets": [{"kind": "counterfact", "path": str(data)}],
        "edits_per_stream": 4,
        "batch_size": 2,
        "evaluation": {"at": "every_step", "suites": ["counterfact"], "scope": "edited_so_far", "shard_size": 2},
    }
    d.update(over)
    return d


# --- spec (no Ray) ------------------------------------------------------------------------------------
def test_evaluation_spec_checks(tmp_path: Path) -> None:
    data = _write_counterfact(tmp_path / "cf.json")
    spec = parse_spec(_spec_dict(data))
    assert spec.eval_steps() == [0, 1] and spec.edits_after(0) == 2
    spec = parse_spec(_spec_dict(data, evaluation={"at": [4], "suites": ["counterfact", "easyedit"]}))
    assert spec.eval_steps() == [1]
    with pytest.raises(SpecError) as ei:
        parse_spec(_spec_dict(data, evaluation={"at": [3], "suites": ["zsre"]}))
    text = str(ei.value)
    assert "not the end of a committed step" in text and "suite 'zsre' needs zsre records" in text
    with pytest.raises(SpecError):
        parse_spec(_spec_dict(data, evaluation={"at": "end", "suites": ["counterfact"], "shard_sise": 3}))


def test_shard_plan_scopes(tmp_path: Path) -> None:
    from rayedit.runtime.evaluation import step_ranges

    data = _write_counterfact(tmp_path / "cf.json")
    d = _spec_dict(data, edits_per_stream=6)
    d["evaluation"]["shard_size"] = 3
    assert step_ranges(CampaignSpec.model_validate(d), 2) == [(0, 0, 3), (1, 3, 6)]
    d["evaluation"]["scope"] = "batch"
    assert step_ranges(CampaignSpec.model_validate(d), 2) == [(0, 4, 6)]


def test_realistic_job_specs_validate() -> None:
    from typer.testing import CliRunner

    from rayedit.cli import app

    for name in ("llama3-alphaedit-counterfact.yaml", "audit-multimodel.yaml"):
        res = CliRunner().invoke(app, ["validate", str(ROOT / "jobs" / name)])
        assert res.exit_code == 0, res.output
        assert "ok" in res.output


def test_cluster_yaml_validates_offline() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(cfg))
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"].get("GPU", 0) == 0
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu and all(t["node_config"]["InstanceType"].startswith("g5") for t in gpu)
    assert any(t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot" for t in gpu)
    assert any("rayedit" in c for c in cfg["setup_commands"])


# --- Ray ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_eval(s3_server):
    import ray

    from rayedit.runtime.campaign import RAY_ENV

    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": s3_server.env()})
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("evalcampaign")
    (tmp / "spec.yaml").write_text(yaml.safe_dump(_spec_dict(_write_counterfact(tmp / "cf.json"))))
    return tmp


@pytest.fixture(scope="module")
def eval_ref(ray_eval, eval_dir: Path) -> str:
    """Uninterrupted reference run with evaluations (local store)."""
    from rayedit.runtime.campaign import run_campaign

    uri = str(eval_dir / "store_ref")
    run_campaign(eval_dir / "spec.yaml", uri, progress=True, summary=False)
    return uri


def _eval_table(store, cid: str, sids: list[str]):
    """Every committed evaluation part of the campaign as one pyarrow dataset (across streams)."""
    import pyarrow.dataset as ds

    keys = [eval_part_key(cid, sid, step, "counterfact", sh) for sid in sids for step in (0, 1)
            for sh in eval_parts_done(store, cid, sid, step, "counterfact")]
    fs, paths = store.pyarrow_paths(keys)
    return ds.dataset(paths, filesystem=fs, format="parquet", partitioning=None).to_table()


def _assert_complete(store, cid: str) -> list[str]:
    sids = list_streams(store, cid)
    assert len(sids) == 2
    for sid in sids:
        assert committed_steps(store, cid, sid) == [0, 1]
        # step 0: 2 records → 1 shard; step 1: 4 records (edited so far) → 2 shards
        assert eval_parts_done(store, cid, sid, 0, "counterfact") == [0]
        assert eval_parts_done(store, cid, sid, 1, "counterfact") == [0, 1]
    tbl = _eval_table(store, cid, sids)
    assert tbl.num_rows == 2 * (2 + 4)
    keys = list(zip(*(tbl.column(c).to_pylist() for c in ("stream", "step", "suite", "record_index", "protocol")),
                    strict=True))
    assert len(set(keys)) == len(keys)  # no row twice
    return sids


def _sorted(tbl):
    return tbl.sort_by([("stream", "ascending"), ("step", "ascending"), ("record_index", "ascending")])


def _same_results(store, ref, cid: str) -> None:
    """Same steps (decoded tensors bit for bit, edit rows) and the same evaluation rows (sorted)."""
    import torch

    sids = _assert_complete(store, cid)
    for sid in sids:
        for step in (0, 1):
            a, b = read_committed_step(store, cid, sid, step), read_committed_step(ref, cid, sid, step)
            ta, ma = a.tensors(DELTA)
            tb, mb = b.tensors(DELTA)
            assert ma == mb and sorted(ta) == sorted(tb)
            for k in ta:
                assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k].view(torch.int32), tb[k].view(torch.int32)), k
            vol = list(VOLATILE_COLUMNS)  # timings, RSS and the Ray node that ran it
            assert a.table(EDITS).drop_columns(vol).equals(b.table(EDITS).drop_columns(vol)), f"{sid} {step}"
    where = list(PLACEMENT_COLUMNS)
    assert _sorted(_eval_table(store, cid, sids)).drop_columns(where).equals(
        _sorted(_eval_table(ref, cid, sids)).drop_columns(where))


def test_evaluation_end_to_end_s3(ray_eval, eval_ref: str, eval_dir: Path, s3_env, s3_bucket: str) -> None:
    """The campaign with evaluation on s3://: parts land with their markers; rows have the identity
    columns; the pyarrow dataset over both streams equals the local reference run."""
    from rayedit.runtime.campaign import run_campaign

    uri = f"s3://{s3_bucket}/evals"
    run_campaign(eval_dir / "spec.yaml", uri, progress=False, summary=False)
    store, ref = open_store(uri), open_store(eval_ref, create=False)
    cid = CID
    tbl = _eval_table(store, cid, _assert_complete(store, cid))
    assert {"campaign", "stream", "model", "method", "dataset", "seed", "step", "suite", "scope", "n_edited",
            "record_index", "case_id", "protocol", "efficacy_success", "neighborhood_success"} <= set(tbl.column_names)
    assert sorted(set(tbl.column("method").to_pylist())) == ["alphaedit", "memit"]
    assert set(tbl.column("protocol").to_pylist()) == {"counterfact-prob/v1"}
    _same_results(store, ref, cid)


def _marker_count(store_dir: Path) -> int:
    return sum(1 for _ in store_dir.rglob("COMMITTED")) + sum(1 for _ in store_dir.rglob("*.done"))


def _run_cli(args: list[str], address: str) -> subprocess.Popen:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, "-m", "rayedit", *args, "--address", address], env=env, cwd=str(ROOT),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


@pytest.mark.parametrize("trial", range(KILL_TRIALS))
def test_kill_driver_then_resume(ray_eval: str, eval_ref: str, eval_dir: Path, trial: int) -> None:
    """SIGKILL the driver (a `rayedit run` subprocess) once it has committed a random number of markers
    (steps and evaluation parts; 12 in all), then `rayedit resume`: results equal the uninterrupted run."""
    rng = random.Random(1000 + trial)
    store_dir = eval_dir / f"store_kill{trial}"
    target = rng.randint(1, 9)
    proc = _run_cli(["run", str(eval_dir / "spec.yaml"), "--store", str(store_dir)], ray_eval)
    deadline = time.monotonic() + 240
    while _marker_count(store_dir) < target and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(rng.random() * 0.1)  # land anywhere: mid-step, mid-shard, mid-write
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    killed_at = _marker_count(store_dir)
    res = _run_cli(["resume", CID, "--store", str(store_dir)], ray_eval)
    _, err = res.communicate(timeout=300)
    assert res.returncode == 0, err.decode()[-3000:]
    print(f"trial {trial}: killed after {killed_at} markers (target {target})")
    _same_results(open_store(str(store_dir), create=False), open_store(eval_ref, create=False), CID)


def test_replica_killed_mid_shard(ray_eval: str, eval_ref: str, eval_dir: Path) -> None:
    """ray.kill (with restart) of the replica running the first evaluation shard, while it is inside the
    shard (the shard sleeps 3 s): the call is retried on the restarted actor; results are complete."""
    import threading

    import ray

    from rayedit.runtime.campaign import execute
    from rayedit.runtime.evaluation import FAULT_SLEEP_ENV
    from rayedit.runtime.spec import load_spec

    killed: list[str] = []

    def kill_first(actor, shard) -> None:
        if not killed:
            killed.append(shard.sid)
            threading.Timer(1.5, lambda: ray.kill(actor, no_restart=False)).start()

    uri = str(eval_dir / "store_replica_kill")
    spec = load_spec(eval_dir / "spec.yaml")
    execute(spec, open_store(uri), base_dir=eval_dir, progress=False, on_eval_dispatch=kill_first,
            actor_env={FAULT_SLEEP_ENV: "3"})
    assert killed
    _same_results(open_store(uri, create=False), open_store(eval_ref, create=False), CID)


def test_only_missing_shards_are_planned(eval_ref: str, eval_dir: Path, tmp_path: Path) -> None:
    """Resume planning: a part without its marker (or missing) is re-planned, committed ones are not."""
    import shutil

    from rayedit.runtime.campaign import build_jobs, missing_shards
    from rayedit.runtime.catalog import campaign_summaries
    from rayedit.runtime.spec import load_spec
    from rayedit.store.layout import eval_done_key

    spec = load_spec(eval_dir / "spec.yaml")
    store_dir = tmp_path / "copy"
    shutil.copytree(eval_ref, store_dir)
    store = open_store(str(store_dir), create=False)
    _, job, _ = build_jobs(spec, eval_dir)[0]
    assert missing_shards(spec, store, job, "counterfact", 1) == []
    (store_dir / eval_done_key(CID, job.sid, 1, "counterfact", 1)).unlink()
    assert [s.key for s in missing_shards(spec, store, job, "counterfact", 1)] == [(job.sid, 1, "counterfact", 1)]
    assert missing_shards(spec, store, job, "counterfact", 0) == []  # steps after the last commit: not yet
    assert sorted(s.eval_parts for s in campaign_summaries(store, CID)) == [2, 3]


def test_toyworld_names(tmp_path: Path) -> None:
    """`toyworld:<seed>` models and toyworld dataset kinds resolve through ensure_toyworld (when it exists)."""
    from rayedit.data import toyworld
    from rayedit.runtime.spec import deep_check, toyworld_seed

    assert toyworld_seed("toyworld:3") == 3 and toyworld_seed("tiny:llama") is None
    with pytest.raises(SpecError):
        parse_spec(_spec_dict(tmp_path / "x.json", models=[{"name": "toyworld:abc"}]))
    with pytest.raises(SpecError, match="leave path out"):
        parse_spec(_spec_dict(tmp_path / "x.json", datasets=[{"kind": "toyworld-counterfact", "path": "x"}]))
    spec = parse_spec(_spec_dict(tmp_path / "x.json", models=[{"name": "toyworld:0"}],
                                 datasets=[{"kind": "toyworld-counterfact", "toyworld_seed": 0}]))
    if not hasattr(toyworld, "ensure_toyworld"):
        problems = deep_check(spec)
        assert any("ensure_toyworld" in p for p in problems), problems
        return
    # resolution without building a world: a stand-in ToyWorld whose folder holds our CounterFact file
    from rayedit.runtime.spec import model_path, stream_requests, streams

    _write_counterfact(tmp_path / "counterfact.json")
    calls: list[int] = []

    def fake_ensure(seed: int = 0, **_kw):
        calls.append(seed)
        return toyworld.ToyWorld(root=tmp_path, manifest={"seed": seed})

    mp = pytest.MonkeyPatch()
    mp.setattr(toyworld, "ensure_toyworld", fake_ensure)
    try:
        assert model_path("toyworld:0") == str(tmp_path / "model")
        reqs = stream_requests(spec, streams(spec)[0])
        assert len(reqs) == 4 and {r.subject for r in reqs} <= {f[0] for f in FACTS}
        assert deep_check(spec) == []
    finally:
        mp.undo()
    assert calls and set(calls) == {0}
