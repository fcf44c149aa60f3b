"""CounterFact generation tests, protocol ``generation/v1`` (methods.md §5.2).

- Sampling: top-k 5 until 100 tokens in total (prompt included), one sample per generation prompt, the
  prompts of several records in one left-padded batch with a KV cache. Each record draws from its own
  ``torch.Generator`` seeded from (seed, case_id), so a record's text does not depend on which shard or
  batch evaluated it.
- Fluency: mean over the record's generations of ⅓·H₂ + ⅔·H₃ (n-gram entropies in bits) over words
  from NLTK ``word_tokenize`` when NLTK and its punkt data are available, otherwise a regex word
  tokenizer [OURS]; the choice is recorded in every row (``word_tokenizer``).
- Consistency: cosine of TF-IDF vectors (fixed vocabulary and IDF, sklearn's default analyzer and
  l2 norm, reimplemented in numpy) between the joined generations and the joined attribute snippets
  for (relation, new object); only when snippets, IDF and vocabulary are provided, else NaN.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..editing.tokens import chunks_by_total
from .protocols import GENERATION
from .records import case_id_of, request_of, str_list
from .scoring import PromptEncoder, kv_cache_kwarg, model_device, model_max_positions, output_kv_cache

NAN = float("nan")
_REGEX_WORDS = re.compile(r"\w+(?:[-']\w+)*|[^\w\s]")
_SKLEARN_TOKEN = re.compile(r"(?u)\b\w\w+\b")  # sklearn TfidfVectorizer's default token_pattern


# -- words and n-gram entropy ---------------------------------------------------------------------
def regex_word_tokenize(text: str) -> list[str]:
    return _REGEX_WORDS.findall(text)


def get_word_tokenizer(prefer: str = "auto") -> tuple[Callable[[str], list[str]], str]:
    """``(tokenize, name)``: NLTK's ``word_tokenize`` if usable offline, else the regex fallback."""
    if prefer not in ("auto", "nltk", "regex"):
        raise ValueError(f"word tokenizer must be auto|nltk|regex, got {prefer!r}")
    if prefer != "regex":
        try:
            from nltk import word_tokenize  # type: ignore[import-not-found]

            word_tokenize("A test, to see that punkt data is present.")
            return word_tokenize, "nltk"
        except (ImportError, LookupError) as exc:
            if prefer == "nltk":
                raise RuntimeError(f"NLTK word_tokenize is unavailable: {exc}") from exc
    return regex_word_tokenize, "regex"


def ngram_entropy(words: Sequence[str], n: int) -> float:
    """Entropy (bits) of the relative frequencies of the text's n-grams; 0 when it has none."""
    grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    total = sum(grams.values())
    if total == 0:
        return 0.0
    return -sum((c / total) * math.log2(c / total) for c in grams.values())


def text_fluency(text: str, tokenize: Callable[[str], list[str]] = regex_word_tokenize) -> float:
    """⅓·H₂ + ⅔·H₃ = ½·(⅔·H₂ + 4⁄3·H₃) (the paper's printed formula has a sign typo)."""
    words = tokenize(text)
    return (2 / 3 * ngram_entropy(words, 2) + 4 / 3 * ngram_entropy(words, 3)) / 2


# -- TF-IDF consistency ---------------------------------------------------------------------------
class TfidfModel:
    """A fixed-vocabulary TF-IDF vectorizer (lower-cased, sklearn default token pattern, l2 norm)."""

    def __init__(self, vocab: dict[str, int], idf: np.ndarray) -> None:
        if idf.ndim != 1 or len(idf) < len(vocab) or (vocab and max(vocab.values()) >= len(idf)):
            raise ValueError(f"IDF vector of shape {idf.shape} does not match a vocabulary of "
                             f"{len(vocab)} words")
        self.vocab = vocab
        self.idf = idf.astype(np.float64)

    @classmethod
    def load(cls, idf_path: str | Path, vocab_path: str | Path) -> TfidfModel:
        idf = np.load(idf_path, allow_pickle=False)
        vocab = json.loads(Path(vocab_path).read_text())
        return cls({str(k): int(v) for k, v in vocab.items()}, idf)

    def vector(self, text: str) -> np.ndarray:
        v = np.zeros(len(self.idf))
        for tok in _SKLEARN_TOKEN.findall(text.lower()):
            j = self.vocab.get(tok)
            if j is not None:
                v[j] += 1.0
        v *= self.idf
        norm = np.linalg.norm(v)
        return v / norm if norm > 0 else v

    def similarity(self, a: str, b: str) -> float:
        return float(self.vector(a) @ self.vector(b))


