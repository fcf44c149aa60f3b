"""Edit requests: the unit every editing method consumes (methods.md §2.1).

``prompt`` is a template with exactly one ``{}`` where the subject goes. ``target_new`` is normalised to
start with a space (a target is a continuation: "Paris" → " Paris") [REF].
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator, model_validator


class EditRequest(BaseModel):
    """One fact to write: ``prompt.format(subject)`` should continue with ``target_new``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    case_id: str
    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None

    @field_validator("case_id", mode="before")
    @classmethod
    def _case_id_str(cls, v: Any) -> str:
        if v is None or (isinstance(v, str) and not v.strip()):
            raise ValueError("case_id must not be empty")
        return str(v)

    @field_validator("subject")
    @classmethod
    def _subject(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("subject must not be empty")
        return v

    @field_validator("target_new", "target_true")
    @classmethod
    def _target(cls, v: str | None) -> str | None:
        if v is None:
            return None
        if not v.strip():
            raise ValueError("target must not be empty")
        return v if v.startswith(" ") else " " + v

    @model_validator(mode="after")
    def _prompt_has_one_slot(self) -> EditRequest:
        n = self.prompt.count("{}")
        if n != 1:
            raise ValueError(f"prompt must contain exactly one '{{}}' for the subject, found {n}: {self.prompt!r}")
        if self.prompt.replace("{}", "").count("{") or self.prompt.replace("{}", "").count("}"):
            raise ValueError(f"prompt has a stray brace besides the '{{}}' slot: {self.prompt!r}")
        return self

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.replace("{}", self.subject)

    @classmethod
    def from_full_prompt(cls, case_id: str, full_prompt: str, subject: str, target_new: str,
                         target_true: str | None = None) -> EditRequest:
        """Build from a prompt that contains the subject verbatim; the subject must occur exactly once."""
        n = full_prompt.count(subject)
        if n != 1:
            raise ValueError(f"subject {subject!r} occurs {n} times in prompt {full_prompt!r} (need exactly 1)")
        return cls(case_id=case_id, prompt=full_prompt.replace(subject, "{}"), subject=subject,
                   target_new=target_new, target_true=target_true)
