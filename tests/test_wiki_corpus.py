"""``stats_corpus: enwiki-sample``: real English Wikipedia articles from the gensim wheel, as plain text, with
their identity in the statistics' provenance; a missing package is one line before any work."""

from __future__ import annotations

import hashlib
import importlib.util

import pytest
import torch

from rayedit.data import wiki
from rayedit.editing.covariance import CovarianceStats, LocalBlobCache, StatsError, StatsSettings, resolve_corpus
from rayedit.models import build_tiny_model

if importlib.util.find_spec("gensim") is None:  # pragma: no cover - the setup script installs it
    pytest.skip("gensim is not installed (bash scripts/setup.sh installs it with --no-deps)", allow_module_level=True)


def test_documents_are_plain_english_paragraphs() -> None:
    sample = wiki.locate()
    assert sample.sha256 == hashlib.sha256(sample.path.read_bytes()).hexdigest()
    docs = wiki.documents(sample.path)
    assert len(docs) > 1000 and sum(map(len, docs)) > 2_000_000
    assert docs == wiki.documents(sample.path)  # deterministic order
    # markup is gone: links, templates and tags are reduced to their text (a few literal braces may remain)
    for marker in ("[[", "{{", "<ref", "'''"):
        assert sum(marker in d for d in docs) < len(docs) // 100, marker
    assert any("Anarchism is a political philosophy" in d for d in docs)
    # paragraph packing: only a single overlong paragraph exceeds the budget
    assert all(len(d) <= wiki.DOC_CHARS or "\n" not in d for d in docs)


def test_paragraph_packing_keeps_whole_paragraphs() -> None:
    paras = [("x" * 50) + str(i) for i in range(10)]
    docs = wiki.paragraph_documents("\n".join(["== Heading =="] + paras), max_chars=120)
    assert "\n".join(docs).split("\n") == paras  # nothing lost, heading dropped, order kept
    assert all(len(d) <= 120 for d in docs) and len(docs) == 5


def test_statistics_record_the_sample_and_respect_the_token_budget(tmp_path) -> None:
    lm = build_tiny_model("llama")
    stats = CovarianceStats(lm, "enwiki-sample", StatsSettings(n_samples=50, max_tokens=3_000, max_len=128),
                            cache=LocalBlobCache(tmp_path))
    sm = stats.second_moments([1])[1]
    prov = sm.provenance
    assert prov["corpus"].startswith("enwiki-sample:gensim-") and prov["corpus"].endswith("-shortened.bz2")
    assert prov["corpus_revision"] == "sha256:" + wiki.locate().sha256[:16]
    assert 0 < sm.count <= 3_000 + 128  # stops at the budget (the last document may finish its batch)
    assert torch.isfinite(sm.covariance).all()


def test_missing_package_is_one_line(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gensim" else real(name, *a))
    with pytest.raises(StatsError, match=r"pip install --no-deps gensim==") as exc:
        resolve_corpus("enwiki-sample")
    assert "\n" not in str(exc.value)
    from rayedit.runtime.spec import CampaignSpec

    with pytest.raises(ValueError, match="enwiki-sample"):
        CampaignSpec.model_validate({"name": "c", "models": [{"name": "tiny:llama"}], "methods": [{"name": "memit"}],
                                     "datasets": [{"kind": "counterfact", "path": "x.json"}],
                                     "edits_per_stream": 1, "stats_corpus": "enwiki-sample"})
