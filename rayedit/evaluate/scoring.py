"""Batched teacher-forced scoring of candidate continuations (the core of every probability metric).

For each ``(prefix_text, continuation_text)`` pair the input is built **at the id level**
(methods.md §5.2 [OURS]): ``ids(prefix)`` with the tokenizer's special tokens (a BOS if it adds one)
followed by ``ids_no_special(continuation)``. Continuations already start with a space in our types and
are never re-spaced here. For SentencePiece-style tokenizers, where ``" Paris"`` alone tokenizes with a
lone ``"▁"`` piece, the suffix rule of §2.1 is used: ``ids(prefix + cont) − ids(prefix)``.

Pairs are sorted by length and packed into batches under a padded-token budget; each batch is ONE
forward pass with an explicit attention mask and explicit position ids (so right and left padding give
the same numbers), and every continuation token is scored from that single forward.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..editing.tokens import chunks_by_tokens

PaddingSide = Literal["right", "left"]
ContinuationRule = Literal["auto", "direct", "suffix"]


class ScoringError(ValueError):
    """An input that cannot be scored (empty continuation, sequence longer than the model allows, ...)."""


@dataclass
class ContinuationScore:
    """Teacher-forced scores of one continuation after one prefix."""

    n_prefix: int  # number of prefix ids (including BOS / chat-template tokens)
    target_ids: list[int]
    logprobs: list[float]  # log P(t_j | prefix, t_<j), natural log
    argmax_ids: list[int]  # model argmax at each continuation position

    @property
    def correct(self) -> list[bool]:
        return [a == t for a, t in zip(self.argmax_ids, self.target_ids, strict=True)]

    @property
    def mean_nll(self) -> float:
        return -sum(self.logprobs) / len(self.logprobs)

    @property
    def all_correct(self) -> bool:
        return all(a == t for a, t in zip(self.argmax_ids, self.target_ids, strict=True))

    @property
    def accuracy(self) -> float:
        hits = sum(a == t for a, t in zip(self.argmax_ids, self.target_ids, strict=True))
        return hits / len(self.target_ids)


@dataclass
class Batch:
    """Tensors of one padded batch plus where its continuations are (used by the scorer and benchmarks)."""

    indices: list[int]  # positions of the batch rows in the encoded input list
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    keep: torch.Tensor  # bool (B, L): positions whose next-token distribution scores a continuation token
    targets: torch.Tensor  # flat continuation ids in row-major order of ``keep``
    cont_lens: list[int]
    prefix_lens: list[int]

    @property
    def n_padded_tokens(self) -> int:
        return int(self.input_ids.numel())


@dataclass
class ScorerStats:
    forwards: int = 0
    padded_tokens: int = 0
    real_tokens: int = 0
    suffix_rule_used: int = 0
    suffix_rule_fallbacks: int = 0  # prefix ids did not match: direct ids were used instead
    extra: dict[str, Any] = field(default_factory=dict)


def model_max_positions(model: torch.nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def kv_cache_kwarg(model: torch.nn.Module) -> str:
    """The forward keyword of the KV cache: ``cache`` in recent transformers (where ``past_key_values`` is a
    deprecated alias that emits a FutureWarning), ``past_key_values`` before."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def output_kv_cache(out: Any) -> Any:
    """The KV cache of a model output, read under the output's own field name (``out.past_key_values`` is a
    deprecated alias that logs a warning where the field is called ``cache``)."""
    fields = getattr(out, "__dataclass_fields__", {})
    if "cache" in fields:
        return out.cache
    return out.past_key_values


def model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def plan_batches(lengths: Sequence[int], token_budget: int, max_batch_size: int | None = None,
                 sort_by_length: bool = True) -> list[list[int]]:
    """Group indices into batches whose padded size (rows × longest row) stays within ``token_budget``.

    Sorting by length (longest first) keeps padding small; a single sequence longer than the budget
    still gets its own batch.
    """
    order = list(range(len(lengths)))
    if sort_by_length:
        order.sort(key=lambda i: -lengths[i])
    chunks = chunks_by_tokens([lengths[i] for i in order], token_budget, max_batch_size)
    return [[order[j] for j in chunk] for chunk in chunks]


