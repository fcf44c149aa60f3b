"""Campaign runtime: spec validation, an end-to-end campaign on local Ray, resume equality, spec freezing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import s3server
import yaml

from rayedit.runtime.catalog import SpecMismatch, campaign_summaries, freeze_spec
from rayedit.runtime.spec import CampaignSpec, SpecError, load_spec, parse_spec, streams, validate_spec_file
from rayedit.runtime.stream import VOLATILE_COLUMNS
from rayedit.store import committed_steps, open_store, read_committed_step, sanitize_id
from rayedit.store.layout import DELTA, EDITS, list_streams

# moto S3 on loopback (same fixtures as test_store)
s3_server = s3server.s3_server
s3_env = s3server.s3_env
s3_bucket = s3server.s3_bucket

REQS = [("Paris", "film"), ("Rome", "movie"), ("Tokyo", "time"), ("Berlin", "people"), ("Madrid", "world"),
        ("Oslo", "work")]


def _write_requests(path: Path) -> Path:
    with path.open("w") as f:
        for i, (s, t) in enumerate(REQS):
            f.write(json.dumps({"case_id": f"c{i}", "prompt": "The best thing about {}", "subject": s,
                                "target_new": t}) + "\n")
    return path


def _spec_dict(data: Path, **over) -> dict:
    fast = {"mom2_n_samples": 200, "v_num_grad_steps": 4}
    d = {
        "name": "Test Campaign",
        "mode": "sequential_batches",
        "models": [{"name": "tiny:llama", "replicas": 2}],
        "methods": [{"name": "memit", "hparams": {**fast, "mom2_update_weight": 100}},
                    {"name": "alphaedit", "hparams": fast}],
        "datasets": [{"kind": "requests", "path": str(data)}],
        "seeds": [0],
        "edits_per_stream": 4,
        "batch_size": 2,
    }
    d.update(over)
    return d


def _write_spec(tmp: Path, d: dict, name: str = "spec.yaml") -> Path:
    p = tmp / name
    p.write_text(yaml.safe_dump(d))
    return p


# --- validation (no Ray) ------------------------------------------------------------------------------
def test_validation_reports_key_paths(tmp_path: Path) -> None:
    data = _write_requests(tmp_path / "r.jsonl")
    d = _spec_dict(data)
    d["methods"][0]["hparamz"] = {}
    d["models"][0]["replicas"] = 0
    d["mode"] = "whatever"
    with pytest.raises(SpecError) as ei:
        parse_spec(d)
    text = str(ei.value)
    assert "methods.0.hparamz: Extra inputs are not permitted" in text
    assert "models.0.replicas:" in text
    assert "mode:" in text


def test_validation_deep_checks(tmp_path: Path) -> None:
    data = _write_requests(tmp_path / "r.jsonl")
    d = _spec_dict(tmp_path / "missing.jsonl")
    d["methods"][0]["hparams"]["layers"] = [99]
    _, problems = validate_spec_file(_write_spec(tmp_path, d))
    assert any(p.startswith("methods.0.hparams:") and "out of range" in p for p in problems)
    assert any(p.startswith("datasets.0.path:") and "not found" in p for p in problems)

    bad = tmp_path / "bad.jsonl"
    bad.write_text(data.read_text() + json.dumps({"case_id": "x", "prompt": "no slot", "subject": "S",
                                                  "target_new": "a"}) + "\n")
    _, problems = validate_spec_file(_write_spec(tmp_path, _spec_dict(bad), "s2.yaml"))
    assert any(p.startswith("datasets.0:") and "bad.jsonl" in p and "prompt" in p for p in problems), problems


def test_cli_validate_exit_code(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from rayedit.cli import app

    data = _write_requests(tmp_path / "r.jsonl")
    good = _write_spec(tmp_path, _spec_dict(data))
    res = CliRunner().invoke(app, ["validate", str(good)])
    assert res.exit_code == 0, res.output
    bad = _write_spec(tmp_path, _spec_dict(data, unknown_key=1), "bad.yaml")
    res = CliRunner().invoke(app, ["validate", str(bad)])
    assert res.exit_code == 2
    assert "unknown_key: Extra inputs are not permitted" in res.output


def test_quickstart_spec_is_valid() -> None:
    root = Path(__file__).resolve().parents[1]
    spec, problems = validate_spec_file(root / "jobs" / "quickstart.yaml")
    assert problems == [] and spec is not None
    assert len(streams(spec)) == 2


def test_stream_ids_and_grid(tmp_path: Path) -> None:
    data = _write_requests(tmp_path / "r.jsonl")
    d = _spec_dict(data, seeds=[0, 1])
    d["methods"][0]["grid"] = {"mom2_update_weight": [10, 100]}
    spec = CampaignSpec.model_validate(d)
    sids = [s.sid for s in streams(spec)]
    assert len(sids) == 6 and len(set(sids)) == 6
    assert sids == [s.sid for s in streams(CampaignSpec.model_validate(d))]  # deterministic


def test_toyworld_model_stats_corpus_is_per_model(tmp_path: Path) -> None:
    """``stats_corpus: toyworld:model``: each toy-world model's statistics come from its own world's corpus;
    any other model is refused by index before anything runs."""
    root = Path(__file__).resolve().parents[1]
    spec, problems = validate_spec_file(root / "jobs" / "audit-toyworld.yaml")
    assert problems == [] and spec is not None
    assert [spec.stats_corpus_for(i) for i in range(len(spec.models))] == ["toyworld:0", "toyworld:1"]
    d = _spec_dict(_write_requests(tmp_path / "r.jsonl"), stats_corpus="toyworld:model")
    with pytest.raises(SpecError) as ei:
        load_spec(_write_spec(tmp_path, d))
    assert "stats_corpus 'toyworld:model' needs toy-world models; not: models.0 ('tiny:llama')" in str(ei.value)


def test_method_preset_file_is_inlined_into_the_spec(tmp_path: Path) -> None:
    """``methods[i].preset``: the file's hparams become the stream's (own hparams override them), with the
    preset's provenance; the parsed spec no longer needs the file; a preset for another method is refused."""
    from rayedit.editing import resolve_hparams
    from rayedit.locate.presets import Preset, PresetProvenance, save_preset

    prov = PresetProvenance(campaign="sweep-1", objective="eff x spec", statement="best of 4", score=0.9)
    save_preset(Preset(method="memit", model="tiny:llama", provenance=prov,
                       hparams={"layers": [1], "v_lr": 0.25, "clamp_norm_factor": 2.0}), tmp_path / "p.yaml")
    data = _write_requests(tmp_path / "r.jsonl")
    d = _spec_dict(data)
    d["methods"] = [{"name": "memit", "preset": "p.yaml", "hparams": {"v_lr": 0.1}}]
    spec_path = _write_spec(tmp_path, d)
    spec = load_spec(spec_path)
    [stream] = streams(spec)
    # the preset's values are a layer below the spec's own (kept apart, so the sources stay known)
    assert stream.hparams["preset_values"]["layers"] == [1] and stream.hparams["v_lr"] == 0.1
    hp = resolve_hparams("memit", "tiny:llama", 2, stream.hparams)
    assert hp.provenance == "preset-file:sweep-1" and hp.layers == [1] and hp.clamp_norm_factor == 2.0
    assert hp.v_lr == 0.1 and hp.value_sources["v_lr"] == "user"  # the spec's own value wins
    assert hp.value_sources["clamp_norm_factor"] == "preset-file:sweep-1"
    (tmp_path / "p.yaml").unlink()  # a frozen spec (re-parsed from its YAML) does not need the file any more
    assert streams(parse_spec(spec.model_dump(mode="json")))[0].hparams == stream.hparams

    save_preset(Preset(method="alphaedit", model="tiny:llama", provenance=prov, hparams={}), tmp_path / "a.yaml")
    d["methods"] = [{"name": "memit", "preset": "a.yaml"}, {"name": "memit", "preset": "missing.yaml"}]
    with pytest.raises(SpecError) as ei:
        load_spec(_write_spec(tmp_path, d, "bad.yaml"))
    assert "methods.0.preset: a.yaml is a preset for alphaedit, not 'memit'" in str(ei.value)
    assert "methods.1.preset:" in str(ei.value) and "not found" in str(ei.value)


