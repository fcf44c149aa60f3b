"""Reading YAML that users (or anyone who can write a spec) provide: one-line error messages, and a bound on
what YAML aliases can expand to.

``yaml.safe_load`` already refuses ``!!python/...`` tags; what it leaves to callers is PyYAML's multi-line
error text (a source snippet with a caret) and alias bombs: ``&a [1, 1]``, ``&b [*a, *a]``, ... load as a
few shared objects but expand to billions of values for anything that walks, dumps or validates them.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import yaml

_END = object()
MAX_PROBLEM_CHARS = 200  # a tag or token quoted by PyYAML can be arbitrarily long
MAX_VALUES = 10_000  # a spec or hparams file holds a few hundred values; aliases can make billions


def yaml_error_line(exc: yaml.YAMLError) -> str:
    """PyYAML's error as one line: the problem (with its context) and where it is (1-based line/column)."""
    if isinstance(exc, yaml.MarkedYAMLError):
        parts = [p for p in (exc.context, exc.problem) if p]
        text = ": ".join(parts) or type(exc).__name__
        mark = exc.problem_mark or exc.context_mark
    else:
        text, mark = str(exc) or type(exc).__name__, None
    text = " ".join(text.split())  # PyYAML quotes scanned text, which may hold newlines
    if len(text) > MAX_PROBLEM_CHARS:
        text = text[: MAX_PROBLEM_CHARS - 1] + "…"
    return f"{text} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else text


def expanded_size(data: Any, limit: int) -> int:
    """Values in loaded YAML data with every alias expanded (each mapping key, value and list item counts),
    counted only up to ``limit + 1``: the walk stops there, so a bomb (or a recursive alias) costs nothing."""
    n = 0
    stack: list[Iterator[Any]] = [iter([data])]  # iterators, so a long list is not copied onto the stack
    while stack and n <= limit:
        x = next(stack[-1], _END)
        if x is _END:
            stack.pop()
            continue
        n += 1
        if isinstance(x, dict):
            stack.append(itertools.chain.from_iterable(x.items()))
        elif isinstance(x, list | tuple | set):
            stack.append(iter(x))
    return n


__all__ = ["MAX_VALUES", "expanded_size", "yaml_error_line"]
