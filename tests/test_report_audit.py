"""The report's Audit section (rayedit.report.audit) on a store of real audit parts, written without Ray.

The parts are what ``rayedit.runtime.audit.run_audit_shard`` commits: the toy world (cached under
<repo>/.rayedit/toyworld-cache; never rebuilt here) audited unedited, then after 4 and 8 sequential MEMIT /
AlphaEdit edits, with all four suites (small limits), two shards per suite, the runtime's identity columns.
"""

from __future__ import annotations

import hashlib
import math
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import torch
import yaml

from rayedit.report.audit import AUDIT_SUITES, UNEDITED, audit_section, audit_tables, load_audit
from rayedit.report.load import expected_streams
from rayedit.store import LocalStore, commit_eval_part, commit_step, open_store
from rayedit.store.formats import encode_parquet
from rayedit.store.layout import EDITS, eval_part_key, spec_key

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".rayedit" / "toyworld-cache"
CID = "audit-report"
MODEL = "toyworld:0"
METHODS = ("memit", "alphaedit")
BATCH, STEPS = 4, 2  # n_edited 4 and 8
SUITES: dict[str, dict[str, Any]] = {
    "general": {"tasks": ["sst2", "mrpc", "mmlu"], "limit": 2},
    "uncertainty": {"limit": 3, "n_paraphrases": 3, "n_samples": 2, "max_new_tokens": 6},
    "safety": {"limit": 8, "max_new_tokens": 12},
    "shift": {"limit": 12, "layers": [1, 3], "n_basis": 12},
}
SPEC = {"name": CID, "mode": "sequential_batches", "models": [{"name": MODEL}],
        "methods": [{"name": m} for m in METHODS], "datasets": [{"kind": "toyworld-counterfact"}], "seeds": [0],
        "edits_per_stream": BATCH * STEPS, "batch_size": BATCH,
        "audit": {"at": [4, 8], "unedited": True, "suites": [{"suite": s, **v} for s, v in SUITES.items()]}}
RANGES = {  # (metric, lo, hi) that every cell of a suite must respect
    "general": [("accuracy", 0, 1), ("f1", 0, 1), ("f1_new", 0, 1), ("invalid_rate", 0, 1)],
    "uncertainty": [("u", 0, 2), ("u_pre", 0, 2)],
    "safety": [("urr", 0, 100)],
    "shift": [("l2_shift", 0, math.inf), ("rel_shift", 0, math.inf), ("cosine_drift", -1e-9, 2), ("D1", 0, 1 + 1e-9),
              ("D2", 0, 1 + 1e-9)],
}


class HashEmbedder:
    """Deterministic stand-in for the sentence model: each distinct text → a fixed random unit vector."""

    name = "hash-embedder"

    def embed(self, texts: list[str]) -> torch.Tensor:
        out = []
        for t in texts:
            seed = int.from_bytes(hashlib.blake2b(t.encode(), digest_size=4).digest(), "little")
            v = torch.randn(16, generator=torch.Generator().manual_seed(seed))
            out.append(v / v.norm())
        return torch.stack(out)


def unedited_sid(model: str) -> str:
    from rayedit.runtime.audit import unedited_sid as sid

    return sid(model)


