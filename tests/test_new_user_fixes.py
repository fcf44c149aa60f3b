"""Fixes for first-time users (issue 16): JSON statistics corpora, fluency shown in bits, and no noise from the
tokenizer's length warning or transformers' ``past_key_values`` deprecation on every run."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from rayedit.editing.covariance import CovarianceStats, LocalBlobCache, StatsError, StatsSettings, resolve_corpus
from rayedit.models import build_tiny_model
from rayedit.models.tiny import builtin_texts

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


def test_auto_corpus_falls_back_when_the_hub_cannot_be_reached(monkeypatch, caplog) -> None:
    """A machine without network and without HF_HUB_OFFLINE: ``auto`` (the default of ``rayedit edit``) uses the
    builtin corpus at once instead of failing after the datasets library's retries."""
    import socket

    with socket.socket() as sock:  # a loopback port with nothing listening: the connection is refused at once
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with caplog.at_level("WARNING"):
        corpus = resolve_corpus("auto")
    assert corpus.id == "builtin:general" and "hub unreachable" in caplog.text
    with socket.socket() as server:  # a reachable endpoint keeps wikitext-103 (nothing is downloaded here)
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert resolve_corpus("auto").id == "hf:wikitext:wikitext-103-raw-v1"


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


def test_validate_reads_a_local_json_corpus(tmp_path: Path) -> None:
    """`rayedit validate` reports a malformed JSON statistics corpus (file and element), before any replica loads."""
    import yaml
    from test_runtime import _spec_dict, _write_requests
    from typer.testing import CliRunner

    from rayedit.cli import app

    data = _write_requests(tmp_path / "r.jsonl")
    bad = _write(tmp_path / "corpus.json", json.dumps([{"text": "a"}, {"body": "b"}]))
    good = _write(tmp_path / "good.json", json.dumps(DOCS))
    for corpus, ok in ((bad, False), (good, True), (tmp_path / "missing.jsonl", False)):
        spec = tmp_path / "spec.yaml"
        spec.write_text(yaml.safe_dump(_spec_dict(data, stats_corpus=str(corpus))))
        res = CliRunner().invoke(app, ["validate", str(spec)])
        assert (res.exit_code == 0) == ok, res.output
        if corpus == bad:
            assert f"stats_corpus: {bad}: element 1: object has no \"text\" field" in res.output, res.output


# --- 2. fluency in bits -----------------------------------------------------------------------------
def _generation_rows(cid: str, sid: str, step: int, fluency: list[float]) -> list[dict]:
    return [{"campaign": cid, "stream": sid, "model": "tiny:llama", "method": "memit", "dataset": "facts",
             "seed": 0, "step": step, "suite": "generation", "protocol": "generation/v1", "case_id": f"r{i}",
             "record_index": i, "chat_template": False, "word_tokenizer": "regex", "fluency": f,
             "consistency": 0.25} for i, f in enumerate(fluency)]


def test_summarize_keeps_fluency_in_bits_and_rates_in_percent() -> None:
    from rayedit.evaluate import summarize, summary_rows

    rows = _generation_rows("c", "s", 0, [5.5, 5.62])
    m = summarize(rows)["generation/v1"]["metrics"]
    assert m["fluency"]["mean"] == pytest.approx(5.56)  # bits, as methods.md defines it (not 556)
    assert m["consistency"]["mean"] == pytest.approx(25.0)  # a cosine: ×100 as the papers print it
    tidy = {r["metric"]: r["mean"] for r in summary_rows(rows)}
    assert tidy["fluency"] == pytest.approx(5.56) and tidy["consistency"] == pytest.approx(25.0)


def test_report_tables_show_fluency_in_bits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml
    from test_report import _edit_rows, _spec_yaml

    from rayedit.cli.report_cmd import print_report_summary
    from rayedit.report import make_report
    from rayedit.report.load import expected_streams
    from rayedit.store import commit_eval_part, commit_step, open_store
    from rayedit.store.formats import encode_parquet
    from rayedit.store.layout import EDITS, spec_key

    store = open_store(str(tmp_path / "store"))
    store.put_bytes(spec_key("flu"), _spec_yaml("flu", 4, 4).encode())
    rng = np.random.default_rng(0)
    fluency = [5.5, 5.62, 5.58, 5.54]  # mean 5.56 bits
    for s in expected_streams(yaml.safe_load(store.get_bytes(spec_key("flu")).decode())):
        rows = _edit_rows("flu", s.sid, s.method, 0, 4, rng)
        assert commit_step(store, "flu", s.sid, 0, {EDITS: encode_parquet(pa.Table.from_pylist(rows)),
                                                    "delta.safetensors": b"-"})
        gen = [{**r, "method": s.method} for r in _generation_rows("flu", s.sid, 0, fluency)]
        assert commit_eval_part(store, "flu", s.sid, 0, "generation", 0, pa.Table.from_pylist(gen))
    rep, _where = make_report(store, ["flu"])

    ev = next(t for t in rep.tables if t.name == "flu--facts--eval")
    assert "Flu. (bits)" in ev.headers and "Consis." in ev.headers
    col = ev.headers.index("Flu. (bits)")
    assert all(r[col].mean == pytest.approx(5.56) for r in ev.rows)
    assert all(r[ev.headers.index("Consis.")].mean == pytest.approx(25.0) for r in ev.rows)
    md = ev.to_markdown()
    assert "Flu. (bits)" in md and "5.56" in md and "556" not in md and "Flu. in bits" in md
    head, *body = list(csv.reader(io.StringIO(ev.to_csv())))
    assert all(float(r[head.index("Flu. (bits) mean")]) == pytest.approx(5.56) for r in body)
    tables = tmp_path / "store/campaigns/flu/report/tables"
    assert "| 5.56 ±" in (tables / "flu--facts--eval.md").read_text()
    long = list(csv.DictReader(io.StringIO((tables / "flu--eval-metrics.csv").read_text())))
    flu = [r for r in long if r["metric"] == "fluency"]
    assert flu and all(float(r["scale"]) == 1.0 and float(r["mean"]) == pytest.approx(5.56) for r in flu)

    from rayedit.report.build import _best

    assert col not in _best(ev) and ev.headers.index("Consis.") in _best(ev)  # fluency is not bolded as "best"

    print_report_summary(rep)  # what `rayedit run` prints at the end
    out = capsys.readouterr().out
    assert "Flu. (bits)" in out and "5.56" in out and "556" not in out


