"""`rayedit report`: tables checked against the Parquet, committed-only reading, HTML in headless Chromium.

Stores are built directly with commit_step / commit_eval_part and synthetic rows (no Ray, no model).
"""

from __future__ import annotations

import csv
import io
import math
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3server

from rayedit.report import build_report, make_report
from rayedit.report.load import expected_streams
from rayedit.report.plots import method_colours
from rayedit.report.stats import Stat, mean_ci, t975
from rayedit.store import commit_eval_part, commit_step, open_store
from rayedit.store.formats import encode_parquet
from rayedit.store.layout import EDITS, edits_key, eval_part_key, spec_key

# moto S3 server fixtures (see tests/s3server.py)
s3_server = s3server.s3_server
s3_env = s3server.s3_env
s3_bucket = s3server.s3_bucket

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
METHODS = ("memit", "alphaedit")


def _spec_yaml(name: str, edits: int, batch: int) -> str:
    """A frozen spec exactly as `rayedit run` writes it."""
    from rayedit.runtime.spec import parse_spec

    spec = parse_spec({
        "name": name, "mode": "sequential_batches", "models": [{"name": "tiny:llama"}],
        "methods": [{"name": m} for m in METHODS], "datasets": [{"path": "data/facts.jsonl"}],
        "seeds": [0], "edits_per_stream": edits, "batch_size": batch, "checkpoint_every": 1,
    })
    return spec.frozen_yaml()


def _edit_rows(cid: str, sid: str, method: str, step: int, batch_size: int, rng: np.random.Generator,
               nll_shift: float = 0.0) -> list[dict[str, Any]]:
    layers = [1, 2]
    common = {
        "weight_fro_by_layer": [float(x) for x in 3 + step + rng.random(2)],
        "weight_cond_by_layer": [float(x) for x in 5 * (step + 1) + rng.random(2)],
        "weight_sigma_max_by_layer": [float(x) for x in 1 + rng.random(2)],
        "weight_sigma_min_by_layer": [float(x) for x in 0.1 + 0.1 * rng.random(2)],
        "update_fro_by_layer": [float(x) for x in 1 + rng.random(2)],
        "seconds": float(1 + rng.random()),
    }
    return [{"campaign": cid, "stream": sid, "model": "tiny:llama", "method": method, "method_label": method,
             "dataset": "facts", "seed": 0, "step": step, "batch": step, "layers": layers,
             "case_id": f"c{step}-{i}", "delta_norm": float(rng.random()), "h0_norm": 1.0, "z_norm": 1.0,
             "target_nll": float(nll_shift + 2 + rng.standard_normal()), "target_steps": int(rng.integers(5, 25)),
             "peak_memory_mb": 500.0, **common}
            for i in range(batch_size)]


def _eval_rows(cid: str, sid: str, method: str, step: int, n_records: int, rng: np.random.Generator,
               p: float) -> list[dict[str, Any]]:
    rows = []
    for i in range(n_records):
        rows.append({"campaign": cid, "stream": sid, "model": "tiny:llama", "method": method, "dataset": "facts",
                     "seed": 0, "step": step, "suite": "counterfact", "protocol": "counterfact-prob/v1",
                     "case_id": f"r{i}", "record_index": i, "chat_template": False,
                     "efficacy_success": bool(rng.random() < p), "paraphrase_success": float(rng.random() < p),
                     "neighborhood_success": float(rng.random() < 0.8), "efficacy_diff": float(rng.random()),
                     "target_new_nll": [0.1, 0.2]})  # a raw list column: must be ignored
    return rows


