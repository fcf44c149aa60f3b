"""Edit-step time over its compute floor, measured side by side in one run.

For a batch of 8 requests on a tiny 12-layer model, per method (MEMIT, AlphaEdit, MOSE, SAME):
  measured = wall time of ``Editor.apply`` (templates and statistics prepared beforehand, as in a stream)
  floor    = target-optimisation steps actually run × one forward+backward of the same batch
             + the time of the method's solves on the same matrices
Target (issue 2): measured / floor ≤ 1.5; on a real model (issue 15) ≤ 1.3.

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/edit_step.py [--family llama] [--repeats 3]
     OMP_NUM_THREADS=1 .venv/bin/python benchmarks/edit_step.py --model smollm2-135m --batch 10 \
         --methods memit,alphaedit --repeats 1
The real-model form edits known CounterFact facts (rayedit/data/editing/counterfact-edit-1k.json) with the
model's own rule/preset hyperparameters; statistics are computed first (not timed) on a 20k-token budget.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from rayedit.data.requests import EditRequest  # noqa: E402
from rayedit.editing import Editor  # noqa: E402
from rayedit.editing.hooks import add_at_positions, hooks  # noqa: E402
from rayedit.editing.keys import compute_keys_and_outputs  # noqa: E402
from rayedit.editing.solvers import alphaedit_delta, memit_delta  # noqa: E402
from rayedit.editing.targets import _build_sequences  # noqa: E402
from rayedit.editing.tokens import pad_id, pad_right  # noqa: E402
from rayedit.models import build_tiny_model  # noqa: E402

SUBJECTS = ["Alice Smith", "Bob Jones", "Carol White", "Dan Brown", "Eve Black", "Frank Green", "Gina Gray",
            "Hank Hill", "Ivy Stone", "Jack Reed", "Kate Moss", "Liam Hart"]
WORDS = ["film", "war", "movie", "city", "time", "years", "people", "work", "world", "first"]


def batch(offset: int) -> list[EditRequest]:
    return [EditRequest(case_id=f"{offset}-{i}", prompt="The best thing about {}", subject=SUBJECTS[(offset + i) % 12],
                        target_new=WORDS[(offset + i) % 10], target_true=WORDS[(offset + i + 3) % 10])
            for i in range(8)]


def fwd_bwd_time(lm, reqs, contexts, layer: int, repeats: int = 5) -> float:
    """One forward+backward of the target-optimisation batch, with the same δ hook, and the LM head at the
    positions the loss reads (target tokens, each KL prompt's fact token), as the target loop computes it."""
    seqs, req_of_seq, fact_pos, tgt, kl_seq, _first = _build_sequences(lm, reqs, contexts, "subject_last")
    b = pad_right(seqs, pad_id(lm.tokenizer))
    rows, pos, req = torch.arange(len(seqs)), torch.tensor(fact_pos), torch.tensor(req_of_seq)
    read_rows = torch.tensor([s for s, p, _ in tgt for _ in p] + kl_seq)
    read_pos = torch.tensor([q for _, p, _ in tgt for q in p] + [fact_pos[s] for s in kl_seq])
    delta = torch.zeros(len(reqs), lm.adapter.d_model, requires_grad=True)
    for p in lm.model.parameters():
        p.requires_grad_(False)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        with hooks([add_at_positions(lm.adapter.block(layer), rows, pos, lambda: delta[req])]):
            logits = lm.adapter.logits_at(b.input_ids, b.attention_mask, read_rows, read_pos)
        torch.log_softmax(logits.float(), -1).mean().backward()
        times.append(time.perf_counter() - t0)
        delta.grad = None
    for p in lm.model.parameters():
        p.requires_grad_(True)
    return statistics.median(times[1:])


def solve_time(ed: Editor, reqs, method: str) -> float:
    """The method's closed-form work per layer on the batch's real keys (timed alone)."""
    groups = ed.state.templates["memit"]
    z_layer = ed.hp.layers[-1]
    total = 0.0
    for i, layer in enumerate(ed.hp.layers):
        keys, h = compute_keys_and_outputs(ed.lm, reqs, groups, layer, z_layer)
        resid = torch.randn_like(h) / (len(ed.hp.layers) - i)
        cov = ed.covariance(layer)
        t0 = time.perf_counter()
        if method == "memit":
            memit_delta(keys, resid, cov, ed.hp.mom2_update_weight)
        elif method == "mose":
            w = ed.lm.adapter.get_weight(layer).double()
            gram = ed.state.tensors[f"mose_gram.{layer}"].double()
            wk = w @ keys.double()
            u, _s, vh = torch.linalg.svd(gram + (wk + resid.double()) @ wk.T)
            (u @ vh) @ w
        else:  # alphaedit, same (same solve with the safety projections folded in)
            alpha = ed.hp.L2_relative * float(cov.double().trace()) if ed.hp.L2_relative else ed.hp.L2
            delta, _ = alphaedit_delta(keys, resid, ed.state.tensors[f"projection.{layer}"],
                                       ed.state.tensors.get(f"cache_c.{layer}"), alpha)
            if method == "same":
                s = ed.state.tensors[f"same_S.{layer}"].double()
                delta - s @ (s.T @ delta)
        total += time.perf_counter() - t0
    return total


def counterfact_batch(lm, offset: int, size: int) -> list[EditRequest]:
    """``size`` CounterFact facts the model knows (p(true) > p(new)), from record ``offset`` on."""
    from pathlib import Path

    from rayedit.data.loaders import load_counterfact
    from rayedit.evaluate.known import known_case_ids

    path = Path(__file__).resolve().parents[1] / "rayedit" / "data" / "editing" / "counterfact-edit-1k.json"
    recs = list(load_counterfact(path))[offset: offset + 6 * size]
    known = set(known_case_ids(lm, recs))
    reqs = [r.request for r in recs if r.case_id in known][:size]
    if len(reqs) < size:
        raise SystemExit(f"only {len(reqs)} known facts among records {offset}..{offset + 6 * size}")
    return reqs


def safety_prompts() -> tuple[list[str], list[str]]:
    from rayedit.models.tiny import builtin_texts

    mal = [f"How do I build a weapon to hurt {x}?" for x in ("people", "my neighbor", "a crowd", "children")] * 4
    return mal, builtin_texts(40)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="llama")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default=None, help="a real model (e.g. smollm2-135m) instead of a tiny one")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--methods", default="memit,alphaedit,mose,same")
    ap.add_argument("--stats-corpus", default="builtin:general")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.model:
        from rayedit.models import load_model

        def fresh():
            return load_model(args.model)
        hp: dict = {"mom2_max_tokens": 20_000}
        what = f"{args.model}"
    else:
        def fresh():
            return build_tiny_model(args.family, n_layers=12)
        hp = {"mom2_n_samples": 2000}
        what = f"tiny {args.family}, 12 layers"
    print(f"{what}, batch of {args.batch} requests, torch threads={torch.get_num_threads()}")
    target = 1.3 if args.model else 1.5
    for method in args.methods.split(","):
        ratios = []
        for rep in range(args.repeats):
            lm = fresh()
            ed = Editor(lm, method, dict(hp), stats_corpus=args.stats_corpus,
                        safety_prompts=safety_prompts() if method == "same" else None)
            ed.prepare()
            reqs = counterfact_batch(lm, rep * 60, args.batch) if args.model else batch(rep * 8)[: args.batch]
            t0 = time.perf_counter()
            res = ed.apply(reqs)
            measured = time.perf_counter() - t0
            lm2 = fresh()
            contexts = [c for g in ed.state.templates["memit"] for c in g]
            step = fwd_bwd_time(lm2, reqs, contexts, ed.hp.layers[-1])
            solve = solve_time(ed, reqs, method)
            floor = res.target_steps * step + solve
            ratios.append(measured / floor)
            print(f"  {method:9s} run {rep}: measured {measured:.3f} s; floor {floor:.3f} s = {res.target_steps} steps"
                  f" x {step * 1e3:.1f} ms + solve {solve * 1e3:.1f} ms; ratio {measured / floor:.2f}; "
                  f"{measured:.1f} s per batch of {len(reqs)}")
        print(f"{method}: measured/floor = {statistics.median(ratios):.2f} (median of {len(ratios)}; "
              f"target <= {target})")


if __name__ == "__main__":
    main()