class PromptEncoder:
    """Turns prefix/continuation texts into ids, with caching and the optional chat template."""

    def __init__(self, tokenizer: Any, chat_template: bool = False,
                 continuation_rule: ContinuationRule = "auto") -> None:
        if continuation_rule not in ("auto", "direct", "suffix"):
            raise ValueError(f"continuation_rule must be auto|direct|suffix, got {continuation_rule!r}")
        if chat_template and not getattr(tokenizer, "chat_template", None):
            raise ScoringError("chat_template=True but the tokenizer has no chat template; evaluate with "
                               "raw prompts (the CounterFact/ZsRE default, methods.md §10.17) or load an "
                               "instruct model's tokenizer")
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.continuation_rule = continuation_rule
        self._prefix_cache: dict[str, list[int]] = {}
        self._cont_cache: dict[str, list[int]] = {}
        self._blank_piece: dict[int, bool] = {}
        self.suffix_rule_used = 0
        self.suffix_rule_fallbacks = 0
        # Some tokenizers also append special tokens (an EOS) to a single sequence: a prefix must not end
        # with them, so find how many trailing specials to strip, once.
        with_sp = tokenizer("a b", add_special_tokens=True)["input_ids"]
        without = tokenizer("a b", add_special_tokens=False)["input_ids"]
        self._n_trailing = 0
        for start in range(len(with_sp) - len(without) + 1):
            if with_sp[start:start + len(without)] == without:
                self._n_trailing = len(with_sp) - start - len(without)
                break

    def wrap(self, prefix: str) -> str:
        """The prefix as the model sees it: raw, or as the user turn of the chat template."""
        if not self.chat_template:
            return prefix
        return self.tokenizer.apply_chat_template([{"role": "user", "content": prefix}], tokenize=False,
                                                  add_generation_prompt=True)

    def _encode_texts(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        # chat-templated text already carries its BOS/markers: do not add special tokens twice
        add_special = not self.chat_template
        ids = self.tokenizer(texts, add_special_tokens=add_special)["input_ids"]
        if add_special and self._n_trailing:
            ids = [x[:-self._n_trailing] for x in ids]
        return [list(x) for x in ids]

    def encode_prefixes(self, prefixes: Sequence[str]) -> list[list[int]]:
        missing = list(dict.fromkeys(p for p in prefixes if p not in self._prefix_cache))
        for p, ids in zip(missing, self._encode_texts([self.wrap(p) for p in missing]), strict=True):
            self._prefix_cache[p] = ids
        return [self._prefix_cache[p] for p in prefixes]

    def _encode_continuations(self, conts: Sequence[str]) -> list[list[int]]:
        missing = list(dict.fromkeys(c for c in conts if c not in self._cont_cache))
        if missing:
            enc = self.tokenizer(missing, add_special_tokens=False)["input_ids"]
            for c, ids in zip(missing, enc, strict=True):
                if not ids:
                    raise ScoringError(f"continuation {c!r} tokenizes to no tokens")
                self._cont_cache[c] = list(ids)
        return [self._cont_cache[c] for c in conts]

    def _starts_with_blank_piece(self, ids: list[int]) -> bool:
        if len(ids) < 2:
            return False
        first = ids[0]
        if first not in self._blank_piece:
            self._blank_piece[first] = self.tokenizer.decode([first]).strip() == ""
        return self._blank_piece[first]

    def encode_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
        """``[(prefix_ids, continuation_ids)]`` for each ``(prefix_text, continuation_text)``."""
        prefix_ids = self.encode_prefixes([p for p, _ in pairs])
        cont_ids = self._encode_continuations([c for _, c in pairs])
        out: list[tuple[list[int], list[int]]] = []
        for (p_text, c_text), p_ids, c_ids in zip(pairs, prefix_ids, cont_ids, strict=True):
            use_suffix = self.continuation_rule == "suffix" or (
                self.continuation_rule == "auto" and self._starts_with_blank_piece(c_ids))
            if use_suffix:
                c_ids = self._suffix_ids(p_text, p_ids, c_ids, c_text)
            out.append((p_ids, c_ids))
        return out

    def _suffix_ids(self, p_text: str, p_ids: list[int], direct: list[int], c_text: str) -> list[int]:
        # methods.md §2.1 [OURS]: continuation = ids(prefix + cont) − ids(prefix), if the prefix matched
        full = self._encode_texts([self.wrap(p_text) + c_text])[0]
        if full[:len(p_ids)] == p_ids and len(full) > len(p_ids):
            self.suffix_rule_used += 1
            return full[len(p_ids):]
        self.suffix_rule_fallbacks += 1
        return direct


class TokenScorer:
    """Scores many (prefix, continuation) pairs with one forward per length-sorted, token-budgeted batch."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, token_budget: int = 8192,
                 max_batch_size: int | None = 512, padding_side: PaddingSide = "right",
                 chat_template: bool = False, continuation_rule: ContinuationRule = "auto",
                 sort_by_length: bool = True) -> None:
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if token_budget < 1:
            raise ValueError("token_budget must be positive")
        self.model = model
        self.tokenizer = tokenizer
        self.encoder = PromptEncoder(tokenizer, chat_template=chat_template,
                                     continuation_rule=continuation_rule)
        self.token_budget = token_budget
        self.max_batch_size = max_batch_size
        self.padding_side: PaddingSide = padding_side
        self.sort_by_length = sort_by_length
        self.stats = ScorerStats()
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(tokenizer, "eos_token_id", None)
        self.pad_id: int = int(pad) if pad is not None else 0
        self.max_positions = model_max_positions(model)
        self.device = model_device(model)
        # v5-style heads accept a bool (B, L) mask in ``logits_to_keep``: the vocab projection then runs
        # only where a continuation token is scored. Detected on the first batch; else full logits.
        self._keep_mode: str | None = (
            None if "logits_to_keep" in inspect.signature(model.forward).parameters else "full")

    @property
    def chat_template(self) -> bool:
        return self.encoder.chat_template

    def encode(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
        encoded = self.encoder.encode_pairs(pairs)
        for (p_text, _), (p, c) in zip(pairs, encoded, strict=True):
            if not p:  # without a BOS, an empty prefix leaves the first continuation token unconditioned
                raise ScoringError(f"prefix {p_text!r} has no tokens: nothing predicts the continuation")
            if self.max_positions is not None and len(p) + len(c) > self.max_positions:
                raise ScoringError(f"prompt {p_text[:60]!r}… plus continuation is {len(p) + len(c)} "
                                   f"tokens, more than the model's {self.max_positions} positions")
        return encoded

    def make_batches(self, encoded: Sequence[tuple[list[int], list[int]]]) -> list[Batch]:
        lengths = [len(p) + len(c) for p, c in encoded]
        plan = plan_batches(lengths, self.token_budget, self.max_batch_size, self.sort_by_length)
        return [self._build(idx, [encoded[i] for i in idx]) for idx in plan]

    def _build(self, indices: list[int], items: list[tuple[list[int], list[int]]]) -> Batch:
        lens = [len(p) + len(c) for p, c in items]
        width = max(lens)
        rows: list[list[int]] = []
        starts: list[int] = []
        targets: list[int] = []
        for (p, c), n in zip(items, lens, strict=True):
            pad = [self.pad_id] * (width - n)
            offset = 0 if self.padding_side == "right" else width - n
            rows.append(p + c + pad if self.padding_side == "right" else pad + p + c)
            starts.append(offset + len(p) - 1)  # the position whose logits predict the first cont. token
            targets.extend(c)
        n_t = torch.tensor(lens)
        cont_lens = [len(c) for _, c in items]
        ar = torch.arange(width)
        start_t = torch.tensor(starts)
        keep = (ar >= start_t[:, None]) & (ar < (start_t + torch.tensor(cont_lens))[:, None])
        if self.padding_side == "right":
            mask = ar < n_t[:, None]
            pos = ar.expand(len(items), width)
        else:
            first = (width - n_t)[:, None]
            mask = ar >= first
            pos = (ar - first).clamp(min=0)  # real tokens get positions 0..n-1 whatever the padding
        return Batch(indices=indices, input_ids=torch.tensor(rows), attention_mask=mask.long(),
                     position_ids=pos.contiguous(), keep=keep, targets=torch.tensor(targets),
                     cont_lens=cont_lens, prefix_lens=[len(p) for p, _ in items])

    @torch.no_grad()
    def _continuation_logits(self, batch: Batch) -> torch.Tensor:
        dev = self.device
        kwargs = dict(input_ids=batch.input_ids.to(dev), attention_mask=batch.attention_mask.to(dev),
                      position_ids=batch.position_ids.to(dev), use_cache=False)
        keep = batch.keep.to(dev)
        n_keep = int(batch.targets.numel())
        if self._keep_mode in (None, "mask"):
            try:
                logits = self.model(**kwargs, logits_to_keep=keep).logits
            except (TypeError, IndexError, RuntimeError, ValueError):
                if self._keep_mode == "mask":
                    raise
                logits = None
            if logits is not None and logits.ndim == 2 and logits.shape[0] == n_keep:
                self._keep_mode = "mask"
                return logits
            self._keep_mode = "full"  # this transformers version does not understand a bool mask
        return self.model(**kwargs).logits[keep]

    def score_batch(self, batch: Batch) -> list[ContinuationScore]:
        logits = self._continuation_logits(batch).float()
        targets = batch.targets.to(logits.device)
        logprobs = logits.gather(1, targets[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
        lp = logprobs.tolist()
        am = logits.argmax(dim=-1).tolist()
        tg = batch.targets.tolist()
        self.stats.forwards += 1
        self.stats.padded_tokens += batch.n_padded_tokens
        self.stats.real_tokens += sum(batch.prefix_lens) + sum(batch.cont_lens)
        out: list[ContinuationScore] = []
        k = 0
        for r, c in enumerate(batch.cont_lens):  # split the flat per-token lists back into rows
            out.append(ContinuationScore(n_prefix=batch.prefix_lens[r], target_ids=tg[k:k + c],
                                         logprobs=lp[k:k + c], argmax_ids=am[k:k + c]))
            k += c
        return out

    def score_encoded(self, encoded: Sequence[tuple[list[int], list[int]]]) -> list[ContinuationScore]:
        # identical (prefix, continuation) id sequences are scored once
        unique: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
        uniq_items: list[tuple[list[int], list[int]]] = []
        where: list[int] = []
        for p, c in encoded:
            key = (tuple(p), tuple(c))
            j = unique.get(key)
            if j is None:
                j = unique[key] = len(uniq_items)
                uniq_items.append((p, c))
            where.append(j)
        results: list[ContinuationScore | None] = [None] * len(uniq_items)
        for batch in self.make_batches(uniq_items):
            for i, s in zip(batch.indices, self.score_batch(batch), strict=True):
                results[i] = s
        self.stats.suffix_rule_used = self.encoder.suffix_rule_used
        self.stats.suffix_rule_fallbacks = self.encoder.suffix_rule_fallbacks
        return [results[j] for j in where]  # type: ignore[misc]

    def score(self, pairs: Sequence[tuple[str, str]]) -> list[ContinuationScore]:
        """Scores for each ``(prefix_text, continuation_text)``, in input order."""
        return self.score_encoded(self.encode(pairs))


def score_continuations(model: torch.nn.Module, tokenizer: Any, pairs: Sequence[tuple[str, str]],
                        **options: Any) -> list[ContinuationScore]:
    """One-call form of :class:`TokenScorer` (options: token_budget, padding_side, chat_template, ...)."""
    return TokenScorer(model, tokenizer, **options).score(pairs)