@pytest.fixture(scope="module")
def audit_store(tmp_path_factory) -> dict[str, Any]:
    """A campaign store with committed steps and audit parts as the runtime writes them, plus the rows written."""
    from rayedit.data import load_counterfact
    from rayedit.data.toyworld import ensure_toyworld
    from rayedit.editing import Editor, LocalBlobCache, apply_weights
    from rayedit.evaluate.audit import audit_records, run_audit_suite
    from rayedit.models import load_model

    world = ensure_toyworld(seed=0, cache_dir=CACHE)
    root = tmp_path_factory.mktemp("audit-report")
    store = open_store(str(root / "store"))
    store.put_bytes(spec_key(CID), yaml.safe_dump(SPEC).encode())
    streams = {s.method: s for s in expected_streams(SPEC)}
    records = list(load_counterfact(world.counterfact, limit=BATCH * STEPS))
    lm = load_model(str(world.model_dir))
    base = {k: v.detach().clone() for k, v in lm.model.named_parameters()}
    embedder = HashEmbedder()
    cache: dict = {}  # per base model, as a replica keeps it (U_pre, BEFORE states)
    written: dict[tuple[str, int, str], list[dict[str, Any]]] = {}

    def audit(sid: str, columns: dict[str, Any], step: int, n_edited: int) -> None:
        edited = {k: v.detach().clone() for k, v in lm.model.named_parameters()}

        @contextmanager
        def use_base():  # the same model object with the unedited weights, then the step's weights again
            apply_weights(lm, base)
            try:
                yield lm.model
            finally:
                apply_weights(lm, edited)

        for suite, st in SUITES.items():
            # the records rayedit.runtime.audit.suite_records picks: uncertainty probes the facts edited so far
            src = None if suite in ("general", "safety") else records[:n_edited or None] if suite == "uncertainty" \
                else records
            recs = audit_records(suite, st, src, world=world)
            half = len(recs) // 2
            for shard, (a, b) in enumerate(((0, half), (half, len(recs)))):
                extra = {"campaign": CID, "stream": sid, **columns, "step": step, "n_edited": n_edited,
                         "suite": suite, "shard": shard}
                rows = run_audit_suite(suite, lm.model, lm.tokenizer, recs, st, base=use_base, start=a, stop=b,
                                       keep_raw=False, extra_columns=extra, embedder=embedder, cache=cache)
                for r in rows:
                    r.update(extra)
                assert commit_eval_part(store, CID, sid, step, suite, shard, pa.Table.from_pylist(rows),
                                        {"rows": len(rows), "start": a, "stop": b})
                written.setdefault((sid, step, suite), []).extend(rows)

    first = streams[METHODS[0]]
    audit(unedited_sid(MODEL), {"model": MODEL, "method": UNEDITED, "method_label": UNEDITED,
                                "dataset": first.dataset, "seed": 0}, 0, 0)
    stats = LocalBlobCache(root / "stats")  # covariances computed once for both methods
    for method in METHODS:
        s = streams[method]
        apply_weights(lm, base)
        editor = Editor(lm, method, None, stats_corpus=str(world.corpus), stats_cache=stats)
        for step in range(STEPS):
            batch = records[step * BATCH:(step + 1) * BATCH]
            editor.apply([r.request for r in batch])
            ident = {"campaign": CID, "stream": s.sid, "model": MODEL, "method": method, "method_label": method,
                     "dataset": s.dataset, "seed": 0, "step": step}
            edits = [{**ident, "batch": step, "case_id": r.request.case_id} for r in batch]
            assert commit_step(store, CID, s.sid, step, {EDITS: encode_parquet(pa.Table.from_pylist(edits))})
            audit(s.sid, {k: ident[k] for k in ("model", "method", "method_label", "dataset", "seed")}, step,
                  BATCH * (step + 1))
    apply_weights(lm, base)
    _add_untrusted(store, streams["memit"].sid, written[(unedited_sid(MODEL), 0, "safety")])
    return {"store": store, "root": root / "store", "written": written, "streams": streams}


def _add_untrusted(store: LocalStore, sid: str, rows: list[dict[str, Any]]) -> None:
    """Things a reader must not trust: a part without its marker, a committed part of an uncommitted step,
    and a non-audit suite's part."""
    bad = [{**r, "record_index": -1} for r in rows]
    store.put_bytes(eval_part_key(CID, sid, 1, "general", 9), encode_parquet(pa.Table.from_pylist(bad)))
    assert commit_eval_part(store, CID, sid, 7, "safety", 0, pa.Table.from_pylist(bad))
    assert commit_eval_part(store, CID, sid, 1, "counterfact", 0, pa.Table.from_pylist(bad))


