"""Token-level helpers of the editing path: fact-token positions, target ids, right-padded batches.

All index arithmetic assumes right padding (methods.md §2.2, pitfall §10.1); batches are built here at the
id level, so the tokenizer's own ``padding_side`` never matters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

FACT_TOKENS = ("subject_last", "subject_first", "subject_first_after_last", "last")


def n_tokens(tok, text: str) -> int:
    """Number of tokens of ``text`` including a BOS if the tokenizer adds one."""
    return len(tok(text)["input_ids"])


def encode(tok, text: str) -> list[int]:
    return list(tok(text)["input_ids"])


def fact_token_index(tok, template: str, subject: str, strategy: str = "subject_last") -> int:
    """Position of the fact token in ``template.replace('{}', subject)`` (``template`` has one ``{}``)."""
    prefix, suffix = template.split("{}", 1)
    if strategy == "subject_last":
        return n_tokens(tok, prefix + subject) - 1
    if strategy == "subject_first":
        return n_tokens(tok, prefix)  # [FIX] absolute index (right padding), not end-relative
    if strategy == "subject_first_after_last":
        if not suffix:
            return n_tokens(tok, prefix + subject) - 1
        return n_tokens(tok, prefix + subject)
    if strategy == "last":
        return n_tokens(tok, prefix + subject + suffix) - 1
    raise ValueError(f"unknown fact_token strategy {strategy!r}; choose one of {', '.join(FACT_TOKENS)}")


def target_ids(tok, prompt_text: str, target: str) -> list[int]:
    """Token ids of ``target`` as a continuation of ``prompt_text`` (methods.md §2.1 [OURS]).

    Computed as ``ids(prompt + target) − ids(prompt)`` when the prompt's ids are a prefix (this absorbs
    SentencePiece's lone "▁" quirk); otherwise the target tokenised without special tokens.
    """
    pre = encode(tok, prompt_text)
    full = encode(tok, prompt_text + target)
    if len(full) > len(pre) and full[: len(pre)] == pre:
        ids = full[len(pre):]
    else:
        ids = list(tok(target, add_special_tokens=False)["input_ids"])
    if not ids:
        raise ValueError(f"target {target!r} tokenizes to no tokens")
    return ids


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    lengths: list[int]


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu") -> Batch:
    """Right-pad id sequences into one batch."""
    if not seqs:
        raise ValueError("empty batch")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return Batch(ids.to(device), mask.to(device), [len(s) for s in seqs])


def chunks_by_tokens(lengths: Sequence[int], max_tokens: int, max_seqs: int | None = None) -> list[list[int]]:
    """Split indices into consecutive chunks whose padded size (n × longest) stays under ``max_tokens``."""
    out: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i, n in enumerate(lengths):
        new_longest = max(longest, n)
        if cur and (new_longest * (len(cur) + 1) > max_tokens or (max_seqs and len(cur) >= max_seqs)):
            out.append(cur)
            cur, new_longest = [], n
        cur.append(i)
        longest = new_longest
    if cur:
        out.append(cur)
    return out


def chunks_by_total(sizes: Sequence[int], max_total: int) -> list[list[int]]:
    """Split indices into consecutive chunks whose sizes sum to at most ``max_total`` (an item larger than that
    gets a chunk of its own): e.g. several records' sampled rows in one generation batch."""
    out: list[list[int]] = []
    total = 0
    for i, n in enumerate(sizes):
        if out and total + n <= max_total:
            out[-1].append(i)
            total += n
        else:
            out.append([i])
            total = n
    return out


def pad_id(tok) -> int:
    pid = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return int(pid if pid is not None else 0)
