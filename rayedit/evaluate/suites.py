"""Evaluate records under named suites, shard by record range, and summarise (methods.md §5).

Suites map to versioned protocols:

- ``counterfact`` → ``counterfact-prob/v1`` (+ ``generation/v1`` when ``generation=True``)
- ``generation``  → ``generation/v1`` only
- ``zsre``        → ``zsre-token-acc/v1``
- ``easyedit``    → ``easyedit/v1`` (needs a locality cache of pre-edit predictions)

Rows are wide, one per (record, protocol), with ``protocol``, ``record_index`` (global position in the
given record list, so shards concatenate), ``case_id``, ``chat_template``, the metric columns of the
protocol and raw list columns (per-token scores, generations). ``to_long_rows`` gives one row per
(record, metric).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from .counterfact import counterfact_prob_rows
from .easyedit import LocalityCache, easyedit_rows
from .generation import AttributeSnippets, GenerationSettings, TfidfModel, generation_rows
from .protocols import COUNTERFACT_PROB, EASYEDIT, GENERATION, ZSRE_TOKEN_ACC, get_protocol
from .scoring import TokenScorer
from .zsre import zsre_rows

SUITES: dict[str, tuple[str, ...]] = {
    "counterfact": (COUNTERFACT_PROB.id,),
    "generation": (GENERATION.id,),
    "zsre": (ZSRE_TOKEN_ACC.id,),
    "easyedit": (EASYEDIT.id,),
}


def protocols_for(suite: str | Sequence[str], generation: bool = False) -> list[str]:
    """The protocol ids a suite (or list of suites) runs, in order, without duplicates."""
    names = [suite] if isinstance(suite, str) else list(suite)
    out: list[str] = []
    for name in names:
        if name not in SUITES:
            raise ValueError(f"unknown evaluation suite {name!r} (known: {', '.join(SUITES)})")
        out.extend(SUITES[name])
        if name == "counterfact" and generation:
            out.append(GENERATION.id)
    return list(dict.fromkeys(out))


@contextmanager
def _eval_mode(model: torch.nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def evaluate_records(
    lm: Any,
    records: Sequence[Any],
    suite: str | Sequence[str] = "counterfact",
    *,
    start: int = 0,
    stop: int | None = None,
    chat_template: bool = False,
    token_budget: int = 8192,
    max_batch_size: int | None = 512,
    continuation_rule: str = "auto",
    generation: bool = False,
    generation_test_interval: int = 1,
    generation_seed: int = 0,
    generation_batch_size: int = 32,
    word_tokenizer: str = "auto",
    snippets: AttributeSnippets | None = None,
    tfidf: TfidfModel | None = None,
    locality_cache: LocalityCache | None = None,
    keep_raw: bool = True,
    extra_columns: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Evaluate ``records[start:stop]`` on ``lm`` (anything with ``.model`` and ``.tokenizer``).

    ``record_index`` in the rows is the index in ``records`` (not in the slice), so the rows of shards
    ``[0, 100)``, ``[100, 200)``, … concatenate to the rows of the whole range, and generation tests
    (every ``generation_test_interval``-th record) pick the same records whatever the sharding.
    ``chat_template`` wraps every prompt in the tokenizer's chat template (reference CounterFact/ZsRE
    evaluation uses raw prompts, methods.md §10.17); it is recorded in every row. ``generation_batch_size``
    bounds the generation prompts sampled together (speed and memory only).
    """
    protocols = protocols_for(suite, generation)
    stop = len(records) if stop is None else min(stop, len(records))
    if start < 0 or start > stop:
        raise ValueError(f"bad record range [{start}, {stop}) for {len(records)} records")
    chunk = [(i, records[i]) for i in range(start, stop)]
    model, tokenizer = lm.model, lm.tokenizer
    common = dict(token_budget=token_budget, max_batch_size=max_batch_size, chat_template=chat_template,
                  continuation_rule=continuation_rule)
    rows: list[dict[str, Any]] = []
    with _eval_mode(model):
        for pid in protocols:
            if pid == COUNTERFACT_PROB.id:
                scorer = TokenScorer(model, tokenizer, padding_side="right", **common)
                rows.extend(counterfact_prob_rows(scorer, chunk, keep_raw=keep_raw))
            elif pid == ZSRE_TOKEN_ACC.id:
                scorer = TokenScorer(model, tokenizer, padding_side="right", **common)
                rows.extend(zsre_rows(scorer, chunk, keep_raw=keep_raw))
            elif pid == EASYEDIT.id:
                # EasyEdit's own path is left padded (methods.md §10.1), kept apart from the reference path
                scorer = TokenScorer(model, tokenizer, padding_side="left", **common)
                rows.extend(easyedit_rows(scorer, chunk, locality_cache, keep_raw=keep_raw))
            elif pid == GENERATION.id:
                settings = GenerationSettings(seed=generation_seed, interval=generation_test_interval,
                                              word_tokenizer=word_tokenizer, snippets=snippets, tfidf=tfidf)
                scorer = TokenScorer(model, tokenizer, **common)
                rows.extend(generation_rows(model, scorer.encoder, chunk, settings, keep_raw=keep_raw,
                                            batch_prompts=generation_batch_size))
    if extra_columns:
        for row in rows:
            for k, v in extra_columns.items():
                row.setdefault(k, v)
    return rows