# --- 3. no tokenizer-length / past_key_values noise ---------------------------------------------------
class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def transformers_log() -> Iterator[_Records]:
    """transformers' own logger at its default (warning) verbosity (the tests run it at error), recorded."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    handler = _Records()
    root = logging.getLogger("transformers")
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        hf_logging.set_verbosity(before)


LENGTH_WARNING = "Token indices sequence length is longer than the specified maximum sequence length"


def test_statistics_run_does_not_print_the_token_length_warning(tmp_path: Path, transformers_log: _Records) -> None:
    lm = build_tiny_model("gpt2", n_layers=2)
    lm.tokenizer.model_max_length = lm.adapter.max_positions  # as a real checkpoint's tokenizer says (256 here)
    long_doc = " ".join(builtin_texts(limit=40))  # longer than 256 tokens: cut to max_len by the statistics code
    assert len(lm.tokenizer(long_doc, verbose=False)["input_ids"]) > 2 * lm.adapter.max_positions
    corpus = _write(tmp_path / "long.jsonl", json.dumps({"text": long_doc}) + "\n" + json.dumps({"text": "hi"}))
    stats = CovarianceStats(lm, str(corpus), StatsSettings(n_samples=10, batch_tokens=1024),
                            cache=LocalBlobCache(tmp_path / "cache"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sm = stats.second_moments([1])[1]
    assert sm.count == lm.adapter.max_positions + len(lm.tokenizer("hi")["input_ids"])  # the long one was cut
    assert not [m for m in transformers_log.messages if "Token indices sequence length" in m]
    assert not [w for w in caught if "Token indices sequence length" in str(w.message)]

    # narrow: the tokenizer's warning itself is not muted (a direct call still reports a too long sequence)
    lm.tokenizer(long_doc)
    assert any(LENGTH_WARNING in m for m in transformers_log.messages)


def test_decoding_passes_no_deprecated_past_key_values(transformers_log: _Records) -> None:
    from rayedit.evaluate.audit.sampling import decode_batch
    from rayedit.evaluate.generation import sample_top_k
    from rayedit.evaluate.scoring import PromptEncoder

    for family in ("gpt2", "llama"):
        lm = build_tiny_model(family, n_layers=2)
        enc = PromptEncoder(lm.tokenizer)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            samples = sample_top_k(lm.model, enc, ["The capital of France is", "A cat"], max_length=12,
                                   generator=torch.Generator().manual_seed(0))
            decoded = decode_batch(lm.model, lm.tokenizer, [lm.tokenizer("The river")["input_ids"]],
                                   max_new_tokens=4, stop_at_eos=False)
        assert all(len(s.token_ids) == 12 for s in samples) and len(decoded[0].ids) == 4
        noise = [str(w.message) for w in caught if "past_key_values" in str(w.message)]
        noise += [m for m in transformers_log.messages if "past_key_values" in m]
        assert not noise, (family, noise)

        # the cache really is used: one step with it equals the full forward's last position
        from rayedit.evaluate.scoring import kv_cache_kwarg, output_kv_cache

        ids = torch.tensor([lm.tokenizer("The river runs to the sea")["input_ids"]])
        kw = kv_cache_kwarg(lm.model)
        with torch.no_grad():
            full = lm.model(input_ids=ids, use_cache=False).logits[0, -1]
            first = lm.model(input_ids=ids[:, :-1], use_cache=True, **{kw: None})
            step = lm.model(input_ids=ids[:, -1:], use_cache=True, **{kw: output_kv_cache(first)}).logits[0, -1]
        assert torch.allclose(full, step, atol=1e-5)

        # narrow: nothing filters transformers' deprecations globally (the legacy name still warns where renamed)
        if kw == "cache":
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                lm.model(input_ids=ids, past_key_values=None, use_cache=True)
            assert any("past_key_values" in str(w.message) for w in caught)
        assert not math.isnan(float(full[0]))
