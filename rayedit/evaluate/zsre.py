"""ZsRE token-level accuracy, protocol ``zsre-token-acc/v1`` (methods.md §5.3).

Per-token teacher-forced argmax accuracy from ONE forward over ``prompt ⧺ target`` per prompt [FIX]
(the reference re-tokenizes decoded prefixes once per target token).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .protocols import ZSRE_TOKEN_ACC
from .records import as_continuation, case_id_of, prompt_text, request_of, require, str_list
from .scoring import ContinuationScore, TokenScorer

NAN = float("nan")


def zsre_pairs(record: Any) -> dict[str, list[tuple[str, str]]]:
    """(prefix, continuation) per test: efficacy, generalization (rephrases), specificity (NQ question)."""
    req = request_of(record)
    target = as_continuation(req.target_new)
    rephrases = str_list(record, "rephrase")
    loc = str(require(record, "loc", "zsre"))
    loc_ans = as_continuation(str(require(record, "loc_ans", "zsre")))
    return {
        "efficacy": [(prompt_text(req), target)],
        "generalization": [(r, target) for r in rephrases],
        "specificity": [(loc + "?", loc_ans)],  # fixed ground truth, not the pre-edit prediction
    }


def _token_acc(scores: list[ContinuationScore]) -> float:
    # mean over tokens within a prompt, then over prompts (one prompt per test in standard ZsRE)
    if not scores:
        return NAN
    return sum(s.accuracy for s in scores) / len(scores)


def zsre_rows(scorer: TokenScorer, records: Sequence[tuple[int, Any]], keep_raw: bool = True,
              ) -> list[dict[str, Any]]:
    pairs: list[tuple[str, str]] = []
    layout: list[tuple[int, Any, dict[str, list[tuple[str, str]]], int]] = []
    for index, rec in records:
        tests = zsre_pairs(rec)
        layout.append((index, rec, tests, len(pairs)))
        for name in ZSRE_TOKEN_ACC.metrics:
            pairs.extend(tests[name])
    scores = scorer.score(pairs)
    rows: list[dict[str, Any]] = []
    for index, rec, tests, k in layout:
        row: dict[str, Any] = {"protocol": ZSRE_TOKEN_ACC.id, "record_index": index,
                               "case_id": case_id_of(rec), "chat_template": scorer.chat_template}
        for name in ZSRE_TOKEN_ACC.metrics:
            block = scores[k:k + len(tests[name])]
            k += len(tests[name])
            row[name] = _token_acc(block)
            if keep_raw:
                row[f"{name}_correct"] = [s.correct for s in block]
                row[f"{name}_target_ids"] = [s.target_ids for s in block]
                row[f"{name}_argmax_ids"] = [s.argmax_ids for s in block]
        rows.append(row)
    return rows
