"""How much each method's edits change the outputs of keys it should preserve, on a real model.

For every stream of a campaign (default: the SmolLM2 benchmark campaign of ``benchmarks/real_model.py``), after
the same number of sequential edits, the edited matrices W_t (a committed step's ``delta.safetensors``) against
the unedited W_0: the relative output change of preserved keys, ‖(W_t − W_0) K‖_F / ‖W_0 K‖_F over the edited
layers together, for three key sets read from the unedited model at the edited modules' inputs:

- ``held-out text``: every token of builtin general sentences (not in the statistics corpus);
- ``neighbours``: every token of the CounterFact neighbourhood prompts of the edited records (facts about
  other subjects, the preservation the benchmark scores);
- ``stats text``: every token of the first documents of the statistics corpus (in the statistics: what the
  null-space projection was computed from).

Then the null-space plug-in claim (AlphaEdit paper, §3): MEMIT with ``project: nullspace`` changes the held-out
preserved keys' outputs ≥ 10× less than MEMIT alone, at comparable efficacy (from the campaign's evaluation).

    .venv/bin/python benchmarks/preserved_keys.py [--store runs/bench-real] [--campaign bench-real]
        [--edits 200] [--held-out 300] [--neighbours 500] [--stats-docs 20]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pandas as pd  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def edited_weights(store, cid: str, sid: str, step: int) -> dict[str, torch.Tensor]:
    from rayedit.store.layout import DELTA, read_committed_step

    tensors, _ = read_committed_step(store, cid, sid, step, [DELTA]).tensors(DELTA)
    return {k: v for k, v in tensors.items() if not k.startswith("state.")}


def load_for_keys(name: str):
    """The unedited model, right-padded with a pad token, so batched reads of keys can mask the padding out."""
    from rayedit.models import load_model

    lm = load_model(name, dtype="float32")
    lm.tokenizer.padding_side = "right"
    if lm.tokenizer.pad_token is None:
        lm.tokenizer.pad_token = lm.tokenizer.eos_token
    return lm


def held_out_sentences(n: int) -> list[str]:
    """``n`` builtin general sentences spread over the whole set (none is in the statistics corpus)."""
    from rayedit.editing.covariance import resolve_corpus

    every = resolve_corpus("builtin:general").load()
    return every[::max(1, len(every) // n)][:n]


@torch.no_grad()
def collect_keys(lm, texts: list[str], names: list[str], batch: int = 16, max_len: int = 256
                 ) -> dict[str, torch.Tensor]:
    """The unedited model's keys (inputs of the named matrices) at every non-pad token of ``texts``."""
    model, tok = lm.model, lm.tokenizer
    modules = dict(model.named_modules())
    seen: dict[str, torch.Tensor] = {}
    out: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def hook(name: str):
        def read(_mod, args):
            seen[name] = args[0]
        return read

    handles = [modules[n.removesuffix(".weight")].register_forward_pre_hook(hook(n)) for n in names]
    try:
        for i in range(0, len(texts), batch):
            enc = tok(texts[i:i + batch], return_tensors="pt", padding=True, truncation=True, max_length=max_len)
            model(**enc)
            mask = enc["attention_mask"].bool()
            for n in names:
                out[n].append(seen[n][mask].float())  # tokens × d_in
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v) for n, v in out.items()}