def evaluate_step(lm: Any, edited_records: Sequence[Any], step: int,
                  suite: str | Sequence[str] = "counterfact", **options: Any) -> list[dict[str, Any]]:
    """At ``step`` of a sequential stream, evaluate every edit made so far (retention) and its neighbourhood.

    ``edited_records`` are the stream's records in edit order; ``record_index`` is then the position
    of the edit in the stream (early indices measure retention). Accepts the options of
    :func:`evaluate_records`, including ``start``/``stop`` for sharding.
    """
    extra = dict(options.pop("extra_columns", None) or {})
    extra.setdefault("step", step)
    extra.setdefault("n_edited", len(edited_records))
    return evaluate_records(lm, edited_records, suite, extra_columns=extra, **options)


# -- summaries ------------------------------------------------------------------------------------
def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and not math.isnan(v)


def harmonic_mean(values: Iterable[float]) -> float:
    vals = list(values)
    if not vals or any(not _is_number(v) for v in vals):
        return float("nan")
    if any(v <= 0 for v in vals):
        return 0.0
    return len(vals) / sum(1.0 / v for v in vals)


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per protocol: ``{"n_records", "chat_template", "metrics": {name: {"mean": ×100, "n"}}, "score"?}``;
    the protocol's ``unscaled`` metrics (generation fluency, in bits) are plain means, not ×100.

    Means skip NaN (e.g. a record without paraphrases); ``n`` counts the values averaged. The CounterFact
    ``score`` is the harmonic mean of the efficacy, paraphrase and neighborhood success means. Rows of
    different protocols are never pooled; rows of one protocol with mixed ``chat_template`` are refused.
    """
    by_protocol: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_protocol.setdefault(row["protocol"], []).append(row)
    out: dict[str, dict[str, Any]] = {}
    for pid, group in by_protocol.items():
        proto = get_protocol(pid)
        chat = {bool(r.get("chat_template", False)) for r in group}
        if len(chat) > 1:
            raise ValueError(f"rows of {pid} mix chat_template True and False; summarise them separately")
        metrics: dict[str, dict[str, float | int]] = {}
        for name in proto.metrics:
            vals = [r[name] for r in group if _is_number(r.get(name))]
            scale = 1.0 if name in proto.unscaled else 100.0
            metrics[name] = {"mean": scale * sum(vals) / len(vals) if vals else float("nan"), "n": len(vals)}
        entry: dict[str, Any] = {"n_records": len(group), "chat_template": chat.pop(), "metrics": metrics}
        if proto.score_of:
            entry["score"] = harmonic_mean(metrics[m]["mean"] for m in proto.score_of)
        if pid == GENERATION.id:
            entry["word_tokenizer"] = sorted({str(r.get("word_tokenizer")) for r in group})
        out[pid] = entry
    return out


def summary_rows(rows: Sequence[dict[str, Any]], by: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Tidy summary: one row per (protocol, *by, metric) with ``mean`` (×100, as ``summarize``) and ``n``."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(k) for k in by), []).append(row)
    out: list[dict[str, Any]] = []
    for key, group in groups.items():
        for pid, entry in summarize(group).items():
            base = {"protocol": pid, **dict(zip(by, key, strict=True)),
                    "chat_template": entry["chat_template"], "n_records": entry["n_records"]}
            for name, m in entry["metrics"].items():
                out.append({**base, "metric": name, "mean": m["mean"], "n": m["n"]})
            if "score" in entry:
                out.append({**base, "metric": "score", "mean": entry["score"], "n": entry["n_records"]})
    return out


def to_long_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (record, metric): protocol, case_id, record_index, metric, value + scalar extra columns."""
    out: list[dict[str, Any]] = []
    for row in rows:
        proto = get_protocol(row["protocol"])
        base = {k: v for k, v in row.items()
                if k not in proto.metrics and not isinstance(v, list | tuple | dict)}
        for name in proto.metrics:
            if name in row:
                out.append({**base, "metric": name, "value": row[name]})
    return out
