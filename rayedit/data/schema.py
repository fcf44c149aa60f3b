"""Normalised in-memory dataset records and the errors the loaders report.

The record types are what the rest of rayedit consumes (editing streams, evaluation suites); the
loaders in ``rayedit.data.loaders`` produce them from the published on-disk layouts after validating
every record. All models are frozen pydantic models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from pydantic import BaseModel, ConfigDict, model_validator

from .requests import EditRequest

T = TypeVar("T")


class CounterFactRecord(BaseModel):
    """One CounterFact case (methods.md §5.2); ``request.target_true`` is always set."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    case_id: str
    request: EditRequest
    relation_id: str | None = None
    paraphrase_prompts: list[str]
    neighborhood_prompts: list[str]
    attribute_prompts: list[str]
    generation_prompts: list[str]

    @model_validator(mode="after")
    def _has_true_target(self) -> CounterFactRecord:
        if self.request.target_true is None:
            raise ValueError("a CounterFact request needs target_true")
        return self


class ZsreRecord(BaseModel):
    """One ZsRE case (methods.md §5.3). ``rephrase`` is a full question with the subject in it;
    ``loc`` is the NQ locality question (``"nq question: ..."``) and ``loc_ans`` its answer."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    case_id: str
    request: EditRequest
    rephrase: str
    loc: str
    loc_ans: str


class KnownFact(BaseModel):
    """One fact of ROME's ``known_1000`` tracing set: ``prompt`` has one ``{}`` at the subject and the model
    should continue it with ``target_true``. No new object: a tracing set, not an editing set."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    case_id: str
    prompt: str
    subject: str
    target_true: str
    relation_id: str | None = None
    prediction: str | None = None  # the continuation of the model the set was built with (GPT-2 XL)


class MaliciousQuery(BaseModel):
    """A harmful request for safety evaluation (methods.md §7.3); ``harmful_target`` is optional."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    prompt: str
    category: str
    harmful_target: str | None = None


# --------------------------------------------------------------------------------------------------
# problems and errors


@dataclass(frozen=True)
class Problem:
    """One validation finding: where (file, record index, record id, field) and what."""

    source: str
    index: int | None  # 0-based record index; None for file-level problems
    record_id: str | None
    field: str | None
    message: str
    id_name: str = "case_id"

    def __str__(self) -> str:
        where = self.source
        if self.index is not None:
            where += f": record {self.index}"
            if self.record_id is not None:
                where += f" ({self.id_name} {self.record_id})"
        if self.field:
            where += f": field {self.field}"
        return f"{where}: {self.message}"


class DatasetError(ValueError):
    """Base class of the data layer's errors."""


class DatasetSourceError(DatasetError):
    """The source itself cannot be read (missing file, unknown format, bad top level, hub failure)."""


class DatasetValidationError(DatasetError):
    """One or more records are invalid. The first line of the message is a summary; every problem
    follows on its own line, and the list is also available as ``problems``."""

    def __init__(self, source: str, problems: list[Problem], n_read: int, n_invalid: int) -> None:
        self.source = source
        self.problems = problems
        self.n_read = n_read
        self.n_invalid = n_invalid
        summary = (f"{source}: {n_invalid} of {n_read} records invalid ({len(problems)} problem"
                   f"{'s' if len(problems) != 1 else ''}); fix them or load with skip_invalid=True")
        super().__init__("\n".join([summary, *(f"  {p}" for p in problems)]))


class LoadedRecords(list[T], Generic[T]):
    """The records a loader accepted (a plain list), plus what it skipped.

    ``skipped`` counts records dropped under ``skip_invalid=True`` and ``problems`` says why; both are
    empty when every record was valid.
    """

    def __init__(self, items: list[T], source: str, skipped: int = 0,
                 problems: list[Problem] | None = None, n_read: int = 0) -> None:
        super().__init__(items)
        self.source = source
        self.skipped = skipped
        self.problems = problems or []
        self.n_read = n_read