# --- Ray end to end -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_local(s3_server):
    import ray

    from rayedit.runtime.campaign import RAY_ENV

    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)
    # Workers get the moto endpoint and its dummy credentials (never real ones) for the S3 test.
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": s3_server.env()})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def campaign_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("campaign")
    data = _write_requests(tmp / "r.jsonl")
    _write_spec(tmp, _spec_dict(data))
    return tmp


@pytest.fixture(scope="module")
def full_run(ray_local, campaign_dir: Path) -> str:
    """The uninterrupted reference run (2 streams × 2 steps)."""
    from rayedit.runtime.campaign import run_campaign

    uri = str(campaign_dir / "store_full")
    run_campaign(campaign_dir / "spec.yaml", uri, progress=True)
    return uri


def test_end_to_end_local(full_run: str) -> None:
    import pyarrow.dataset as ds

    store = open_store(full_run, create=False)
    cid = sanitize_id("Test Campaign")
    sids = list_streams(store, cid)
    assert len(sids) == 2
    tables = []
    for sid in sids:
        assert committed_steps(store, cid, sid) == [0, 1]
        step = read_committed_step(store, cid, sid, 1)
        tensors, meta = step.tensors(DELTA)
        assert any(k.endswith("mlp.down_proj.weight") for k in tensors)
        assert meta["n_edits"] == "4"
        tables.append(step.table(EDITS))
    fs, paths = store.pyarrow_paths([f"campaigns/{cid}/streams/{sid}/steps/{s:06d}/{EDITS}"
                                     for sid in sids for s in (0, 1)])
    tbl = ds.dataset(paths, filesystem=fs, format="parquet").to_table()
    assert tbl.num_rows == 8
    assert sorted(set(tbl.column("method").to_pylist())) == ["alphaedit", "memit"]
    assert {"campaign", "stream", "model", "dataset", "seed", "step", "case_id", "layers", "target_nll",
            "seconds", "peak_memory_mb", "weight_fro_by_layer", "weight_cond_by_layer", "update_fro_by_layer",
            "cond_method"} <= set(tbl.column_names)
    # stability diagnostics read back: one finite value per edited layer
    for layers, fro, cond in zip(tbl.column("layers").to_pylist(), tbl.column("weight_fro_by_layer").to_pylist(),
                                 tbl.column("weight_cond_by_layer").to_pylist(), strict=True):
        assert len(layers) == len(fro) == len(cond) and all(v > 0 for v in fro) and all(v >= 1 for v in cond)
    ae = tbl.filter(ds.field("method") == "alphaedit")
    assert all(r and all(v > 0 for v in r) for r in ae.column("nullspace_rank_by_layer").to_pylist())
    assert all(r and all(0 < v < 1 for v in r) for r in ae.column("nullspace_energy_by_layer").to_pylist())
    summ = campaign_summaries(store, cid)
    assert [s.edits for s in summ] == [4, 4] and all(s.mean_target_nll is not None for s in summ)