@torch.no_grad()
def key_change(lm, keys: dict[str, torch.Tensor], deltas: dict[str, dict[str, torch.Tensor]]) -> dict[str, float]:
    """Per stream: ‖ΔW K‖_F / ‖W_0 K‖_F over ``keys`` (from :func:`collect_keys`), all edited matrices together."""
    params = dict(lm.model.named_parameters())
    changed = dict.fromkeys(deltas, 0.0)
    base = 0.0
    for n, k in keys.items():
        k = k.double()
        w0 = params[n].double()
        base += float((k @ w0.T).pow(2).sum())
        for sid, d in deltas.items():
            if n in d:
                changed[sid] += float((k @ (d[n].double() - w0).T).pow(2).sum())
    return {sid: (c / base) ** 0.5 for sid, c in changed.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", default=str(REPO / "runs" / "bench-real"))
    ap.add_argument("--campaign", default="bench-real")
    ap.add_argument("--edits", type=int, default=None, help="edit count to compare at (default: the largest "
                                                           "every stream has committed)")
    ap.add_argument("--held-out", type=int, default=300, help="general sentences (of 9,034)")
    ap.add_argument("--neighbours", type=int, default=500, help="neighbourhood prompts (first N)")
    ap.add_argument("--stats-docs", type=int, default=20)
    args = ap.parse_args()

    from rayedit.data.loaders import load_counterfact
    from rayedit.editing.covariance import resolve_corpus
    from rayedit.report.load import load_campaign
    from rayedit.store import open_store
    from rayedit.store.layout import committed_steps

    store = open_store(args.store)
    camp = load_campaign(store, args.campaign)
    spec = camp.spec
    batch = int(spec["batch_size"])
    sids = [s.sid for s in camp.streams if committed_steps(store, args.campaign, s.sid)]
    done = {sid: (max(committed_steps(store, args.campaign, sid)) + 1) * batch for sid in sids}
    n = args.edits or min(done.values())
    sids = [sid for sid in sids if done[sid] >= n]
    step = n // batch - 1
    labels = camp.edits.drop_duplicates("stream").set_index("stream")["method_label"].to_dict()
    deltas = {sid: edited_weights(store, args.campaign, sid, step) for sid in sids}

    lm = load_for_keys(spec["models"][0]["name"])
    edited = camp.edits[(camp.edits["stream"] == sids[0]) & (camp.edits["step"] <= step)]
    ids = set(edited["case_id"].astype(str))
    records = [r for r in load_counterfact(spec["datasets"][0]["path"]) if r.case_id in ids]
    held_out = held_out_sentences(args.held_out)
    stats_docs = resolve_corpus(spec.get("stats_corpus") or "enwiki-sample").load()[:args.stats_docs]
    sets = {"held-out text": held_out,
            "neighbours": [p for r in records for p in r.neighborhood_prompts][:args.neighbours],
            "stats text": stats_docs}
    names = sorted({n for d in deltas.values() for n in d})
    table = pd.DataFrame({name: key_change(lm, collect_keys(lm, texts, names), deltas)
                          for name, texts in sets.items()})

    ev = camp.evals
    cf = ev[(ev["suite"] == "counterfact") & (ev["n_edited"] == n)]
    table = table.join(cf.groupby("stream")[["efficacy_success", "neighborhood_success"]].mean())
    table.index = [labels.get(s, s) for s in table.index]
    print(f"{args.campaign}: relative output change of preserved keys after {n} sequential edits "
          f"(‖ΔW K‖_F / ‖W_0 K‖_F, edited layers together); {len(held_out)} held-out sentences, "
          f"{len(sets['neighbours'])} neighbourhood prompts of {len(records)} edited records, "
          f"{len(stats_docs)} statistics documents")
    with pd.option_context("display.width", 250, "display.max_columns", 20, "display.float_format", "{:.4g}".format):
        print(table)
    plain = [i for i in table.index if i.startswith("memit") and "none" in i]
    plug = [i for i in table.index if i.startswith("memit") and "nullspace" in i]
    if plain and plug:
        a, b = table.loc[plain[0]], table.loc[plug[0]]
        for name in sets:
            print(f"null-space plug-in, {name}: MEMIT {a[name]:.4g} vs MEMIT+nullspace {b[name]:.4g} → "
                  f"{a[name] / b[name]:.1f}× less change (claim: ≥ 10×)")
        print(f"efficacy: MEMIT {a['efficacy_success']:.3f} vs MEMIT+nullspace {b['efficacy_success']:.3f}")


if __name__ == "__main__":
    main()