def _general_rows(cid: str, sid: str, method: str, step: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    """A suite of a protocol the report does not know: every numeric column is a metric."""
    return [{"campaign": cid, "stream": sid, "model": "tiny:llama", "method": method, "dataset": "facts", "seed": 0,
             "step": step, "suite": "custom", "protocol": "custom/v1", "case_id": f"g{i}", "record_index": i,
             "delta_u": float(-0.05 * step + 0.01 * rng.standard_normal()), "unsafe": float(rng.random() < 0.2)}
            for i in range(8)]


def build_campaign(store, cid: str, *, steps_done: dict[str, int], n_steps: int = 3, batch: int = 4,
                   seed: int = 0, uncommitted: bool = False) -> dict[str, str]:
    """A campaign with `steps_done[method]` committed steps per stream, evaluated at every committed step."""
    store.put_bytes(spec_key(cid), _spec_yaml(cid, n_steps * batch, batch).encode())
    spec_text = store.get_bytes(spec_key(cid)).decode()
    import yaml

    sids = {s.method: s.sid for s in expected_streams(yaml.safe_load(spec_text))}
    rng = np.random.default_rng(seed)
    for mi, method in enumerate(METHODS):
        sid = sids[method]
        for step in range(steps_done.get(method, 0)):
            rows = _edit_rows(cid, sid, method, step, batch, rng, nll_shift=mi)
            assert commit_step(store, cid, sid, step, {EDITS: encode_parquet(pa.Table.from_pylist(rows)),
                                                        "delta.safetensors": b"not-read-by-reports"})
            ev = _eval_rows(cid, sid, method, step, batch * (step + 1), rng, p=0.9 - 0.2 * mi)
            half = len(ev) // 2
            assert commit_eval_part(store, cid, sid, step, "counterfact", 0, pa.Table.from_pylist(ev[:half]))
            assert commit_eval_part(store, cid, sid, step, "counterfact", 1, pa.Table.from_pylist(ev[half:]))
            assert commit_eval_part(store, cid, sid, step, "custom", 0,
                                    pa.Table.from_pylist(_general_rows(cid, sid, method, step, rng)))
        if uncommitted:
            step = steps_done.get(method, 0)
            # an interrupted step: data written, marker never written; its eval part even has a marker
            bad = _edit_rows(cid, sid, method, step, batch, rng, nll_shift=1e6)
            store.put_bytes(edits_key(cid, sid, step), encode_parquet(pa.Table.from_pylist(bad)))
            junk = _eval_rows(cid, sid, method, step, 3, rng, p=0.0)
            commit_eval_part(store, cid, sid, step, "counterfact", 0, pa.Table.from_pylist(junk))
            # and a part of a committed step without its .done marker
            if step > 0:
                store.put_bytes(eval_part_key(cid, sid, step - 1, "counterfact", 9),
                                encode_parquet(pa.Table.from_pylist(junk)))
    return sids


# --- direct computations from the Parquet files ---------------------------------------------------
def _committed_files(root: Path, cid: str, sid: str) -> list[Path]:
    steps = root / "campaigns" / cid / "streams" / sid / "steps"
    return sorted(p / EDITS for p in steps.iterdir() if (p / "COMMITTED").exists())


def _direct_edits(root: Path, cid: str, sid: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in _committed_files(root, cid, sid)])


def _direct_eval(root: Path, cid: str, sid: str, step: int, suite: str) -> pa.Table:
    folder = root / "campaigns" / cid / "streams" / sid / "eval" / f"{step:06d}" / suite
    parts = sorted(p for p in folder.glob("part-*.parquet") if p.with_suffix(".done").exists())
    return pa.concat_tables([pq.read_table(p) for p in parts], promote_options="permissive")


