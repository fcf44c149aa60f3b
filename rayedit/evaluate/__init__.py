"""Edit evaluation: batched teacher-forced scoring and versioned metric protocols (no Ray, no boto3).

Typical use:

>>> from rayedit.evaluate import evaluate_records, summarize
>>> rows = evaluate_records(lm, records, "counterfact", start=0, stop=500)
>>> print(summarize(rows)["counterfact-prob/v1"]["score"])
"""

from . import audit  # noqa: F401  (registers the audit protocols general/uncertainty/safety/shift)
from .counterfact import counterfact_prob_rows
from .easyedit import LocalityCache, PreEditCacheError, easyedit_rows, prepare_locality_cache
from .generation import (
    AttributeSnippets,
    GenerationSettings,
    TfidfModel,
    get_word_tokenizer,
    ngram_entropy,
    sample_top_k,
    text_fluency,
)
from .protocols import (
    COUNTERFACT_PROB,
    EASYEDIT,
    GENERATION,
    PROTOCOLS,
    ZSRE_TOKEN_ACC,
    Protocol,
    get_protocol,
)
from .records import RecordError
from .scoring import (
    ContinuationScore,
    PromptEncoder,
    ScoringError,
    TokenScorer,
    plan_batches,
    score_continuations,
)
from .suites import (
    SUITES,
    evaluate_records,
    evaluate_step,
    harmonic_mean,
    protocols_for,
    summarize,
    summary_rows,
    to_long_rows,
)
from .zsre import zsre_rows

__all__ = [
    "AttributeSnippets", "COUNTERFACT_PROB", "ContinuationScore", "EASYEDIT", "GENERATION",
    "GenerationSettings",
    "LocalityCache", "PROTOCOLS", "PreEditCacheError", "PromptEncoder", "Protocol", "RecordError", "SUITES",
    "ScoringError", "TfidfModel", "TokenScorer", "ZSRE_TOKEN_ACC", "counterfact_prob_rows", "easyedit_rows",
    "evaluate_records", "evaluate_step", "get_protocol", "get_word_tokenizer", "harmonic_mean",
    "ngram_entropy",
    "plan_batches", "prepare_locality_cache", "protocols_for", "sample_top_k", "score_continuations",
    "summarize", "summary_rows", "text_fluency", "to_long_rows", "zsre_rows",
]
