"""CounterFact probability tests, protocol ``counterfact-prob/v1`` (methods.md §5.2).

One wide row per record. Per-prompt NLLs and per-token log-probs / argmax correctness are kept as list
columns (``raw``) so a surprising number can be traced back to tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .protocols import COUNTERFACT_PROB
from .records import (
    RecordError,
    as_continuation,
    case_id_of,
    prompt_text,
    request_of,
    str_list,
)
from .scoring import ContinuationScore, TokenScorer

GROUPS = ("rewrite", "paraphrase", "neighborhood")
NAN = float("nan")
Pairs = tuple[list[ContinuationScore], list[ContinuationScore]]  # (new, true) scores, one per prompt


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else NAN


def counterfact_prompts(record: Any) -> dict[str, list[str]]:
    """The prefixes of each test group: the filled rewrite prompt, the paraphrases, the neighbours."""
    return {
        "rewrite": [prompt_text(request_of(record))],
        "paraphrase": str_list(record, "paraphrase_prompts"),
        "neighborhood": str_list(record, "neighborhood_prompts"),
    }


def counterfact_targets(record: Any) -> tuple[str, str]:
    req = request_of(record)
    if not getattr(req, "target_true", None):
        raise RecordError(f"record {case_id_of(record)!r} has no target_true: CounterFact probability tests "
                          "compare the new target with the true one")
    return as_continuation(req.target_new), as_continuation(req.target_true)


def counterfact_prob_rows(scorer: TokenScorer, records: Sequence[tuple[int, Any]], keep_raw: bool = True,
                          ) -> list[dict[str, Any]]:
    """Rows for ``[(record_index, record)]``; all prompts of all records are scored in one batched pass."""
    pairs: list[tuple[str, str]] = []
    layout: list[tuple[int, Any, dict[str, list[str]], str, str, int]] = []
    for index, rec in records:
        prompts = counterfact_prompts(rec)
        new, true = counterfact_targets(rec)
        layout.append((index, rec, prompts, new, true, len(pairs)))
        for group in GROUPS:
            for p in prompts[group]:
                pairs.append((p, new))
                pairs.append((p, true))
    scores = scorer.score(pairs)

    rows: list[dict[str, Any]] = []
    for index, rec, prompts, new, true, k in layout:
        row: dict[str, Any] = {"protocol": COUNTERFACT_PROB.id, "record_index": index,
                               "case_id": case_id_of(rec), "chat_template": scorer.chat_template}
        per_group: dict[str, Pairs] = {}
        for group in GROUPS:
            n = len(prompts[group])
            block = scores[k:k + 2 * n]
            per_group[group] = (block[0::2], block[1::2])  # (new, true) per prompt
            k += 2 * n
        _metrics(row, per_group)
        if keep_raw:
            row["target_new"] = new
            row["target_true"] = true
            for group in GROUPS:
                for cand, ss in zip(("new", "true"), per_group[group], strict=True):
                    row[f"{group}_nll_{cand}"] = [s.mean_nll for s in ss]
                    row[f"{group}_logprobs_{cand}"] = [s.logprobs for s in ss]
                    row[f"{group}_correct_{cand}"] = [s.correct for s in ss]
            rw_new, rw_true = per_group["rewrite"]
            row["target_new_ids"] = rw_new[0].target_ids
            row["target_true_ids"] = rw_true[0].target_ids
        rows.append(row)
    return rows


def _metrics(row: dict[str, Any], per_group: dict[str, Pairs]) -> None:
    names = {"rewrite": "efficacy", "paraphrase": "paraphrase", "neighborhood": "neighborhood"}
    for group, metric in names.items():
        new, true = per_group[group]
        nll_new = [s.mean_nll for s in new]
        nll_true = [s.mean_nll for s in true]
        if group == "neighborhood":
            # specificity: the model should still prefer the true object for unrelated subjects
            success = [float(t < n) for n, t in zip(nll_new, nll_true, strict=True)]
            diff = [math.exp(-t) - math.exp(-n) for n, t in zip(nll_new, nll_true, strict=True)]
            acc = [float(s.all_correct) for s in true]
        else:
            success = [float(t > n) for n, t in zip(nll_new, nll_true, strict=True)]
            diff = [math.exp(-n) - math.exp(-t) for n, t in zip(nll_new, nll_true, strict=True)]
            acc = [float(s.all_correct) for s in new]
        row[f"{metric}_success"] = _mean(success)
        row[f"{metric}_diff"] = _mean(diff)
        row[f"{metric}_acc"] = _mean(acc)
        row[f"{metric}_n_prompts"] = len(new)
