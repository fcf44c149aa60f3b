"""Throughput of the batched CounterFact evaluator (rayedit.evaluate) on one CPU thread.

Measured side by side in the same run, on the same records and model:

1. per-prompt reference: one forward per (prefix, candidate), no padding (how a naive evaluator works);
2. the batched evaluator: ``evaluate_records(lm, records, "counterfact")`` (tokenization, batching,
   forwards, metric assembly, raw columns);
3. the floor: only the batched forwards over the same padded token batches (plain ``model(...)``).

Prints ``speedup_vs_per_prompt`` (target >= 10x) and ``overhead_vs_forward_floor`` (target <= 1.5x).
Uses the toy world's CounterFact file and model when ``rayedit.data.toyworld.ensure_toyworld`` is
available, else 500 synthetic CounterFact-format records from simple templates and a tiny model.

    .venv/bin/python benchmarks/eval_throughput.py [--records 500] [--family llama] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)

from rayedit.data.requests import EditRequest  # noqa: E402
from rayedit.data.schema import CounterFactRecord  # noqa: E402
from rayedit.evaluate import TokenScorer, evaluate_records, summarize  # noqa: E402
from rayedit.evaluate.counterfact import GROUPS, counterfact_prompts, counterfact_targets  # noqa: E402

FIRST = ["Anna", "Boris", "Carla", "David", "Elena", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kira",
         "Luca"]
LAST = ["Smith", "Moreau", "Rossi", "Novak", "Silva", "Berg", "Kowalski", "Jensen", "Costa", "Weber"]
RELATIONS = [
    ("P19", "{} was born in", ["The birthplace of {} is", "{}, who was born in"],
     "was born in", ["Paris", "Rome", "Berlin", "Madrid", "Vienna", "Lisbon", "Prague", "Oslo"]),
    ("P106", "{} works as a", ["The profession of {} is", "By profession, {} is a"],
     "works as a", ["teacher", "lawyer", "farmer", "painter", "doctor", "pilot", "chemist", "baker"]),
    ("P1412", "{} speaks the language", ["The mother tongue of {} is", "{} is a native speaker of"],
     "speaks the language", ["French", "Italian", "German", "Spanish", "Polish", "Danish", "Greek"]),
]


def person(j: int) -> str:
    """A distinct name for every j < 81120 (so prompts are not trivially deduplicated)."""
    a, b = divmod(j // len(FIRST), 26)
    initials = f"{chr(65 + a % 26)}{chr(97 + b)}"
    return f"{FIRST[j % len(FIRST)]} {initials}. {LAST[(j // (len(FIRST) * 676)) % len(LAST)]}"


def synthetic_records(n: int) -> list[CounterFactRecord]:
    """CounterFact-shaped records: 1 rewrite prompt, 2 paraphrases, 10 neighbourhood prompts each."""
    out = []
    for i in range(n):
        rid, prompt, paras, verb, objects = RELATIONS[i % len(RELATIONS)]
        subject = person(i)
        true = objects[i % len(objects)]
        new = objects[(i * 7 + 3) % len(objects)]
        if new == true:
            new = objects[(objects.index(true) + 1) % len(objects)]
        neighbours = [f"{person(n + 10 * i + k)} {verb}" for k in range(10)]
        out.append(CounterFactRecord(
            case_id=str(i),
            request=EditRequest(case_id=str(i), prompt=prompt, subject=subject, target_new=new,
                                target_true=true),
            relation_id=rid, paraphrase_prompts=[p.format(subject) for p in paras],
            neighborhood_prompts=neighbours, attribute_prompts=[], generation_prompts=[]))
    return out


def load_inputs(n: int, family: str) -> tuple[Any, list[Any], str]:
    try:
        from rayedit.data.toyworld import ensure_toyworld  # type: ignore[import-not-found]
    except ImportError:
        ensure_toyworld = None
    if ensure_toyworld is not None:
        try:
            from rayedit.data.loaders import load_counterfact  # type: ignore[import-not-found]
            from rayedit.models import load_model

            tw = ensure_toyworld()
            get = (lambda k: tw.get(k)) if isinstance(tw, dict) else (lambda k: getattr(tw, k, None))
            cf_path = get("counterfact") or get("counterfact_path")
            model_path = get("model") or get("model_path") or get("model_dir")
            if cf_path and model_path:
                records = load_counterfact(cf_path, limit=n)
                return load_model(str(model_path)), records, f"toyworld ({cf_path})"
            print("note: toy world found but without counterfact/model paths; using synthetic records")
        except Exception as exc:  # the toy world is optional here: say why it was not used and go on
            print(f"note: toy world unavailable ({type(exc).__name__}: {exc}); using synthetic records")
    from rayedit.models import build_tiny_model

    return build_tiny_model(family), synthetic_records(n), f"synthetic ({n} records, tiny {family})"


@torch.no_grad()
def per_prompt_reference(lm: Any, records: list[Any]) -> list[dict[str, float]]:
    """One unpadded forward per (prefix, candidate); same metric definitions as counterfact-prob/v1."""
    model, tok = lm.model, lm.tokenizer
    rows = []
    for rec in records:
        prompts = counterfact_prompts(rec)
        new, true = counterfact_targets(rec)
        row: dict[str, float] = {}
        for group, metric in zip(GROUPS, ("efficacy", "paraphrase", "neighborhood"), strict=True):
            succ = []
            for prefix in prompts[group]:
                nll = {}
                for cand in (new, true):
                    p = tok(prefix)["input_ids"]
                    c = tok(cand, add_special_tokens=False)["input_ids"]
                    logp = torch.log_softmax(model(torch.tensor([p + c])).logits[0].float(), dim=-1)
                    nll[cand] = -sum(logp[len(p) - 1 + j, t].item() for j, t in enumerate(c)) / len(c)
                ok = nll[true] < nll[new] if group == "neighborhood" else nll[true] > nll[new]
                succ.append(float(ok))
            row[f"{metric}_success"] = sum(succ) / len(succ)
        rows.append(row)
    return rows


@torch.no_grad()
def forward_floor(lm: Any, batches: list[Any]) -> None:
    for b in batches:
        lm.model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids,
                 use_cache=False)


def timed(fn: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=500)
    ap.add_argument("--family", default="llama", help="tiny model family when no toy world is available")
    ap.add_argument("--repeats", type=int, default=3,
                    help="repeats of the batched and floor timings (min taken)")
    ap.add_argument("--token-budget", type=int, default=8192)
    ap.add_argument("--reference-records", type=int, default=None,
                    help="time the per-prompt reference on the first N records only and scale its time "
                         "to all records (default: all records, no scaling)")
    args = ap.parse_args(argv)

    lm, records, source = load_inputs(args.records, args.family)
    lm.model.eval()
    opts = dict(token_budget=args.token_budget)
    print(f"source: {source}; torch threads: {torch.get_num_threads()}; token_budget: {args.token_budget}")

    # the exact batches the evaluator forwards (same dedup, sort and budget), for the floor
    scorer = TokenScorer(lm.model, lm.tokenizer, **opts)
    pairs = []
    for rec in records:
        prompts = counterfact_prompts(rec)
        new, true = counterfact_targets(rec)
        pairs += [(p, c) for g in GROUPS for p in prompts[g] for c in (new, true)]
    encoded = list({(tuple(p), tuple(c)): (p, c) for p, c in scorer.encode(pairs)}.values())
    batches = scorer.make_batches(encoded)
    n_tokens = sum(len(p) + len(c) for p, c in encoded)
    padded = sum(b.n_padded_tokens for b in batches)
    print(f"sequences: {len(pairs)} ({len(encoded)} unique), tokens: {n_tokens}, padded: {padded}, "
          f"batches: {len(batches)}")

    evaluate_records(lm, records[:20], "counterfact", **opts)  # warm-up (first-call detection, allocator)
    forward_floor(lm, batches[:2])
    t_batched, t_floor = [], []
    rows: list[dict[str, Any]] = []
    for _ in range(args.repeats):  # interleaved so both see the same machine load
        dt, rows = timed(lambda: evaluate_records(lm, records, "counterfact", **opts))
        t_batched.append(dt)
        dt, _ = timed(lambda: forward_floor(lm, batches))
        t_floor.append(dt)
    n_ref = min(args.reference_records or len(records), len(records))
    t_ref, ref_rows = timed(lambda: per_prompt_reference(lm, records[:n_ref]))
    if n_ref < len(records):
        print(f"note: per-prompt reference timed on {n_ref} records, scaled by {len(records) / n_ref:.2f}")
        t_ref *= len(records) / n_ref

    worst = max(abs(r[m] - b[m]) for r, b in zip(ref_rows, rows, strict=False) for m in r)
    summary = summarize(rows)["counterfact-prob/v1"]
    best, floor = min(t_batched), min(t_floor)
    print(f"per_prompt_reference: {t_ref:.2f} s ({len(pairs) / t_ref:.0f} seq/s)")
    print(f"batched_evaluator: {best:.3f} s ({len(pairs) / best:.0f} seq/s; runs: "
          f"{', '.join(f'{t:.3f}' for t in t_batched)})")
    print(f"forward_floor: {floor:.3f} s (runs: {', '.join(f'{t:.3f}' for t in t_floor)})")
    print(f"metrics_max_abs_diff_vs_reference: {worst:.2e}; score: {summary['score']:.2f}")
    speedup, overhead = t_ref / best, best / floor
    print(f"speedup_vs_per_prompt: {speedup:.1f}x (target >= 10)")
    print(f"overhead_vs_forward_floor: {overhead:.2f}x (target <= 1.5)")
    median_ratio = statistics.median(t_batched) / statistics.median(t_floor)
    print(f"median_overhead_vs_forward_floor: {median_ratio:.2f}x")
    return 0 if speedup >= 10 and overhead <= 1.5 else 1


if __name__ == "__main__":
    sys.exit(main())