def test_load_audit_reads_every_committed_part_and_nothing_else(audit_store):
    store, written = audit_store["store"], audit_store["written"]
    df = load_audit(store, CID)
    assert len(df) == sum(len(v) for v in written.values())
    got = df.groupby(["stream", "step", "suite"]).size().to_dict()
    assert got == {k: len(v) for k, v in written.items()}
    assert (df["record_index"] >= 0).all()
    assert set(df["suite"]) == set(AUDIT_SUITES)
    unedited = df[df["stream"] == unedited_sid(MODEL)]
    assert set(unedited["method"]) == {UNEDITED} and set(unedited["n_edited"]) == {0}
    assert set(df.loc[df["method"] == "memit", "n_edited"]) == {BATCH, 2 * BATCH}


def test_tables_have_every_cell_with_the_baseline_and_values_in_range(audit_store):
    from rayedit.evaluate.audit import general_summary, shift_summary

    written, streams = audit_store["written"], audit_store["streams"]
    tables = audit_tables(load_audit(audit_store["store"], CID))
    assert list(tables) == list(AUDIT_SUITES)
    cells = {(MODEL, m, n) for m in METHODS for n in (0, BATCH, 2 * BATCH)}
    groups = {"general": ["sst2", "mrpc", "mmlu", "mean"], "uncertainty": ["edit", "neighborhood"],
              "shift": [1, 3]}
    for suite, t in tables.items():
        gcol = t.columns[4]
        assert set(zip(t["model"], t["method"], t["n_edited"], strict=True)) == cells, suite
        assert (t["baseline"] == (t["n_edited"] == 0)).all()
        per_cell = t.groupby(["method", "n_edited"])[gcol].apply(list)
        want = groups.get(suite) or per_cell.iloc[0]
        assert all(g == want for g in per_cell), (suite, per_cell)  # the same groups, in order, in every cell
        if suite == "safety":
            assert want[0] == "all"
        for metric, lo, hi in RANGES[suite]:
            vals = t[metric].dropna()
            assert len(vals) and vals.between(lo, hi).all(), (suite, metric, vals.tolist())
        # the unedited model's numbers are every method's starting point
        base = [t[(t["method"] == m) & t["baseline"]].drop(columns=["method"]).reset_index(drop=True)
                for m in METHODS]
        assert base[0].equals(base[1])

    # numbers are the set-level summaries of the rows that were committed
    g = tables["general"]
    rows = written[(streams["memit"].sid, 1, "general")]
    for task, s in general_summary(rows).items():
        r = g[(g["method"] == "memit") & (g["n_edited"] == 2 * BATCH) & (g["task"] == task)].iloc[0]
        assert (r["accuracy"], r["f1"], r["n"]) == pytest.approx((s["accuracy"], s["f1"], s["n"]))
    mean = g[(g["method"] == "memit") & (g["n_edited"] == 2 * BATCH) & (g["task"] == "mean")].iloc[0]
    assert mean["f1"] == pytest.approx(sum(s["f1"] for s in general_summary(rows).values()) / 3)
    sa = tables["safety"]
    for method in METHODS:
        for step in range(STEPS):
            rows = written[(streams[method].sid, step, "safety")]
            r = sa[(sa["method"] == method) & (sa["n_edited"] == BATCH * (step + 1)) & (sa["category"] == "all")]
            assert r["urr"].item() == pytest.approx(100 * sum(x["unsafe"] for x in rows) / len(rows))
            assert r["n"].item() == len(rows)
    sh = tables["shift"]
    rows = written[(streams["alphaedit"].sid, 0, "shift")]
    for layer, s in shift_summary(rows).items():
        r = sh[(sh["method"] == "alphaedit") & (sh["n_edited"] == BATCH) & (sh["layer"] == layer)].iloc[0]
        assert (r["rel_shift"], r["D1"], r["D2"]) == pytest.approx((s["rel_shift"], s["D1"], s["D2"]))
    # unedited vs itself: no shift, full overlap, no change of U; the edits moved the layer above them
    b = sh[sh["baseline"]]
    assert (b["l2_shift"] == 0).all() and b["D1"].tolist() == pytest.approx([1.0] * len(b)) == b["D2"].tolist()
    assert (sh.loc[~sh["baseline"] & (sh["layer"] == 3), "rel_shift"] > 0).all()
    un = tables["uncertainty"]
    assert (un.loc[un["baseline"], "delta_u_abs"] == 0).all()
    assert (un.loc[un["baseline"], "u"] == un.loc[un["baseline"], "u_pre"]).all()


