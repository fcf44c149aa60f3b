"""The null-space plug-in on MEMIT, on a real model: how the projection's null space is chosen decides how much
of the preserved keys it protects.

One batch of known CounterFact facts (the first batch of the SmolLM2 benchmark campaign, so the statistics are
already in its store) is edited by MEMIT alone and by MEMIT with ``project: nullspace`` under several null-space
choices: the reference's absolute eigenvalue threshold (2e-2) and the energy mode (the smallest eigen-directions
holding at most ρ of tr Σ). The targets z are computed once, on the unedited model, and shared, so the rows differ
only in the solve. Printed per choice: the null space's rank per edited layer, the share of the held-out keys'
energy that lies in it, efficacy and paraphrase success of the batch, and the relative output change of
preserved keys (``benchmarks/preserved_keys.py``'s measure, on held-out sentences and neighbourhood prompts).

    .venv/bin/python benchmarks/nullspace_plugin.py [--store runs/bench-real] [--campaign bench-real]
        [--energies 0.05,0.01,0.001] [--held-out 300]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pandas as pd  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from preserved_keys import collect_keys, held_out_sentences, key_change, load_for_keys  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def key_energy_in(keys: dict[str, torch.Tensor], projections: dict[str, torch.Tensor]) -> float:
    """Share of the keys' energy ‖P K‖² / ‖K‖² inside the null spaces (all edited layers together)."""
    inside = sum(float((keys[n].double() @ p.double()).pow(2).sum()) for n, p in projections.items())
    return inside / sum(float(keys[n].double().pow(2).sum()) for n in projections)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", default=str(REPO / "runs" / "bench-real"))
    ap.add_argument("--campaign", default="bench-real")
    ap.add_argument("--energies", default="0.05,0.01,0.001")
    ap.add_argument("--held-out", type=int, default=300)
    ap.add_argument("--neighbours", type=int, default=200)
    args = ap.parse_args()

    from rayedit.data.loaders import load_counterfact
    from rayedit.editing import Editor
    from rayedit.evaluate import evaluate_records
    from rayedit.report.load import load_campaign
    from rayedit.store import StoreBlobCache, open_store

    store = open_store(args.store)
    camp = load_campaign(store, args.campaign)
    spec = camp.spec
    batch = int(spec["batch_size"])
    first = camp.edits[camp.edits["step"] == 0].drop_duplicates("case_id")
    ids = list(first["case_id"].astype(str))[:batch]
    by_id = {r.case_id: r for r in load_counterfact(spec["datasets"][0]["path"])}
    records = [by_id[i] for i in ids]
    requests = [r.request for r in records]

    lm = load_for_keys(spec["models"][0]["name"])
    base = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    held_out = held_out_sentences(args.held_out)
    neighbours = [p for r in records for p in r.neighborhood_prompts][:args.neighbours]
    cache = StoreBlobCache(store)
    n_samples = int(spec.get("stats_samples") or 100_000)
    corpus = spec.get("stats_corpus") or "enwiki-sample"

    variants: dict[str, dict] = {"memit": {"project": "none"},
                                 "+nullspace threshold 2e-2 (ref)": {"project": "nullspace"}}
    for e in args.energies.split(","):
        variants[f"+nullspace energy {e}"] = {"project": "nullspace", "nullspace_mode": "energy",
                                              "nullspace_energy": float(e)}
    rows, deltas, targets = {}, {}, None
    for label, hp in variants.items():
        with torch.no_grad():
            for n, p in lm.model.named_parameters():
                p.copy_(base[n])
        t0 = time.perf_counter()
        ed = Editor(lm, "memit", {"mom2_n_samples": n_samples, **hp}, stats_cache=cache, stats_corpus=corpus)
        if targets is not None:  # the same z (unedited model, same batch): only the solve differs
            ed.solver.select_layers = lambda _r, _g, t=targets, ls=list(ed.hp.layers): (ls, t)
        res = ed.apply(requests)
        targets = res.targets
        deltas[label] = {n: w.clone() for n, w in res.weights.items()}
        ev = pd.DataFrame(evaluate_records(lm, records, "counterfact")).mean(numeric_only=True)
        row = {"efficacy": ev["efficacy_success"], "paraphrase": ev["paraphrase_success"],
               "seconds": time.perf_counter() - t0}
        if hp["project"] == "nullspace":
            proj = {lm.adapter.weight_name(layer): ed.solver.null_space(layer) for layer in ed.hp.layers}
            row["rank P"] = "/".join(str(ed.state.info[f"nullspace_rank.{layer}"]) for layer in ed.hp.layers)
            rows[label] = (row, proj)
        else:
            rows[label] = (row, None)
        print(f"{label}: {row['seconds']:.0f} s", flush=True)

    with torch.no_grad():
        for n, p in lm.model.named_parameters():
            p.copy_(base[n])
    table = pd.DataFrame({label: r for label, (r, _p) in rows.items()}).T
    names = sorted(deltas["memit"])
    keys = {"held-out text": collect_keys(lm, held_out, names), "neighbours": collect_keys(lm, neighbours, names)}
    for label, (_r, proj) in rows.items():
        if proj is not None:
            table.loc[label, "held-out key energy in null space"] = key_energy_in(keys["held-out text"], proj)
    for name, k in keys.items():
        change = key_change(lm, k, deltas)
        table[f"change: {name}"] = pd.Series(change)
        table[f"× less: {name}"] = change["memit"] / pd.Series(change)
    print(f"\nMEMIT ± null-space projection on SmolLM2, one batch of {len(ids)} known CounterFact facts "
          f"(layers {list(ed.hp.layers)}), statistics {corpus} ({n_samples} docs); {len(held_out)} held-out "
          f"sentences, {len(neighbours)} neighbourhood prompts")
    with pd.option_context("display.width", 250, "display.max_columns", 20, "display.float_format", "{:.4g}".format):
        print(table.drop(columns=["seconds"]))


if __name__ == "__main__":
    main()
