"""MOSE on a real model: the edited matrices keep their Frobenius norm and condition number (MOSE paper, §3).

Both variants — ``mose`` (orthogonal Procrustes, W ← R W) and ``mose_oft`` (block-diagonal Cayley rotation, the
released code) — edit the first batches of the SmolLM2 benchmark campaign's known CounterFact facts in order
(its statistics are already in the store), in process. After each batch: efficacy and paraphrase success on the
facts edited so far, and per edited layer the relative change of ‖W‖_F and κ₂ against the unedited matrix
(claim: ≤ 1e-4); ``benchmarks/real_model.py`` prints the same growth for the other methods.

    .venv/bin/python benchmarks/mose_invariants.py [--store runs/bench-real] [--campaign bench-real]
        [--batches 2] [--variants mose,mose_oft]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pandas as pd  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", default=str(REPO / "runs" / "bench-real"))
    ap.add_argument("--campaign", default="bench-real")
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--variants", default="mose,mose_oft")
    args = ap.parse_args()

    from rayedit.data.loaders import load_counterfact
    from rayedit.editing import Editor
    from rayedit.editing.diagnostics import matrix_stability
    from rayedit.evaluate import evaluate_records
    from rayedit.models import load_model
    from rayedit.report.load import load_campaign
    from rayedit.store import StoreBlobCache, open_store

    store = open_store(args.store)
    camp = load_campaign(store, args.campaign)
    spec = camp.spec
    batch = int(spec["batch_size"])
    memit = camp.edits[camp.edits["method_label"].str.startswith("memit") & camp.edits["stream"].str.contains("none")]
    order = list(memit.sort_values("step", kind="stable")["case_id"].astype(str).drop_duplicates())
    by_id = {r.case_id: r for r in load_counterfact(spec["datasets"][0]["path"])}
    records = [by_id[i] for i in order[:batch * args.batches]]

    lm = load_model(spec["models"][0]["name"], dtype="float32")
    ad = lm.adapter
    base = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    cache = StoreBlobCache(store)
    n_samples = int(spec.get("stats_samples") or 100_000)
    corpus = spec.get("stats_corpus") or "enwiki-sample"
    rows = []
    for variant in args.variants.split(","):
        with torch.no_grad():
            for n, p in lm.model.named_parameters():
                p.copy_(base[n])
        hp = {} if variant == "mose_oft" else {"mom2_n_samples": n_samples}
        ed = Editor(lm, variant, hp, stats_cache=cache, stats_corpus=corpus)
        before: dict[int, dict[str, float]] = {}
        for b in range(args.batches):
            t0 = time.perf_counter()
            res = ed.apply([r.request for r in records[b * batch:(b + 1) * batch]])
            seconds = time.perf_counter() - t0
            for layer in res.layers:
                before.setdefault(layer, matrix_stability(ad.to_math(base[ad.weight_name(layer)])))
            done = records[:(b + 1) * batch]
            ev = pd.DataFrame(evaluate_records(lm, done, "counterfact")).mean(numeric_only=True)
            fro = cond = 0.0
            for layer, s0 in before.items():
                s = matrix_stability(ad.get_weight(layer))
                fro = max(fro, abs(s["weight_fro"] / s0["weight_fro"] - 1))
                cond = max(cond, abs(s["weight_cond"] / s0["weight_cond"] - 1))
            rows.append({"method": variant, "edits": len(done), "layers": sorted(before),
                         "efficacy": ev["efficacy_success"], "paraphrase": ev["paraphrase_success"],
                         "neighbourhood": ev["neighborhood_success"], "max |Δ‖W‖_F|/‖W‖_F": fro,
                         "max |Δκ₂|/κ₂": cond, "s/batch": seconds})
            print(rows[-1], flush=True)
    print(f"\nMOSE invariants on {spec['models'][0]['name']}: sequential batches of {batch} known CounterFact facts "
          f"(the campaign's order), statistics {corpus}")
    with pd.option_context("display.width", 250, "display.max_columns", 20, "display.float_format", "{:.3g}".format):
        print(pd.DataFrame(rows).drop(columns=["s/batch"]))


if __name__ == "__main__":
    main()