def test_audit_section_html_tables_and_svgs(audit_store):
    frag, tables, figs = audit_section(audit_store["store"], CID, {"memit": "#0072B2", "alphaedit": "#D55E00"})
    assert "Audit: what the edits cost" in frag
    for title in ("General capability", "Uncertainty growth Δ_U", "Safety", "Representation shift"):
        assert f"<h4>{title}</h4>" in frag
    assert set(tables) == {f"{CID}--audit-{s}" for s in AUDIT_SUITES}
    assert set(figs) == {f"{CID}--audit-{s}" for s in AUDIT_SUITES}
    assert frag.count("src=\"data:image/svg+xml;base64,") == len(AUDIT_SUITES)
    for name, svg in figs.items():
        assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>"), name
        assert "<image" not in svg and 'href="http' not in svg  # self-contained: no raster, nothing fetched
        for m in METHODS:
            assert f"{MODEL} · {m}" in svg  # one line per (model, method), in the given colours
        assert "#0072b2" in svg.lower() and "#d55e00" in svg.lower()
    assert "number of edits" in figs[f"{CID}--audit-shift"] and "layer 3" in figs[f"{CID}--audit-shift"]
    for t in tables.values():
        assert set(t["n_edited"]) == {0, BATCH, 2 * BATCH}


def test_baseline_per_model_and_empty_campaigns(audit_store, tmp_path):
    """A second model (the same rows under another name, MEMIT only) gets its own baseline; a model audited
    only unedited keeps method 'unedited'; a campaign without audit parts gives an empty section."""
    src: Path = audit_store["root"]
    store = open_store(str(tmp_path / "store"))
    renames = {"toyworld:0": ("m-a", ["unedited", "memit", "alphaedit"]), "toyworld:9": ("m-b", ["unedited", "memit"]),
               "toyworld:7": ("m-c", ["unedited"])}
    for model, (prefix, keep) in renames.items():
        for (sid, step, suite), rows in audit_store["written"].items():
            method = rows[0]["method"]
            if method not in keep:
                continue
            new = f"{prefix}--{method}"
            if method != UNEDITED:  # edited streams need their committed steps
                shutil.copytree(src / f"campaigns/{CID}/streams/{sid}/steps",
                                tmp_path / f"store/campaigns/{CID}/streams/{new}/steps", dirs_exist_ok=True)
            assert commit_eval_part(store, CID, new, step, suite, 0,
                                    pa.Table.from_pylist([{**r, "model": model, "stream": new} for r in rows]))
    tables = audit_tables(load_audit(store, CID))
    for suite, t in tables.items():
        cells = set(zip(t["model"], t["method"], t["n_edited"], strict=True))
        assert cells == ({("toyworld:0", m, n) for m in METHODS for n in (0, 4, 8)}
                         | {("toyworld:9", "memit", n) for n in (0, 4, 8)} | {("toyworld:7", UNEDITED, 0)}), suite
        a = t[(t["model"] == "toyworld:0") & (t["method"] == "memit")].drop(columns="model").reset_index(drop=True)
        b = t[(t["model"] == "toyworld:9")].drop(columns="model").reset_index(drop=True)
        assert a.equals(b)  # the same rows give the same numbers, per model
    frag, _, figs = audit_section(store, CID)
    assert "toyworld:9 · memit" in figs[f"{CID}--audit-safety"]

    empty = open_store(str(tmp_path / "empty"))
    empty.put_bytes(spec_key("nothing"), yaml.safe_dump(SPEC).encode())
    assert load_audit(empty, "nothing").empty
    assert audit_section(empty, "nothing") == ("", {}, {})
    assert audit_tables(load_audit(empty, "nothing")) == {}


def test_constants_agree_with_the_suites_and_the_runtime():
    from rayedit.evaluate.audit import AUDIT_SUITES as SUITES_OF_EVALUATE
    from rayedit.runtime.audit import UNEDITED as UNEDITED_OF_RUNTIME

    assert AUDIT_SUITES == SUITES_OF_EVALUATE and UNEDITED == UNEDITED_OF_RUNTIME
