"""Runtime sharp edges a new user hits (issue 16): resume from another folder (input files pinned in the frozen
spec), SIGTERM/Ctrl-C of `rayedit run`, readable stream ids, and edit counts as the numbering users see."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_runtime import _write_requests
from test_runtime_eval import _write_counterfact
from typer.testing import CliRunner

from rayedit.cli import app
from rayedit.runtime import campaign
from rayedit.runtime.catalog import freeze_spec, read_run_state
from rayedit.runtime.spec import SpecError, load_spec, parse_spec, spec_from_yaml, streams
from rayedit.store import committed_steps, open_store, sanitize_id
from rayedit.store.layout import spec_key


class _NoRay(Exception):
    """Raised instead of starting Ray: everything before it (spec checks, freezing) has passed."""


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_a, **_k):
        raise _NoRay

    monkeypatch.setattr(campaign, "init_ray", refuse)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _folder_spec(folder: Path, **over) -> Path:
    """A spec in ``folder`` whose input files are given relative to it (as a user writes them)."""
    folder.mkdir(parents=True, exist_ok=True)
    _write_requests(folder / "r.jsonl")
    (folder / "corpus.txt").write_text("The river runs north.\nA cat sat on the mat.\n")
    d = {"name": "pinned", "mode": "sequential_batches", "models": [{"name": "tiny:llama", "replicas": 1}],
         "methods": [{"name": "ft"}], "datasets": [{"kind": "requests", "path": "r.jsonl"}], "seeds": [0],
         "edits_per_stream": 4, "batch_size": 2, "stats_corpus": "corpus.txt"} | over
    (folder / "spec.yaml").write_text(yaml.safe_dump(d))
    return folder / "spec.yaml"


# --- 1. resume from any folder; a moved or changed input file is one line -----------------------------
def test_frozen_spec_pins_input_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_ray: None) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    _folder_spec(a)
    b.mkdir()
    uri = str(tmp_path / "store")
    monkeypatch.chdir(a)
    with pytest.raises(_NoRay):  # validated, frozen; stops where Ray would start
        campaign.run_campaign("spec.yaml", uri, progress=False, summary=False)
    frozen = yaml.safe_load(open_store(uri).get_bytes(spec_key("pinned")))
    assert frozen["datasets"][0]["path"] == str(a / "r.jsonl") and frozen["stats_corpus"] == str(a / "corpus.txt")
    assert frozen["files"]["datasets.0.path"]["sha256"] == _sha(a / "r.jsonl")
    assert frozen["files"]["stats_corpus"]["size"] == (a / "corpus.txt").stat().st_size

    monkeypatch.chdir(b)  # resume from another folder: the spec's checks pass
    with pytest.raises(_NoRay):
        campaign.resume_campaign("pinned", uri, progress=False, summary=False)
    monkeypatch.chdir(a)  # the same spec again, from the same place: accepted
    with pytest.raises(_NoRay):
        campaign.run_campaign("spec.yaml", uri, progress=False, summary=False)

    old_sha = _sha(a / "r.jsonl")
    (a / "r.jsonl").write_text((a / "r.jsonl").read_text().replace("film", "song"))
    monkeypatch.chdir(b)
    with pytest.raises(SpecError) as ei:  # a changed data file: one line, key path, both hashes
        campaign.resume_campaign("pinned", uri, progress=False, summary=False)
    [line] = ei.value.problems
    assert line.startswith("datasets.0.path: ") and "changed" in line
    assert old_sha[:16] in line and _sha(a / "r.jsonl")[:16] in line
    monkeypatch.chdir(a)
    with pytest.raises(SpecError) as ei:  # `run` of the spec with the changed file: the same line
        campaign.run_campaign("spec.yaml", uri, progress=False, summary=False)
    assert len(ei.value.problems) == 1 and ei.value.problems[0].startswith("datasets.0.path: ")

    (a / "r.jsonl").rename(a / "moved.jsonl")
    monkeypatch.chdir(b)
    with pytest.raises(SpecError) as ei:  # a moved one: not found, with the hash it was frozen with
        campaign.resume_campaign("pinned", uri, progress=False, summary=False)
    [line] = ei.value.problems
    assert line.startswith(f"datasets.0.path: file {a / 'r.jsonl'} not found") and old_sha[:16] in line


# --- 2. SIGTERM of `rayedit run`: a clean stop, state "interrupted", resume finishes (from another folder) -
def test_sigterm_stops_run_cleanly_and_resume_finishes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    # two streams on one replica: the second has not started when the first commits its first step
    _folder_spec(a, name="sig", seeds=[0, 1], edits_per_stream=6, batch_size=1, stats_corpus="builtin:general")
    b.mkdir()
    store_dir = tmp_path / "store"
    rayedit = str(Path(sys.executable).parent / "rayedit")
    proc = subprocess.Popen([rayedit, "run", "spec.yaml", "--store", str(store_dir), "--no-report"], cwd=a,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not list(store_dir.glob("campaigns/sig/streams/*/steps/*/COMMITTED")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no step committed in time"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, (out, err)
    assert "Traceback" not in err and "SIGTERM received" not in err, err
    assert "interrupted (SIGTERM)" in err and "continue with: rayedit resume sig --store" in err, err
    store = open_store(str(store_dir), create=False)
    state = read_run_state(store, "sig")
    assert state["state"] == "interrupted" and state["signal"] == "SIGTERM" and not state["error"]
    sids = [s.sid for s in streams(load_spec(a / "spec.yaml"))]
    done = {sid: len(committed_steps(store, "sig", sid)) for sid in sids}
    assert 1 <= done[sids[0]] < 6 and done[sids[1]] == 0
    # progress in edits, the step count beside it (the line of the stream's start: the marker the test waits for
    # is written before the driver hears of the step, so later lines may not be printed yet)
    assert f"{sids[0]}: edits 0/6 (step 0/6)" in out, out
    assert f"  {sids[0]}: {done[sids[0]]}/6 edits committed (step {done[sids[0]]}/6)" in err
    assert f"  {sids[1]}: not started" in err

    res = CliRunner().invoke(app, ["status", "sig", "--store", str(store_dir)])
    assert res.exit_code == 0, res.output
    for sid, what in ((sids[0], "interrupted"), (sids[1], "not started")):
        line = next(x for x in res.output.splitlines() if sid in x)
        assert what in line, res.output
    assert "run state: interrupted by SIGTERM" in res.output

    monkeypatch.chdir(b)  # `rayedit resume` from another folder (in this process: one Python start less)
    res = CliRunner().invoke(app, ["resume", "sig", "--store", str(store_dir), "--no-report"])
    assert res.exit_code == 0, res.output[-3000:]
    assert all(len(committed_steps(store, "sig", sid)) == 6 for sid in sids)
    assert read_run_state(store, "sig")["state"] == "finished"


# --- 3. stream ids: short, readable, unique; old campaigns keep theirs --------------------------------------
LONG = "/home/someone/projects/editing-experiments/checkpoints/meta-llama/Meta-Llama-3-8B-Instruct"


def _paths_spec(data: Path) -> dict:
    return {"name": "paths", "mode": "sequential_batches",
            "models": [{"name": LONG}, {"name": "/mnt/other/Meta-Llama-3-8B-Instruct/"}, {"name": "tiny:llama"}],
            "methods": [{"name": "memit"}, {"name": "alphaedit"}],
            "datasets": [{"kind": "requests", "path": str(data)}], "seeds": [0, 1], "edits_per_stream": 4,
            "batch_size": 2}


def test_stream_ids_are_short_and_kept(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _write_requests(tmp_path / "facts.jsonl")
    spec = parse_spec(_paths_spec(data))
    ss = streams(spec)
    sids = [s.sid for s in ss]
    assert len(set(sids)) == len(sids) == 12
    for s in ss:  # the model's distinguishing name, the method, the dataset and the seed are all readable
        assert f"--{s.method}--facts--s{s.seed}" in s.sid, s.sid
        assert len(s.sid) <= 64
    assert sids[0].startswith("meta-llama-meta-llama-3-8b-instruct--memit--facts--s0")  # parent kept: unique
    assert sids[4].startswith("other-meta-llama-3-8b-instruct--memit--facts--s0")
    assert sids[8].startswith("tiny-llama--memit--facts--s0")  # ids of names without paths are as before
    assert sids[8] == sanitize_id("tiny:llama--memit--facts--s0")

    # a frozen spec written before ids were recorded keeps the ids of its time, for resume and for `run`
    legacy = [sanitize_id(f"{s.model}--{s.method_label}--facts--s{s.seed}") for s in ss]
    old_text = yaml.safe_dump({k: v for k, v in yaml.safe_load(spec.frozen_yaml()).items() if k != "stream_ids"})
    assert [s.sid for s in streams(spec_from_yaml(old_text))] == legacy
    store = open_store(str(tmp_path / "store"))
    store.put_bytes(spec_key("paths"), old_text.encode())
    assert freeze_spec(store, spec) is False  # the same spec is accepted ...
    from rayedit.runtime.catalog import freeze

    assert [s.sid for s in streams(freeze(store, spec)[0])] == legacy  # ... and runs with the old ids
    # a new campaign records its ids
    assert yaml.safe_load(spec.frozen_yaml())["stream_ids"] == sids

    # tables: every id in full, also in a terminal too narrow for the table
    from rayedit.runtime.catalog import StreamSummary

    rows = [StreamSummary(sid, 1, 0, 2, 1.5, 0.3) for sid in sids]
    for width in (None, 60):
        campaign.print_summary("paths", rows, width=width)
        out = capsys.readouterr().out
        assert all(sid in out for sid in sids), out
    # `rayedit status` lists every stream of the campaign, started or not
    store2 = str(tmp_path / "store2")
    freeze_spec(open_store(store2), spec)
    res = CliRunner().invoke(app, ["status", "paths", "--store", store2])
    assert res.exit_code == 0, res.output
    assert all(sid in res.output for sid in sids) and res.output.count("not started") == 12


# --- 4. one numbering users recognise: edit counts ----------------------------------------------------------
def test_edit_counts_everywhere(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cf = _write_counterfact(tmp_path / "cf.json")
    d = {"name": "counts", "mode": "sequential_batches", "models": [{"name": "tiny:llama"}],
         "methods": [{"name": "ft"}], "datasets": [{"kind": "counterfact", "path": str(cf)}],
         "edits_per_stream": 6, "batch_size": 2, "evaluation": {"at": [2, 6], "suites": ["counterfact"]}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(d))
    res = CliRunner().invoke(app, ["validate", str(tmp_path / "spec.yaml")])
    assert res.exit_code == 0, res.output
    assert "evaluation after 2 and 6 edits (counterfact)" in res.output and "in 3 steps" in res.output
    assert "after steps" not in res.output

    spec = parse_spec(d)
    [sid] = [s.sid for s in streams(spec)]
    bar = campaign.Progress({sid: 3}, edits_after=spec.edits_after)
    bar.update(sid, 2, "+2 in 0.1s")
    assert f"{sid}: edits 4/6 (step 2/3) +2 in 0.1s" in capsys.readouterr().out

    from rayedit.runtime.catalog import StreamSummary

    campaign.print_summary("counts", [StreamSummary(sid, 2, 1, 4, None, 1.0, 1)],
                           {sid: {"steps": 3, "edits": 6, "eval_parts": 2}})
    out = capsys.readouterr().out
    assert "last step" not in out and "4/6" in out and "2/3" in out

    from rayedit.runtime.health import HealthEvent

    e = HealthEvent(sid, 1, "max_weight_growth", 2.0, 1.5, "stop")
    assert "stopped after 4 edits (step 2): weight_growth" in e.describe(spec.edits_after)

    from test_report import build_campaign

    from rayedit.report import make_report

    store = open_store(str(tmp_path / "store"))
    build_campaign(store, "partial", steps_done={"memit": 2, "alphaedit": 1})  # 4 edits per step
    rep, _ = make_report(store, ["partial"], tmp_path / "out")
    prog = rep.progress[0]
    assert "last step" not in prog.headers and "evaluated (suite@edits)" in prog.headers
    col = prog.headers.index("evaluated (suite@edits)")
    assert sorted(r[col] for r in prog.rows) == ["counterfact@4, custom@4", "counterfact@8, custom@8"]


def test_interrupted_lines_and_exit_codes() -> None:
    """What the CLI prints for SIGINT (Ctrl-C) and SIGTERM: committed work per stream, how to continue."""
    from rayedit.runtime.catalog import StreamSummary

    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        exc = campaign.Interrupted(sig)
        exc.cid, exc.store_hint = "c", "/s"
        exc.planned = {"a": {"steps": 3, "edits": 6}, "b": {"steps": 3, "edits": 6}}
        exc.committed = [StreamSummary("a", 1, 0, 2, None, 0.1), StreamSummary("b", 0, None, 0, None, 0.0)]
        assert exc.exit_code == code and isinstance(exc, KeyboardInterrupt)
        assert exc.lines() == [f"interrupted ({signal.Signals(sig).name}): stopped cleanly; every committed step "
                               "is kept", "  a: 2/6 edits committed (step 1/3)", "  b: not started (0/6 edits)",
                               "continue with: rayedit resume c --store /s"]



def test_sigterm_named_when_ray_reraises_a_plain_keyboardinterrupt() -> None:
    """Ray's blocking calls check signals in C++ and raise a fresh KeyboardInterrupt when the handler fails, so
    the driver may see a plain KeyboardInterrupt after SIGTERM: it must still say SIGTERM and exit 143."""
    from rayedit.runtime.campaign import Interrupted, _interruption, _signal_name, interrupt_signals

    with interrupt_signals():
        try:
            try:
                signal.raise_signal(signal.SIGTERM)  # the handler runs before this returns
                pytest.fail("the SIGTERM handler did not raise")
            except Interrupted:
                raise KeyboardInterrupt from None  # what ray.get / ray.wait raise instead
        except KeyboardInterrupt as exc:
            assert not isinstance(exc, Interrupted)
            stop, name = _interruption(exc), _signal_name(exc)
    assert (stop.signal_name, stop.exit_code, name) == ("SIGTERM", 143, "SIGTERM")
    with interrupt_signals():  # a new run starts with no signal recorded: a bare Ctrl-C is SIGINT
        assert _interruption(KeyboardInterrupt()).signal_name == "SIGINT"
