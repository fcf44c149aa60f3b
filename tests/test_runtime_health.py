"""Health policy (stop / flag a stream past its bounds) and the driver's run state, on local Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_runtime import _spec_dict, _write_requests, _write_spec
from typer.testing import CliRunner

from rayedit.cli import app
from rayedit.runtime import health
from rayedit.runtime.campaign import run_campaign
from rayedit.runtime.catalog import read_run_state
from rayedit.runtime.spec import SpecError, parse_spec
from rayedit.store import committed_steps, open_store, sanitize_id
from rayedit.store.layout import list_streams


def test_health_spec_checks(tmp_path: Path) -> None:
    base = _spec_dict(tmp_path / "r.jsonl")
    with pytest.raises(SpecError, match="min_efficacy needs an evaluation"):
        parse_spec(base | {"health": {"min_efficacy": 0.5}})
    with pytest.raises(SpecError, match="health.max_weight_growth"):
        parse_spec(base | {"health": {"max_weight_growth": 0.5}})
    with pytest.raises(SpecError, match="health.actoin"):
        parse_spec(base | {"health": {"actoin": "stop"}})


def test_events_are_bounds_violations() -> None:
    h = parse_spec(_spec_dict(Path("r.jsonl")) | {"health": {"max_weight_growth": 1.5,
                                                              "max_condition_number": 100.0}}).health
    assert health.check_step(h, "s", 3, 1.2, 50.0) == []
    ev = health.check_step(h, "s", 3, 1.6, float("nan"))
    assert [(e.check, e.action) for e in ev] == [("max_weight_growth", "flag"), ("max_condition_number", "flag")]


def test_stop_policy_stops_and_stays_stopped(tmp_path: Path) -> None:
    """A bound every edit crosses: each stream commits exactly one step, a re-run adds none, status says why;
    with action 'flag' the same bound lets the streams finish and records one event per step."""
    data = _write_requests(tmp_path / "r.jsonl")
    store = str(tmp_path / "store")
    # any edit grows ‖W‖_F by a tiny relative amount: 1 + 1e-9 is crossed at the first step
    stop = _spec_dict(data, name="health stop", health={"action": "stop", "max_weight_growth": 1.000000001})
    spec = _write_spec(tmp_path, stop, "stop.yaml")
    run_campaign(spec, store, progress=False, summary=False)
    st = open_store(store)
    cid = sanitize_id("health stop")
    sids = list_streams(st, cid)
    assert len(sids) == 2
    for sid in sids:
        assert committed_steps(st, cid, sid) == [0], sid
        ev = health.stopped_at(st, cid, sid)
        assert ev is not None and ev.check == "max_weight_growth" and ev.value > 1.0
    state = read_run_state(st, cid)
    assert state["state"] == "finished" and state["planned"][sids[0]]["steps"] == 2
    run_campaign(spec, store, progress=False, summary=False)  # resume: stopped streams stay stopped
    assert all(committed_steps(st, cid, sid) == [0] for sid in sids)
    res = CliRunner().invoke(app, ["status", cid, "--store", store])
    assert res.exit_code == 0, res.output
    assert "stopped after 2 edits (step 1): weight_growth" in res.output and "1/2" in res.output
    assert "run state: finished" in res.output

    flag = _spec_dict(data, name="health flag", health={"action": "flag", "max_weight_growth": 1.000000001})
    run_campaign(_write_spec(tmp_path, flag, "flag.yaml"), store, progress=False, summary=False)
    cid = sanitize_id("health flag")
    for sid in list_streams(st, cid):
        assert committed_steps(st, cid, sid) == [0, 1]
        events = health.stream_events(st, cid, sid)
        assert [(e.step, e.action) for e in events] == [(0, "flag"), (1, "flag")]
        rows = st.read_parquet(f"campaigns/{cid}/streams/{sid}/steps/000001/edits.parquet").to_pylist()
        assert all(max(r["weight_growth_by_layer"]) > 1.0 for r in rows)
    assert json.loads(st.get_bytes(f"campaigns/{cid}/run.json"))["state"] == "finished"


def test_failed_run_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A campaign that fails inside a replica leaves run state 'failed' with the error for `rayedit status`."""
    import rayedit.runtime.campaign as campaign

    data = _write_requests(tmp_path / "r.jsonl")
    store = str(tmp_path / "store")
    real = campaign.build_jobs

    def broken_jobs(*a, **kw):  # a job the replica cannot run: fails in the actor, after the spec is frozen
        out = real(*a, **kw)
        for _, job, _ in out:
            job.method = "no-such-method"
        return out

    monkeypatch.setattr(campaign, "build_jobs", broken_jobs)
    with pytest.raises(Exception, match="no-such-method"):
        run_campaign(_write_spec(tmp_path, _spec_dict(data, name="fails")), store, progress=False, summary=False)
    state = read_run_state(open_store(store), "fails")
    assert state["state"] == "failed" and "no-such-method" in state["error"]
    res = CliRunner().invoke(app, ["status", "fails", "--store", store])
    assert "run state: failed" in res.output and "no-such-method" in res.output


def test_same_without_safety_prompts_is_a_spec_error(tmp_path: Path) -> None:
    d = _spec_dict(_write_requests(tmp_path / "r.jsonl"), methods=[{"name": "same", "hparams": {}}])
    res = CliRunner().invoke(app, ["validate", str(_write_spec(tmp_path, d))])
    assert res.exit_code == 2 and "methods.0.hparams.safety_malicious: SAME needs" in res.output
