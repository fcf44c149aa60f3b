"""Audit suites: what edits cost — general capability, uncertainty growth Δ_U, safety, representation shift.

Each suite is batched, shardable by record range (rows carry the global ``record_index``, so the rows of
shards concatenate) and versioned (``general/v1``, ``uncertainty/v1``, ``safety/v1``, ``shift/v1``,
registered in ``rayedit.evaluate.protocols.PROTOCOLS``). No Ray, no boto3.

>>> from rayedit.evaluate.audit import audit_records, run_audit_suite, summarize_audit
>>> recs = audit_records("uncertainty", {"n_paraphrases": 6}, world=world)          # doctest: +SKIP
>>> rows = run_audit_suite("uncertainty", model, tok, recs, {"n_paraphrases": 6},
...                        base=use_base, start=0, stop=50, cache=replica_cache)      # doctest: +SKIP
>>> summarize_audit(rows, by=("step",))                                               # doctest: +SKIP

Before/after: suites that compare with the unedited model take ``base``, a zero-argument context-manager
factory under which the same model object carries the unedited weights (``shift`` needs it;
``uncertainty`` uses it for Δ_U, or its step-0 rows are joined later with :func:`attach_delta_u`).
"""

from .api import AUDIT_SUITES, audit_records, audit_settings, run_audit_suite, summarize_audit
from .embed import DEFAULT_EMBEDDING_MODEL, EmbeddingModelError, SentenceEmbedder, get_embedder
from .general import TASKS, GeneralItem, general_summary, mcc, parse_generated, weighted_f1
from .protocols import AUDIT_PROTOCOLS, GENERAL, SAFETY, SHIFT, UNCERTAINTY
from .safety import REFUSAL_MARKERS, ClassifierJudge, RefusalPatternJudge, safety_summary
from .settings import (
    GENERAL_TASKS,
    REFERENCE_TASKS,
    SETTINGS,
    AuditSuiteSettings,
    GeneralFile,
    GeneralSettings,
    SafetySettings,
    ShiftSettings,
    UncertaintySettings,
)
from .shift import ShiftPrompt, hausdorff, hidden_states, inside_ellipse, kde_overlap, pca_basis, shift_summary
from .uncertainty import (
    SYNTACTIC_VARIANTS,
    ProbeFact,
    ProbeQuery,
    attach_delta_u,
    delta_u,
    probes_from_records,
    spuq,
    uncertainty_summary,
)

__all__ = [
    "AUDIT_PROTOCOLS", "AUDIT_SUITES", "AuditSuiteSettings", "ClassifierJudge", "DEFAULT_EMBEDDING_MODEL",
    "EmbeddingModelError", "GENERAL", "GENERAL_TASKS", "GeneralFile", "GeneralItem", "GeneralSettings",
    "ProbeFact", "ProbeQuery", "REFERENCE_TASKS", "REFUSAL_MARKERS", "RefusalPatternJudge", "SAFETY", "SETTINGS",
    "SHIFT", "SYNTACTIC_VARIANTS", "SafetySettings", "SentenceEmbedder", "ShiftPrompt", "ShiftSettings", "TASKS",
    "UNCERTAINTY", "UncertaintySettings", "attach_delta_u", "audit_records", "audit_settings", "delta_u",
    "general_summary", "get_embedder", "hausdorff", "hidden_states", "inside_ellipse", "kde_overlap", "mcc",
    "parse_generated", "pca_basis", "probes_from_records", "run_audit_suite", "safety_summary", "shift_summary",
    "spuq", "summarize_audit", "uncertainty_summary", "weighted_f1",
]