def _ci(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(t975(len(a) - 1) * a.std(ddof=1) / math.sqrt(len(a)))


def _row(table, model: str, method: str) -> dict[str, Any]:
    for r in table.rows:
        if r[0] == model and r[1] == method:
            return dict(zip(table.headers, r, strict=True))
    raise AssertionError(f"no row {model}/{method} in {table.title}")


def _close(stat: Stat, mean: float, half: float) -> None:
    assert stat.mean == pytest.approx(mean, rel=1e-9, abs=1e-12)
    assert stat.ci95 == pytest.approx(half, rel=1e-9, abs=1e-12)


# --- tests ----------------------------------------------------------------------------------------
def test_t_quantiles() -> None:
    assert t975(1) == pytest.approx(12.706)
    assert t975(30) == pytest.approx(2.042)
    assert t975(60) == pytest.approx(2.000, abs=2e-3)
    assert t975(10_000) == pytest.approx(1.960, abs=1e-3)
    s = mean_ci([1.0, 2.0, 3.0, float("nan"), None])
    assert (s.mean, s.n) == (2.0, 3) and s.ci95 == pytest.approx(4.303 * 1.0 / math.sqrt(3))
    assert mean_ci([]).n == 0 and math.isnan(mean_ci([5.0]).ci95)


def test_expected_stream_ids_match_runtime() -> None:
    import yaml

    from rayedit.runtime.spec import spec_from_yaml, streams

    text = _spec_yaml("ids", 6, 2)
    spec = spec_from_yaml(text)
    assert [s.sid for s in expected_streams(yaml.safe_load(text))] == [s.sid for s in streams(spec)]
    grid = {"name": "g", "mode": "sequential_batches", "models": [{"name": "tiny:llama"}, {"name": "tiny:gpt2"}],
            "methods": [{"name": "memit", "grid": {"mom2_update_weight": [10, 100], "layers": [[1, 2]]}}],
            "datasets": [{"path": "a/b.jsonl"}, {"path": "c.jsonl", "name": "Named Set"}], "seeds": [0, 3],
            "edits_per_stream": 4}
    from rayedit.runtime.spec import parse_spec

    g = parse_spec(grid)
    ours = expected_streams(yaml.safe_load(g.frozen_yaml()))
    theirs = streams(g)
    assert [(s.sid, s.method_label, s.dataset) for s in ours] == [(s.sid, s.method_label, s.dataset) for s in theirs]
    try:  # dataset kinds of newer specs (toy world, hub names), when this checkout has them
        kinds = parse_spec({**grid, "datasets": [{"kind": "toyworld-counterfact"},
                                                 {"kind": "counterfact", "path": "org/counterfact"}]})
    except Exception:
        return
    assert [s.sid for s in expected_streams(yaml.safe_load(kinds.frozen_yaml()))] == [s.sid for s in streams(kinds)]


def test_finished_campaign_tables_match_parquet(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = open_store(str(root))
    sids = build_campaign(store, "done", steps_done={"memit": 3, "alphaedit": 3})
    rep, where = make_report(store, ["done"])  # default: into the store
    assert where.endswith("campaigns/done/report")
    out = root / "campaigns" / "done" / "report"
    assert (out / "report.html").stat().st_size > 10_000
    assert (out / "tables" / "done--facts--eval.csv").exists() and (out / "tables" / "done--facts--eval.md").exists()
    assert (out / "tables" / "done--facts--editing.md").exists() and (out / "tables" / "curves.csv").exists()

    prog = rep.progress[0]
    assert all(_row(prog, "tiny:llama", m)["steps"] == "3/3" for m in METHODS)
    assert all(_row(prog, "tiny:llama", m)["status"] == "finished" for m in METHODS)
    assert rep.campaigns[0].finished

    ev = next(t for t in rep.tables if t.name == "done--facts--eval")
    diag = next(t for t in rep.tables if t.name == "done--facts--editing")
    for method in METHODS:
        sid = sids[method]
        direct = _direct_eval(root, "done", sid, 2, "counterfact").to_pydict()  # last committed step
        row = _row(ev, "tiny:llama", method)
        assert row["edits"] == "12"
        for label, col in (("Eff.", "efficacy_success"), ("Gen.", "paraphrase_success"),
                           ("Spe.", "neighborhood_success")):
            _close(row[label], *_ci([100.0 * float(v) for v in direct[col]]))
            assert row[label].n == 12
        means = [row[k].mean for k in ("Eff.", "Gen.", "Spe.")]
        assert row["Score"] == pytest.approx(3 / sum(1 / m for m in means))
        gen = _direct_eval(root, "done", sid, 2, "custom").to_pydict()
        _close(row["Δ_U"], *_ci(gen["delta_u"]))  # not in [0, 1]: raw units
        _close(row["Unsafe"], *_ci([100.0 * v for v in gen["unsafe"]]))  # a rate: percent

        edits = _direct_edits(root, "done", sid).to_pydict()
        d = _row(diag, "tiny:llama", method)
        assert d["edits"] == "12/12"
        _close(d["Target NLL"], *_ci(edits["target_nll"]))
        _close(d["‖δ‖"], *_ci(edits["delta_norm"]))
        last = [i for i, b in enumerate(edits["batch"]) if b == max(edits["batch"])][-1]
        assert d["‖W‖_F (final)"].mean == pytest.approx(float(np.mean(edits["weight_fro_by_layer"][last])))
        per_batch = {b: float(np.mean(u)) for b, u in zip(edits["batch"], edits["update_fro_by_layer"], strict=True)}
        _close(d["‖ΔW‖_F (per batch)"], *_ci(list(per_batch.values())))
        secs = {b: s for b, s in zip(edits["batch"], edits["seconds"], strict=True)}
        assert d["s / edit"] == pytest.approx(sum(secs.values()) / 12)

    # the CSV carries the same numbers in full precision
    with open(out / "tables" / "done--facts--eval.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert float(rows["memit"]["Eff. mean"]) == pytest.approx(_row(ev, "tiny:llama", "memit")["Eff."].mean)
    assert float(rows["memit"]["Eff. ci95"]) == pytest.approx(_row(ev, "tiny:llama", "memit")["Eff."].ci95)
    md = (out / "tables" / "done--facts--eval.md").read_text()
    assert "| tiny:llama | memit |" in md and "±" in md

    # curves: one point per committed step, x = edits so far, retention only over earlier edits
    curves = list(csv.DictReader(io.StringIO((out / "tables" / "curves.csv").read_text())))
    eff = [r for r in curves if r["metric"] == "eval:counterfact:counterfact-prob/v1:efficacy_success"
           and r["method_label"] == "memit"]
    assert sorted(int(r["x"]) for r in eff) == [4, 8, 12]
    ret = {int(r["x"]): r for r in curves if r["metric"].startswith("retention:counterfact")
           and r["method_label"] == "memit"}
    direct = _direct_eval(root, "done", sids["memit"], 2, "counterfact").to_pydict()
    old = [100.0 * float(v) for v, i in zip(direct["efficacy_success"], direct["record_index"], strict=True) if i < 8]
    assert float(ret[12]["mean"]) == pytest.approx(np.mean(old)) and int(ret[12]["n"]) == 8
    layer = [r for r in curves if r["metric"] == "layer:weight_cond" and r["method_label"] == "alphaedit"]
    assert len(layer) == 3

    html = (out / "report.html").read_text()
    assert "<script" not in html and "http://" not in html.replace("http://www.w3.org", "")
    assert html.count("data:image/svg+xml;base64,") == len(rep.figures) >= 10
    assert "finished" in html


def test_partly_finished_campaign_reads_committed_only(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = open_store(str(root))
    sids = build_campaign(store, "partial", steps_done={"memit": 2, "alphaedit": 1}, uncommitted=True)
    out = tmp_path / "out"
    rep, where = make_report(str(root), ["partial"], out)
    assert Path(where) == out.resolve()
    prog = rep.progress[0]
    assert _row(prog, "tiny:llama", "memit")["steps"] == "2/3"
    assert _row(prog, "tiny:llama", "alphaedit")["steps"] == "1/3"
    assert _row(prog, "tiny:llama", "alphaedit")["edits"] == "4/12"
    assert _row(prog, "tiny:llama", "memit")["status"] == "running"
    assert not rep.campaigns[0].finished

    ev = next(t for t in rep.tables if t.name == "partial--facts--eval")
    diag = next(t for t in rep.tables if t.name == "partial--facts--editing")
    for method, last_step in (("memit", 1), ("alphaedit", 0)):
        sid = sids[method]
        edits = _direct_edits(root, "partial", sid).to_pydict()
        assert max(edits["target_nll"]) < 1e5  # the direct read is committed-only too
        d = _row(diag, "tiny:llama", method)
        _close(d["Target NLL"], *_ci(edits["target_nll"]))
        direct = _direct_eval(root, "partial", sid, last_step, "counterfact").to_pydict()
        row = _row(ev, "tiny:llama", method)
        assert row["edits"] == str(4 * (last_step + 1))
        _close(row["Eff."], *_ci([100.0 * float(v) for v in direct["efficacy_success"]]))
        assert row["Eff."].n == 4 * (last_step + 1)  # neither the uncommitted step's part nor the unmarked one
    html = (out / "report.html").read_text()
    assert "running / incomplete" in html and "2/3 steps" in html and "1/3 steps" in html
    # nothing was written into the store when --out is a folder
    assert not (root / "campaigns" / "partial" / "report").exists()


def test_campaigns_side_by_side_share_axes_and_colours(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "store"))
    build_campaign(store, "lr-a", steps_done={"memit": 3, "alphaedit": 3}, seed=1)
    build_campaign(store, "lr-b", steps_done={"memit": 3, "alphaedit": 1}, seed=2)
    rep = build_report(store, ["lr-a", "lr-b"])
    colours = method_colours(METHODS)
    assert colours["alphaedit"] != colours["memit"]
    for fig in rep.figures:
        assert fig.svg.count("lr-a") >= 1 and fig.svg.count("lr-b") >= 1  # both panels in every figure
        assert colours["memit"].lower() in fig.svg.lower()
    assert {t.name for t in rep.summary} == {"lr-a--facts--eval", "lr-b--facts--eval"}
    from rayedit.report import write_report

    where = write_report(rep, store, ["lr-a", "lr-b"])
    assert "campaigns/lr-a/report/compare--lr-b" in where


def test_cli_report(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    import rayedit.cli.report_cmd  # noqa: F401  (registers the command)
    from rayedit.cli.app import app

    root = tmp_path / "store"
    build_campaign(open_store(str(root)), "cli", steps_done={"memit": 1})
    res = CliRunner().invoke(app, ["report", "cli", "--store", str(root), "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert "cli · facts: evaluation" in res.output and "report written to" in res.output
    assert (tmp_path / "o" / "report.html").exists()
    res = CliRunner().invoke(app, ["report", "nope", "--store", str(root)])
    assert res.exit_code == 2 and "no campaign 'nope'" in res.output


def test_quickstart_sized_report_renders_fast(tmp_path: Path) -> None:
    """2 streams × 4 steps × 10 edits (jobs/quickstart.yaml), evaluated at every step: well under 10 s."""
    store = open_store(str(tmp_path / "store"))
    build_campaign(store, "quick", steps_done={"memit": 4, "alphaedit": 4}, n_steps=4, batch=10)
    t0 = time.perf_counter()
    rep, _ = make_report(store, ["quick"], tmp_path / "out")
    took = time.perf_counter() - t0
    size = (tmp_path / "out" / "report.html").stat().st_size
    print(f"quickstart-sized report: {took:.2f} s, report.html {size / 1024:.0f} KiB, {len(rep.figures)} figures")
    assert took < 10.0


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium not installed (Debian: apt-get install chromium); "
                                              ".ci/run installs it so this runs in CI")
def test_html_opens_in_headless_chromium(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "store"))
    build_campaign(store, "shot", steps_done={"memit": 3, "alphaedit": 2})
    out = tmp_path / "out"
    make_report(store, ["shot"], out)
    png = tmp_path / "report.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'chr'}",
           "--window-size=1400,2000", f"--screenshot={png}", "--enable-logging=stderr", "--v=0",
           (out / "report.html").resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    console = [ln for ln in proc.stderr.splitlines() if ":CONSOLE" in ln or "Failed to load resource" in ln]
    assert not console, "console errors:\n" + "\n".join(console)
    assert png.exists() and png.stat().st_size > 20_000, proc.stderr[-2000:]



def test_report_of_an_s3_store(s3_env, s3_bucket: str) -> None:
    """Reading (pyarrow's S3 filesystem) and writing (Store API) a report in an s3:// store."""
    store = open_store(f"s3://{s3_bucket}/runs")
    build_campaign(store, "ons3", steps_done={"memit": 2, "alphaedit": 1}, uncommitted=True)
    rep, where = make_report(f"s3://{s3_bucket}/runs", ["ons3"])
    assert where == f"s3://{s3_bucket}/runs/campaigns/ons3/report"
    assert store.exists("campaigns/ons3/report/report.html")
    assert store.exists("campaigns/ons3/report/tables/ons3--facts--eval.md")
    prog = rep.progress[0]
    assert _row(prog, "tiny:llama", "memit")["steps"] == "2/3"
    assert _row(next(t for t in rep.tables if t.name == "ons3--facts--eval"), "tiny:llama", "alphaedit")["Eff."].n == 4


def test_campaign_without_committed_steps(tmp_path: Path) -> None:
    """A campaign that has only its spec (or whose spec is missing) still gets a report."""
    store = open_store(str(tmp_path / "store"))
    store.put_bytes(spec_key("fresh"), _spec_yaml("fresh", 4, 2).encode())
    rep, _ = make_report(store, ["fresh"], tmp_path / "out")
    assert [r[4] for r in rep.progress[0].rows] == ["0/2", "0/2"]
    assert all(r[8] == "not started" for r in rep.progress[0].rows)
    assert not rep.figures and "No committed steps yet" in rep.html
    # no spec at all, one committed step: the stream is still reported from its rows
    rows = _edit_rows("nospec", "s1", "memit", 0, 2, np.random.default_rng(0))
    commit_step(store, "nospec", "s1", 0, {EDITS: encode_parquet(pa.Table.from_pylist(rows))})
    rep, _ = make_report(store, ["nospec"], tmp_path / "out2")
    assert rep.progress[0].rows[0][:5] == ["tiny:llama", "memit", "facts", 0, "1/?"]