def test_resume_is_bitwise_equal(full_run: str, campaign_dir: Path) -> None:
    from rayedit.runtime.campaign import resume_campaign, run_campaign

    uri = str(campaign_dir / "store_resume")
    run_campaign(campaign_dir / "spec.yaml", uri, max_steps=1, progress=False, summary=False)
    store = open_store(uri, create=False)
    cid = load_spec(campaign_dir / "spec.yaml").campaign_id
    sids = list_streams(store, cid)
    assert [committed_steps(store, cid, s) for s in sids] == [[0], [0]]
    resume_campaign(cid, uri, progress=False)
    ref = open_store(full_run, create=False)
    for sid in sids:
        assert committed_steps(store, cid, sid) == [0, 1]
        for step in (0, 1):
            a = read_committed_step(store, cid, sid, step)
            b = read_committed_step(ref, cid, sid, step)
            _assert_same_step(a, b, f"{sid} step {step}")
        rows = [r for s in (0, 1) for r in read_committed_step(store, cid, sid, s).table(EDITS).to_pylist()]
        assert len({r["case_id"] for r in rows}) == len(rows) == 4  # nothing twice


def _int(t):
    import torch

    return {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]


def _assert_same_step(a, b, what: str) -> None:
    """Same tensors bit for bit, same editor-state metadata, same edit rows (timings aside).

    Not a byte comparison of the files: safetensors writes its metadata map in a per-process order.
    """
    ta, ma = a.tensors(DELTA)
    tb, mb = b.tensors(DELTA)
    assert ma == mb and sorted(ta) == sorted(tb), what
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape, f"{what} {k}"
        assert ta[k].reshape(-1).view(_int(ta[k])).equal(tb[k].reshape(-1).view(_int(tb[k]))), f"{what} {k}"
    volatile = list(VOLATILE_COLUMNS)  # timings, process RSS and the Ray node differ between runs
    assert a.table(EDITS).drop_columns(volatile).equals(b.table(EDITS).drop_columns(volatile)), what


