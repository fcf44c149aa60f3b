"""Audit suites as campaign shards on real Ray: every (model, method, suite, step) cell lands, the unedited
model is audited once as its own pseudo-stream, and a re-run writes nothing twice."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import yaml

from rayedit.runtime.audit import unedited_sid
from rayedit.runtime.campaign import run_campaign
from rayedit.runtime.spec import SpecError, parse_spec
from rayedit.store import open_store
from rayedit.store.layout import list_streams

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAYEDIT_TOYWORLD_CACHE", str(REPO / ".rayedit" / "toyworld-cache"))

SPEC = {
    "name": "audit-e2e", "mode": "sequential_batches",
    "models": [{"name": "toyworld:0", "replicas": 2}],
    "methods": [{"name": "memit"}, {"name": "alphaedit"}],
    "datasets": [{"kind": "toyworld-counterfact"}],
    "edits_per_stream": 20, "batch_size": 10, "stats_corpus": "toyworld:0",
    "audit": {"at": [10, 20], "shard_size": 40, "suites": [
        {"suite": "general", "limit": 3},
        {"suite": "safety", "limit": 8, "max_new_tokens": 16},
        {"suite": "uncertainty", "limit": 4, "n_paraphrases": 3, "n_samples": 2, "max_new_tokens": 6},
        {"suite": "shift", "limit": 12, "layers": [1, 3]}]},
}
SUITES = ("general", "safety", "uncertainty", "shift")


def _rows(store_dir: Path, cid: str) -> dict[tuple[str, str, int], int]:
    files = [str(p) for p in (store_dir / "campaigns" / cid / "streams").glob("*/eval/*/*/part-*.parquet")]
    tbl = ds.dataset(files, format="parquet").to_table(columns=["method", "suite", "step"])
    out: dict[tuple[str, str, int], int] = {}
    for r in tbl.to_pylist():
        k = (r["method"], r["suite"], r["step"])
        out[k] = out.get(k, 0) + 1
    return out


def test_audit_spec_checks() -> None:
    bad = {**SPEC, "models": [{"name": "tiny:llama"}], "datasets": [{"kind": "requests", "path": "x.jsonl"}]}
    with pytest.raises(SpecError) as err:
        parse_spec(bad)
    text = "\n".join(err.value.problems)
    assert "audit.suites.2: uncertainty probes the edited facts' paraphrases" in text
    assert "audit.suites.1.source: safety needs a malicious-query file for models.0" in text
    with pytest.raises(SpecError, match="audit.at: 15 is not the end of a committed step"):
        parse_spec({**SPEC, "audit": {**SPEC["audit"], "at": [15]}})


def test_audit_campaign_end_to_end(tmp_path: Path) -> None:
    spec = tmp_path / "audit.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    store_dir = tmp_path / "store"
    run_campaign(spec, str(store_dir), progress=False, summary=False)
    st = open_store(str(store_dir))
    assert unedited_sid("toyworld:0") in list_streams(st, "audit-e2e")
    counts = _rows(store_dir, "audit-e2e")
    for method in ("memit", "alphaedit"):
        for suite in SUITES:
            for step in (0, 1):
                assert counts.get((method, suite, step), 0) > 0, (method, suite, step)
    for suite in SUITES:
        assert counts[("unedited", suite, 0)] == counts[("memit", suite, 0)] if suite != "uncertainty" else True
    assert counts[("memit", "general", 1)] == 6 * 3  # six reference tasks × limit
    assert counts[("memit", "safety", 1)] == 8
    assert counts[("memit", "shift", 1)] == 12 * 2  # prompts × layers
    # uncertainty probes the facts edited so far: 4 facts at most (limit), each edit + 2 neighbourhood queries
    assert counts[("memit", "uncertainty", 1)] == 4 * 3

    # the unedited model compared with itself: no shift, Δ_U exactly 0
    files = [str(p) for p in (store_dir / "campaigns/audit-e2e/streams" / unedited_sid("toyworld:0")).glob(
        "eval/*/*/part-*.parquet")]
    unedited = [r for f in files for r in pq.read_table(f).to_pylist()]  # suites differ in columns
    assert all(r["l2_shift"] == 0.0 for r in unedited if r["suite"] == "shift")
    assert all(r["delta_u_abs"] == 0.0 for r in unedited if r["suite"] == "uncertainty")
    # edited layers moved after 20 MEMIT edits; the layer above them reads a changed residual stream
    shifted = [r for p in (store_dir / "campaigns/audit-e2e/streams").glob("*memit*/eval/000001/shift/part-*.parquet")
               for r in pq.read_table(p).to_pylist()]
    assert max(r["l2_shift"] for r in shifted if r["layer"] == 3) > 0.0

    before = {p: p.stat().st_mtime_ns for p in store_dir.rglob("part-*.parquet")}
    run_campaign(spec, str(store_dir), progress=False, summary=False)  # complete: nothing is re-run
    assert {p: p.stat().st_mtime_ns for p in store_dir.rglob("part-*.parquet")} == before
    assert _rows(store_dir, "audit-e2e") == counts