class AttributeSnippets:
    """Texts about subjects having (relation, object): ``texts[relation_id][object_key] -> [(name, text)]``.

    Accepted files: the CounterFact release format (a list of ``{relation_id, target_id, samples:
    [{name, text}]}``) or a mapping ``{relation_id: {object_key: [text | {name, text}]}}``. Objects are
    looked up by the record's target id when it has one (``target_new_id``), else by the target string.
    """

    def __init__(self, texts: dict[str, dict[str, list[tuple[str | None, str]]]]) -> None:
        self.texts = texts

    @classmethod
    def from_obj(cls, data: Any) -> AttributeSnippets:
        texts: dict[str, dict[str, list[tuple[str | None, str]]]] = {}

        def add(rid: str, key: str, sample: Any) -> None:
            if isinstance(sample, dict):
                name, text = sample.get("name"), sample["text"]
            else:
                name, text = None, str(sample)
            texts.setdefault(str(rid), {}).setdefault(str(key).strip(), []).append((name, text))

        if isinstance(data, list):
            for el in data:
                for s in el.get("samples", []):
                    add(el["relation_id"], el["target_id"], s)
        elif isinstance(data, dict):
            for rid, by_obj in data.items():
                for key, samples in by_obj.items():
                    for s in samples:
                        add(rid, key, s)
        else:
            raise ValueError("attribute snippets must be a JSON list or object")
        return cls(texts)

    @classmethod
    def load(cls, path: str | Path) -> AttributeSnippets:
        return cls.from_obj(json.loads(Path(path).read_text()))

    def lookup(self, relation_id: str | None, keys: Sequence[str | None], exclude_name: str | None = None,
               ) -> list[str] | None:
        by_obj = self.texts.get(str(relation_id)) if relation_id is not None else None
        if not by_obj:
            return None
        for key in keys:
            if key is not None and key.strip() in by_obj:
                return [t for name, t in by_obj[key.strip()] if exclude_name is None or name != exclude_name]
        return None


# -- sampling -------------------------------------------------------------------------------------
def record_seed(seed: int, case_id: str) -> int:
    """A per-record seed: results do not depend on shard boundaries or batch composition."""
    digest = hashlib.blake2b(f"{seed}:{case_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass
class Sample:
    text: str  # decoded prompt + continuation, "\n\n" → " ", NFKD-normalised
    token_ids: list[int]  # prompt ids (with BOS / chat template) + sampled ids


@torch.no_grad()
def sample_top_k(model: torch.nn.Module, encoder: PromptEncoder, prompts: Sequence[str], *,
                 max_length: int = 100, top_k: int = 5,
                 generator: torch.Generator | Sequence[torch.Generator | None] | None = None,
                 ) -> list[Sample]:
    """One top-k sample per prompt, until ``max_length`` tokens in total (prompt included).

    ``generator`` is one generator for all prompts, or one per prompt: consecutive prompts that share a
    generator object draw together, in one call per step, exactly as if they were sampled alone — so
    batching several records' prompts does not change any record's text.
    """
    tok = encoder.tokenizer
    if not prompts:
        return []
    per_prompt = list(generator) if isinstance(generator, Sequence) else [generator] * len(prompts)
    if len(per_prompt) != len(prompts):
        raise ValueError(f"{len(per_prompt)} generators for {len(prompts)} prompts")
    runs: list[tuple[int, int, torch.Generator | None]] = []  # [start, stop) rows drawing from one generator
    for i, g in enumerate(per_prompt):
        if runs and runs[-1][2] is g:
            runs[-1] = (runs[-1][0], i + 1, g)
        else:
            runs.append((i, i + 1, g))
    limit = model_max_positions(model)
    if limit is not None:
        max_length = min(max_length, limit)
    dev = model_device(model)
    ids = encoder.encode_prefixes(list(prompts))
    lens = [len(x) for x in ids]
    budgets = [max(0, max_length - n) for n in lens]
    steps = max(budgets)
    width = max(lens)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    input_ids = torch.tensor([[pad] * (width - n) + x for x, n in zip(ids, lens, strict=True)], device=dev)
    mask = torch.tensor([[0] * (width - n) + [1] * n for n in lens], device=dev)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    new_tokens: list[torch.Tensor] = []
    past = None
    cache_kw = kv_cache_kwarg(model)
    step_ids, step_pos = input_ids, pos
    for _ in range(steps):
        out = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, use_cache=True,
                    **{cache_kw: past})
        past = output_kv_cache(out)
        logits = out.logits[:, -1, :].float()
        top_vals, top_idx = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
        probs = torch.softmax(top_vals, dim=-1)
        choice = torch.cat([torch.multinomial(probs[a:b], 1, generator=g) for a, b, g in runs])
        nxt = top_idx.gather(1, choice)
        new_tokens.append(nxt)
        step_ids = nxt
        step_pos = step_pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
    gen = torch.cat(new_tokens, dim=1).tolist() if new_tokens else [[] for _ in prompts]
    samples = []
    for x, g, b in zip(ids, gen, budgets, strict=True):
        full = x + g[:b]
        text = tok.decode(full, skip_special_tokens=True)
        samples.append(Sample(unicodedata.normalize("NFKD", text.replace("\n\n", " ")), full))
    return samples