def test_changed_spec_is_refused(full_run: str, campaign_dir: Path) -> None:
    from rayedit.runtime.campaign import run_campaign

    d = yaml.safe_load((campaign_dir / "spec.yaml").read_text())
    d["batch_size"] = 4
    changed = _write_spec(campaign_dir, d, "changed.yaml")
    with pytest.raises(SpecMismatch) as ei:
        run_campaign(changed, full_run, progress=False)
    assert "-batch_size: 2" in str(ei.value) and "+batch_size: 4" in str(ei.value)
    # the same spec again is accepted: a re-run of a finished campaign is a no-op
    assert freeze_spec(open_store(full_run), load_spec(campaign_dir / "spec.yaml")) is False
    out = run_campaign(campaign_dir / "spec.yaml", full_run, progress=False, summary=False)
    assert [(s.steps_committed, s.edits) for s in out] == [(2, 4), (2, 4)]


def test_end_to_end_s3_with_resume(full_run: str, campaign_dir: Path, s3_env, s3_bucket: str) -> None:
    """Same campaign (MEMIT stream only) on s3://, interrupted after one step, then re-run: the stream's
    steps equal the local uninterrupted run bit for bit."""
    from rayedit.runtime.campaign import run_campaign
    from rayedit.store.layout import step_dataset

    d = yaml.safe_load((campaign_dir / "spec.yaml").read_text())
    d["methods"] = d["methods"][:1]
    spec_path = _write_spec(campaign_dir, d, "s3.yaml")
    uri = f"s3://{s3_bucket}/campaigns-test"
    run_campaign(spec_path, uri, max_steps=1, progress=False, summary=False)
    run_campaign(spec_path, uri, progress=False, summary=False)  # `run` of the same spec resumes
    store, ref = open_store(uri), open_store(full_run, create=False)
    cid = sanitize_id("Test Campaign")
    (sid,) = list_streams(store, cid)
    assert sid in list_streams(ref, cid)
    assert committed_steps(store, cid, sid) == [0, 1]
    for step in (0, 1):
        a, b = read_committed_step(store, cid, sid, step), read_committed_step(ref, cid, sid, step)
        _assert_same_step(a, b, f"s3 step {step}")
    assert step_dataset(store, cid, sid).to_table().num_rows == 4


def test_cli_status_ls(full_run: str) -> None:
    from typer.testing import CliRunner

    from rayedit.cli import app

    cid = sanitize_id("Test Campaign")
    res = CliRunner().invoke(app, ["ls", "--store", full_run])
    assert res.exit_code == 0 and res.output.split() == [cid]
    res = CliRunner().invoke(app, ["status", cid, "--store", full_run])
    assert res.exit_code == 0 and "tiny-llama--memit" in res.output
    assert CliRunner().invoke(app, ["status", "nope", "--store", full_run]).exit_code == 2


def test_submit_builds_a_ray_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No cluster here: a fake JobSubmissionClient records what `rayedit submit` would send."""
    import ray.job_submission as js
    from typer.testing import CliRunner

    from rayedit.cli import app

    sent: dict = {}

    class FakeClient:
        def __init__(self, address: str) -> None:
            sent["address"] = address

        def submit_job(self, **kw):
            sent.update(kw)
            return "raysubmit_123"

    monkeypatch.setattr(js, "JobSubmissionClient", FakeClient)
    data = _write_requests(tmp_path / "r.jsonl")
    spec = _write_spec(tmp_path, _spec_dict(data))
    res = CliRunner().invoke(app, ["submit", str(spec), "--address", "http://head:8265",
                                   "--working-dir", str(tmp_path), "--store", "s3://bkt/x"])
    assert res.exit_code == 0, res.output
    assert "raysubmit_123" in res.output and sent["address"] == "http://head:8265"
    assert sent["entrypoint"] == "python -m rayedit run spec.yaml --store s3://bkt/x"
    assert sent["runtime_env"]["working_dir"] == str(tmp_path.resolve())
    assert not any("SECRET" in k or "KEY" in k for k in sent["runtime_env"]["env_vars"])
