"""EasyEdit-style metrics, protocol ``easyedit/v1`` (methods.md §5.4), kept apart from the reference suites.

Locality compares the post-edit argmax on (locality prompt ⧺ answer) with the PRE-EDIT model's argmax on
the same ids. The pre-edit predictions are computed once by :func:`prepare_locality_cache` on the
unedited model and looked up by key afterwards; evaluation never falls back to computing them on the
model it is evaluating (which may already be edited): a missing entry is an error.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .protocols import EASYEDIT
from .records import (
    RecordError,
    as_continuation,
    case_id_of,
    prompt_text,
    request_of,
    str_list,
)
from .scoring import TokenScorer

NAN = float("nan")
CACHE_FORMAT = "rayedit-locality-cache/v1"


class PreEditCacheError(RuntimeError):
    """Pre-edit predictions are missing, or were computed on a different base model."""


def easyedit_pairs(record: Any) -> dict[str, list[tuple[str, str]]]:
    """Reliability / generalization / locality inputs for a ZsRE-like or a CounterFact-like record."""
    req = request_of(record)
    target = as_continuation(req.target_new)
    if getattr(record, "loc", None) is not None:  # ZsRE: the NQ question followed by its answer
        rephrases = str_list(record, "rephrase")
        if getattr(record, "loc_ans", None) is None:
            raise RecordError(f"record {case_id_of(record)!r} has 'loc' but no 'loc_ans'")
        locality = [(str(record.loc), as_continuation(str(record.loc_ans)))]
    else:  # CounterFact: neighbourhood prompts followed by the true object
        rephrases = str_list(record, "paraphrase_prompts")
        true = getattr(req, "target_true", None)
        neigh = str_list(record, "neighborhood_prompts")
        if neigh and not true:
            raise RecordError(f"record {case_id_of(record)!r} has neighborhood prompts but no target_true")
        locality = [(p, as_continuation(true)) for p in neigh]
    return {"reliability": [(prompt_text(req), target)], "generalization": [(r, target) for r in rephrases],
            "locality": locality}


def locality_key(prefix_ids: Sequence[int], cont_ids: Sequence[int]) -> str:
    """Key of one locality input: the exact ids (chat template, BOS and tokenizer are all in the ids)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(",".join(map(str, prefix_ids)).encode())
    h.update(b"|")
    h.update(",".join(map(str, cont_ids)).encode())
    return h.hexdigest()


class LocalityCache:
    """Pre-edit argmax ids of locality inputs for one base model (JSON-serialisable, no pickling)."""

    def __init__(self, base_fingerprint: str | None = None,
                 entries: dict[str, list[int]] | None = None) -> None:
        self.base_fingerprint = base_fingerprint
        self.entries: dict[str, list[int]] = dict(entries or {})

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def get(self, key: str) -> list[int] | None:
        return self.entries.get(key)

    def to_dict(self) -> dict[str, Any]:
        return {"format": CACHE_FORMAT, "base_fingerprint": self.base_fingerprint, "entries": self.entries}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LocalityCache:
        if data.get("format") != CACHE_FORMAT:
            raise PreEditCacheError(f"not a locality cache of format {CACHE_FORMAT}: {data.get('format')!r}")
        return cls(data.get("base_fingerprint"), {k: [int(x) for x in v] for k, v in data["entries"].items()})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> LocalityCache:
        return cls.from_dict(json.loads(Path(path).read_text()))


def _fingerprint(lm: Any) -> str:
    from ..models.loading import weights_fingerprint

    # hash the weights as they are now (a LoadedModel caches its fingerprint, which may predate an edit)
    return weights_fingerprint(lm.model)


def prepare_locality_cache(lm: Any, records: Sequence[Any], cache: LocalityCache | None = None, *,
                           fingerprint: str | None = None, **scorer_options: Any) -> LocalityCache:
    """Compute (once) the pre-edit argmax of every locality input of ``records`` on the UNEDITED ``lm``.

    ``fingerprint`` (the weights fingerprint of ``lm``) is computed when not given; if the cache already
    belongs to another base model this refuses, so predictions of an edited model never enter it.
    """
    fp = fingerprint or _fingerprint(lm)
    cache = cache if cache is not None else LocalityCache()
    if cache.base_fingerprint is None:
        cache.base_fingerprint = fp
    elif cache.base_fingerprint != fp:
        raise PreEditCacheError(
            f"the locality cache belongs to base model {cache.base_fingerprint[:12]}…, but the given "
            f"model has weights {fp[:12]}… (already edited?): pre-edit predictions must come from the "
            "unedited model")
    scorer_options.setdefault("padding_side", "left")
    scorer = TokenScorer(lm.model, lm.tokenizer, **scorer_options)
    pairs = [pair for rec in records for pair in easyedit_pairs(rec)["locality"]]
    encoded = scorer.encode(pairs)
    todo = [(p, c) for p, c in encoded if locality_key(p, c) not in cache]
    if todo:
        for (p, c), s in zip(todo, scorer.score_encoded(todo), strict=True):
            cache.entries[locality_key(p, c)] = s.argmax_ids
    return cache


def easyedit_rows(scorer: TokenScorer, records: Sequence[tuple[int, Any]],
                  locality_cache: LocalityCache | None, keep_raw: bool = True) -> list[dict[str, Any]]:
    tests_of = [(index, rec, easyedit_pairs(rec)) for index, rec in records]
    need_locality = any(t["locality"] for _, _, t in tests_of)
    if need_locality and locality_cache is None:
        raise PreEditCacheError("the easyedit suite needs a locality cache of pre-edit predictions: call "
                                "prepare_locality_cache(unedited_lm, records) before editing")
    pairs = [pair for _, _, t in tests_of for name in EASYEDIT.metrics for pair in t[name]]
    encoded = scorer.encode(pairs)
    scores = scorer.score_encoded(encoded)
    rows: list[dict[str, Any]] = []
    k = 0
    for index, rec, tests in tests_of:
        row: dict[str, Any] = {"protocol": EASYEDIT.id, "record_index": index, "case_id": case_id_of(rec),
                               "chat_template": scorer.chat_template}
        for name in EASYEDIT.metrics:
            n = len(tests[name])
            block, ids = scores[k:k + n], encoded[k:k + n]
            k += n
            if name == "locality":
                values = []
                for s, (p, c) in zip(block, ids, strict=True):
                    pre = locality_cache.get(locality_key(p, c)) if locality_cache is not None else None
                    if pre is None:
                        raise PreEditCacheError(
                            f"no pre-edit prediction for a locality input of record {case_id_of(rec)!r}: run "
                            "prepare_locality_cache on the unedited model with these records (and the same "
                            "chat_template setting)")
                    values.append(sum(a == b for a, b in zip(s.argmax_ids, pre, strict=True)) / len(pre))
                if keep_raw:
                    row["locality_post_argmax_ids"] = [s.argmax_ids for s in block]
            else:
                values = [s.accuracy for s in block]
                if keep_raw:
                    row[f"{name}_correct"] = [s.correct for s in block]
            row[name] = sum(values) / len(values) if values else NAN
        row["locality_reference"] = locality_cache.base_fingerprint if locality_cache is not None else None
        rows.append(row)
    return rows