@dataclass
class GenerationSettings:
    """Everything that determines generation-test numbers (recorded in the rows)."""

    seed: int = 0
    top_k: int = 5
    max_length: int = 100
    interval: int = 1  # generation_test_interval: test records whose global index is a multiple of this
    word_tokenizer: str = "auto"
    snippets: AttributeSnippets | None = None
    tfidf: TfidfModel | None = None


def generation_rows(model: torch.nn.Module, encoder: PromptEncoder, records: Sequence[tuple[int, Any]],
                    settings: GenerationSettings, keep_raw: bool = True, batch_prompts: int = 32,
                    ) -> list[dict[str, Any]]:
    """One row per tested record; ``batch_prompts`` bounds the prompts sampled together (speed and memory
    only: each record draws from its own generator)."""
    if settings.interval < 1:
        raise ValueError("generation_test_interval must be >= 1")
    if batch_prompts < 1:
        raise ValueError("generation batch_prompts must be >= 1")
    tokenize, tokenizer_name = get_word_tokenizer(settings.word_tokenizer)
    dev = model_device(model)
    tested = [(index, rec, str_list(rec, "generation_prompts")) for index, rec in records
              if not index % settings.interval]
    # several records per forward pass: on a small model the per-token cost is mostly per-call overhead
    samples_of: list[list[Sample]] = []
    for chunk in chunks_by_total([len(prompts) for _, _, prompts in tested], batch_prompts):
        prompts = [p for i in chunk for p in tested[i][2]]
        gens = []
        for i in chunk:
            gen = torch.Generator(device=dev)
            gen.manual_seed(record_seed(settings.seed, case_id_of(tested[i][1])))
            gens += [gen] * len(tested[i][2])
        out = sample_top_k(model, encoder, prompts, max_length=settings.max_length, top_k=settings.top_k,
                           generator=gens)
        for i in chunk:
            samples_of.append(out[:len(tested[i][2])])
            out = out[len(tested[i][2]):]
    rows: list[dict[str, Any]] = []
    for (index, rec, _), samples in zip(tested, samples_of, strict=True):
        cid = case_id_of(rec)
        texts = [s.text for s in samples]
        flu = [text_fluency(t, tokenize) for t in texts]
        consistency = NAN
        if settings.snippets is not None and settings.tfidf is not None and texts:
            req = request_of(rec)
            keys = [getattr(rec, "target_new_id", None), getattr(req, "target_new_id", None), req.target_new]
            refs = settings.snippets.lookup(getattr(rec, "relation_id", None), keys, exclude_name=req.subject)
            if refs:
                consistency = settings.tfidf.similarity(" ".join(texts), " ".join(refs))
        row: dict[str, Any] = {
            "protocol": GENERATION.id, "record_index": index, "case_id": cid,
            "chat_template": encoder.chat_template,
            "fluency": sum(flu) / len(flu) if flu else NAN, "consistency": consistency,
            "word_tokenizer": tokenizer_name, "generation_seed": settings.seed, "top_k": settings.top_k,
            "max_length": settings.max_length,
        }
        if keep_raw:
            row["generations"] = texts
            row["generation_fluency"] = flu
            row["generation_n_tokens"] = [len(s.token_ids) for s in samples]
        rows.append(row)
    return rows
