"""The statistics stage: `rayedit stats` computes each needed covariance once, sharded over replicas by
document range, equal to a single pass; the campaign then reuses it from the store's cache."""

from __future__ import annotations

from pathlib import Path

from test_runtime import _spec_dict, _write_requests, _write_spec
from typer.testing import CliRunner

from rayedit.cli import app
from rayedit.editing import Editor
from rayedit.editing.covariance import LocalBlobCache, SecondMoment
from rayedit.models import build_tiny_model
from rayedit.runtime.campaign import run_campaign
from rayedit.store import open_store


def test_stats_stage_shards_reduce_and_are_reused(tmp_path: Path) -> None:
    data = _write_requests(tmp_path / "r.jsonl")
    d = _spec_dict(data, name="stats", stats_samples=1500)  # 1500 documents → 2 ranges of ≤ 1000
    for m in d["methods"]:
        m["hparams"].pop("mom2_n_samples")
    spec = _write_spec(tmp_path, d)
    store_uri = str(tmp_path / "store")
    res = CliRunner().invoke(app, ["stats", str(spec), "--store", store_uri])
    assert res.exit_code == 0, res.output
    st = open_store(store_uri)
    cached = {k: st.get_bytes(k) for k in st.list("cache/stats")}
    assert cached and not st.list("cache/stats-partials")  # reduced, partials dropped
    assert not st.exists("campaigns/stats/spec.yaml")  # the stats stage does not freeze the campaign

    # equal (up to summation order) to one in-process pass with the same settings
    lm = build_tiny_model("llama")
    ed = Editor(lm, "memit", {"mom2_n_samples": 1500, "mom2_update_weight": 100},
                stats_cache=LocalBlobCache(tmp_path / "local"), stats_corpus="builtin:general")
    assert len(cached) == len(ed.hp.layers)
    for key, blob in cached.items():
        sm = SecondMoment.from_bytes(blob, key)
        assert sm.provenance["shards"] == 2
        ref = ed.stats.second_moments([sm.provenance["layer"]])[sm.provenance["layer"]]
        assert sm.count == ref.count and sm.provenance["documents"] == ref.provenance["documents"]
        # fp32 products over differently grouped batches: equal to fp32 rounding of the whole matrix
        assert float((sm.sum - ref.sum).norm() / ref.sum.norm()) < 1e-6

    # the campaign finds everything in the cache: no statistics object is written again
    run_campaign(spec, store_uri, progress=False, summary=False)
    assert {k: st.get_bytes(k) for k in st.list("cache/stats")} == cached
    res = CliRunner().invoke(app, ["stats", str(spec), "--store", store_uri])  # nothing left to compute
    assert res.exit_code == 0 and "statistics: every covariance" in res.output


def test_campaign_mixing_a_method_without_statistics(tmp_path: Path) -> None:
    """MOSE-OFT has no second moments (no mom2_* settings at all): the statistics stage plans only MEMIT's, and
    both streams edit (it used to fail asking MOSE-OFT's hyperparameters for mom2_n_samples)."""
    data = _write_requests(tmp_path / "r.jsonl")
    d = _spec_dict(data, name="mixed", models=[{"name": "tiny:llama", "replicas": 1}])
    d["methods"] = [d["methods"][0], {"name": "mose_oft", "hparams": {"num_steps": 4}}]
    spec = _write_spec(tmp_path, d)
    store_uri = str(tmp_path / "store")
    run_campaign(spec, store_uri, progress=False, summary=False)
    st = open_store(store_uri)
    lm = build_tiny_model("llama")
    memit_layers = Editor(lm, "memit", d["methods"][0]["hparams"]).hp.layers
    assert len(st.list("cache/stats")) == len(memit_layers)
    committed = [k for k in st.list("campaigns/mixed/streams") if k.endswith("/COMMITTED")]
    by_method = {m: sum(f"--{m}--" in k for k in committed) for m in ("memit", "mose_oft")}
    assert by_method == {"memit": 2, "mose_oft": 2}, committed
