"""The ``known`` filter: keep only facts the unedited model knows, so edits change knowledge it had.

A fact is known when the model prefers its true object to the new one on the edit prompt: mean token NLL
of ``target_true`` below that of ``target_new`` (the comparison CounterFact's efficacy score makes, methods.md
§5.2), i.e. p(true) > p(new) per token.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from .records import as_continuation, case_id_of, prompt_text, request_of
from .scoring import TokenScorer

CRITERION = "mean NLL(target_true) < mean NLL(target_new) on the edit prompt (p(true) > p(new))"


def records_digest(records: Sequence[Any]) -> str:
    """Identity of the facts scored (not of the file): the cache is valid for any file with these requests."""
    h = hashlib.sha256()
    for r in records:
        q = request_of(r)
        h.update(json.dumps([str(q.case_id), q.prompt, q.subject, q.target_new, q.target_true]).encode())
    return h.hexdigest()


def known_case_ids(lm: Any, records: Sequence[Any], token_budget: int = 4096) -> list[str]:
    """Case ids of the records the model knows, in record order."""
    pairs: list[tuple[str, str]] = []
    for r in records:
        q = request_of(r)
        if not q.target_true:
            raise ValueError(f"record {case_id_of(r)!r} has no true target: the known filter compares "
                             "p(true) with p(new)")
        text = prompt_text(q)
        pairs += [(text, as_continuation(q.target_true)), (text, as_continuation(q.target_new))]
    scores = TokenScorer(lm.model, lm.tokenizer, token_budget=token_budget).score(pairs)
    return [case_id_of(r) for i, r in enumerate(records) if scores[2 * i].mean_nll < scores[2 * i + 1].mean_nll]
