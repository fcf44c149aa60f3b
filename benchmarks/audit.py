"""Time per fact of the uncertainty audit suite over its floor, on one CPU thread.

Measured side by side in the same run, on the same probes and model:

1. the suite: ``run_audit_suite("uncertainty", ...)`` on N facts (edit query only, so one query = M
   paraphrases × K samples per fact): prompt encoding, per-row seeded nucleus sampling with a KV cache,
   stop at EOS, embedding (deduplicated), U_alea/U_epis/U and row assembly;
2. the floor, per fact: ONE batch of M × K generations of the answer length (prefill + plain cached
   decode forwards, as many as the suite's batch needed, argmax — no sampling, no stopping logic) plus ONE
   embedding batch of the M × K answers (tokenize + encoder forward + mean pooling, no deduplication);
3. a strict floor: the same, but the embedding batch holds only the fact's distinct answers (the suite
   embeds each distinct text once), so the ratio to it is the suite's own overhead.

Prints ``time_per_fact_over_floor`` (target <= 1.5) and ``time_per_fact_over_strict_floor``. Uses the toy
world (model, CounterFact facts and its templates as paraphrases) from ``$RAYEDIT_TOYWORLD_CACHE``
(default ``.rayedit/toyworld-cache``).

    .venv/bin/python benchmarks/audit.py [--facts 40] [--repeats 3] [--max-new-tokens 32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)

from rayedit.data import load_counterfact  # noqa: E402
from rayedit.data.toyworld import ensure_toyworld  # noqa: E402
from rayedit.evaluate.audit import (  # noqa: E402
    audit_records,
    audit_settings,
    get_embedder,
    run_audit_suite,
    uncertainty_summary,
)
from rayedit.evaluate.audit.uncertainty import _Prompts  # noqa: E402
from rayedit.models import load_model  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@torch.no_grad()
def generation_floor(model: Any, prompt_ids: list[list[int]], steps: int, pad: int) -> None:
    """One left-padded batch: prefill, then ``steps − 1`` cached single-token forwards (argmax)."""
    lens = [len(x) for x in prompt_ids]
    width = max(lens)
    ids = torch.tensor([[pad] * (width - n) + x for x, n in zip(prompt_ids, lens, strict=True)])
    mask = torch.tensor([[0] * (width - n) + [1] * n for n in lens])
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    for _ in range(steps - 1):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=nxt, attention_mask=mask, position_ids=pos, past_key_values=out.past_key_values,
                    use_cache=True)


@torch.no_grad()
def embedding_floor(embedder: Any, texts: list[str]) -> None:
    enc = embedder.tokenizer(texts, padding=True, truncation=True, max_length=embedder.max_length,
                             return_tensors="pt")
    hidden = embedder.model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)


def timed(fn: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--facts", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3, help="repeats of suite and floor (interleaved; min taken)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0, help="toy world seed")
    args = ap.parse_args(argv)

    cache = os.environ.get("RAYEDIT_TOYWORLD_CACHE") or str(REPO / ".rayedit" / "toyworld-cache")
    world = ensure_toyworld(seed=args.seed, cache_dir=cache)
    lm = load_model(str(world.model_dir))
    settings = audit_settings("uncertainty", {"roles": ["edit"], "max_new_tokens": args.max_new_tokens})
    records = list(load_counterfact(world.counterfact, limit=args.facts))
    probes = audit_records("uncertainty", settings, records, world=world)
    embedder = get_embedder(settings.embedding_model)
    m, k = settings.n_paraphrases, settings.n_samples
    print(f"source: toy world seed {args.seed} ({world.root}); facts: {len(probes)}; M={m}, K={k}; "
          f"max_new_tokens: {settings.max_new_tokens}; torch threads: {torch.get_num_threads()}")

    embedded: list[int] = []

    def suite() -> list[dict[str, Any]]:
        embedder.clear_cache()  # every repeat embeds from scratch, as a fresh process would
        before = embedder.n_embedded
        out = run_audit_suite("uncertainty", lm.model, lm.tokenizer, probes, settings, embedder=embedder)
        embedded.append(embedder.n_embedded - before)
        return out

    run_audit_suite("uncertainty", lm.model, lm.tokenizer, probes[:2], settings, embedder=embedder)  # warm-up
    _, rows = timed(suite)
    # the floor's inputs: each fact's prompt ids (M × K rows), decode steps and answers, from the suite itself
    prompts = _Prompts(lm.model, lm.tokenizer, settings)
    plan = []
    for fact, row in zip(probes, rows, strict=True):
        texts = [p for p in fact.queries[0].paraphrases[:m] for _ in range(k)]
        plan.append((prompts.ids(texts), int(row["decode_steps"]), [a for per in row["answers"] for a in per]))
    pad = lm.tokenizer.pad_token_id or 0

    def floor(distinct: bool = False) -> None:
        for ids, steps, answers in plan:
            generation_floor(lm.model, ids, steps, pad)
            embedding_floor(embedder, list(dict.fromkeys(answers)) if distinct else answers)

    t_suite, t_floor, t_strict = [], [], []
    for _ in range(args.repeats):  # interleaved so all see the same machine load
        dt, rows = timed(suite)
        t_suite.append(dt)
        dt, _ = timed(floor)
        t_floor.append(dt)
        dt, _ = timed(lambda: floor(distinct=True))
        t_strict.append(dt)
    s = uncertainty_summary(rows)["edit"]
    steps = [p[1] for p in plan]
    n = len(probes)
    print(f"decode steps per fact: mean {statistics.mean(steps):.1f}, max {max(steps)}; "
          f"mean answer tokens {statistics.mean(r['mean_answer_tokens'] for r in rows):.2f}; "
          f"U mean {s['u']:.3f}; distinct answers embedded per run {embedded[-1]} of {n * m * k}")
    best, fl = min(t_suite), min(t_floor)
    print(f"suite: {best / n * 1e3:.1f} ms/fact (runs: {', '.join(f'{t:.2f}' for t in t_suite)} s)")
    print(f"floor: {fl / n * 1e3:.1f} ms/fact (runs: {', '.join(f'{t:.2f}' for t in t_floor)} s)")
    st = min(t_strict)
    print(f"strict floor (embedding batch of each fact's distinct answers only): {st / n * 1e3:.1f} ms/fact "
          f"(runs: {', '.join(f'{t:.2f}' for t in t_strict)} s)")
    ratio = best / fl
    print(f"time_per_fact_over_floor: {ratio:.2f}x (target <= 1.5)")
    print(f"time_per_fact_over_strict_floor: {best / st:.2f}x (the suite's own overhead: sampling, seeds, rows)")
    print(f"median_time_per_fact_over_floor: {statistics.median(t_suite) / statistics.median(t_floor):.2f}x")
    return 0 if ratio <= 1.5 else 1


if __name__ == "__main__":
    sys.exit(main())
