"""Duck-typed access to dataset records (CounterFactRecord / ZsreRecord of rayedit.data.schema).

The evaluator only needs a few attributes, so it accepts any object that has them (records built by the
loaders, test doubles, records of a future dataset with the same fields).
"""

from __future__ import annotations

from typing import Any


class RecordError(ValueError):
    """A record that lacks what a suite needs; the message names the record and the missing field."""


def as_continuation(text: str) -> str:
    """Targets are continuations: exactly one leading space is ensured, never doubled (methods.md §2.1)."""
    return text if text.startswith(" ") else " " + text


def case_id_of(record: Any) -> str:
    cid = getattr(record, "case_id", None)
    if cid is None:
        req = getattr(record, "request", None)
        cid = getattr(req, "case_id", None)
    if cid is None:
        raise RecordError(f"record of type {type(record).__name__} has no case_id")
    return str(cid)


def request_of(record: Any) -> Any:
    """The EditRequest of a record (a bare EditRequest is accepted as its own record)."""
    req = getattr(record, "request", None)
    if req is None and hasattr(record, "target_new") and hasattr(record, "prompt"):
        req = record
    if req is None:
        raise RecordError(f"record {case_id_of(record)!r} has no edit request")
    return req


def prompt_text(request: Any) -> str:
    text = getattr(request, "text", None)
    if text is None:
        text = request.prompt.replace("{}", request.subject)
    return str(text)


def str_list(record: Any, name: str) -> list[str]:
    value = getattr(record, name, None)
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def require(record: Any, name: str, suite: str) -> Any:
    value = getattr(record, name, None)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise RecordError(f"record {case_id_of(record)!r} has no {name!r}, which the {suite} suite needs "
                          f"(is it a {suite} record?)")
    return value
