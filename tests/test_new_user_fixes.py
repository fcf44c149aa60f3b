"""Fixes for first-time users (issue 16): JSON statistics corpora."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rayedit.editing.covariance import CovarianceStats, LocalBlobCache, StatsError, StatsSettings, resolve_corpus
from rayedit.models import build_tiny_model

DOCS = ["The river runs north to the sea.", "Paris is the capital of France.", "A cat sat on the mat."]


# --- 1. JSON statistics corpora --------------------------------------------------------------------
def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_json_array_corpus_is_read_like_jsonl_with_a_content_hash(tmp_path: Path) -> None:
    jsonl = _write(tmp_path / "docs.jsonl", "".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    strings = _write(tmp_path / "strings.json", json.dumps(DOCS, indent=2))  # pretty-printed: many lines
    objects = _write(tmp_path / "objects.json", json.dumps([{"text": d, "id": i} for i, d in enumerate(DOCS)]))
    lines_in_json = _write(tmp_path / "lines.json", jsonl.read_text())  # JSON lines under a .json name
    mixed = _write(tmp_path / "mixed.json", json.dumps([DOCS[0], {"text": DOCS[1]}, {"text": "  "}, DOCS[2]]))
    for path in (jsonl, strings, objects, lines_in_json, mixed):
        assert list(resolve_corpus(str(path)).load()) == DOCS, path.name

    # the identity stays content-based: same bytes → same revision wherever the file is; other bytes → other
    copy = tmp_path / "sub"
    copy.mkdir()
    same = _write(copy / "strings.json", strings.read_text())
    assert resolve_corpus(str(same)).revision == resolve_corpus(str(strings)).revision
    assert resolve_corpus(str(same)).identity == resolve_corpus(str(strings)).identity
    _write(same, json.dumps([*DOCS, "one more document"]))
    assert resolve_corpus(str(same)).revision != resolve_corpus(str(strings)).revision

    # a statistics run over the JSON array equals the one over the JSONL file (same documents, same order)
    lm = build_tiny_model("gpt2", n_layers=2)
    settings = StatsSettings(n_samples=10, batch_tokens=512)
    a = CovarianceStats(lm, str(strings), settings, cache=LocalBlobCache(tmp_path / "c1")).second_moments([1])[1]
    b = CovarianceStats(lm, str(jsonl), settings, cache=LocalBlobCache(tmp_path / "c2")).second_moments([1])[1]
    assert a.count == b.count > 0 and torch.equal(a.sum, b.sum)
    assert a.provenance["corpus_revision"].startswith("sha256:")


@pytest.mark.parametrize(("name", "text", "expect"), [
    ("number.json", "42", ["top-level JSON value is a number (42)", "expected a JSON array"]),
    ("object.json", '{"text": "one document"}', ["top-level JSON value is an object", "expected a JSON array"]),
    ("no-text.json", json.dumps([{"text": "a"}, {"body": "b"}]),
     ['element 1: object has no "text" field', "'body'"]),
    ("bad-text.json", json.dumps([{"text": "a"}, {"text": "b"}, {"text": 5}]),
     ['element 2: "text" is a number (5), expected a string']),
    ("bad-element.json", json.dumps(["a", ["b"]]), ["element 1: got an array", "expected a JSON array of strings"]),
    ("invalid.json", '[\n  {"text": "a"},\n  {"text": "b"\n', ["invalid JSON at line 4", "expected a JSON array"]),
    ("invalid.jsonl", '{"text": "a"}\n{"text": oops}\n', ["line 2: invalid JSON at column", "JSON lines"]),
    ("no-text.jsonl", '{"text": "a"}\n\n{"txt": "b"}\n', ['line 3 (record 1): object has no "text" field']),
])
def test_bad_json_corpus_is_one_clear_error(tmp_path: Path, name: str, text: str, expect: list[str]) -> None:
    path = _write(tmp_path / name, text)
    corpus = resolve_corpus(str(path))
    with pytest.raises(StatsError) as ei:
        corpus.load()
    msg = str(ei.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg
    for part in expect:
        assert part in msg, msg
    assert ei.value.__cause__ is None  # no chained JSONDecodeError traceback for the user to wade through
