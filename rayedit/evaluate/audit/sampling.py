"""Batched, seeded decoding for the audit suites: greedy or nucleus sampling, left padded, with a KV cache.

Determinism: every row draws its random numbers from its own ``torch.Generator`` seeded by a row key
(e.g. ``(seed, fact, query, paraphrase, sample)``), and a token is chosen by inverse-CDF sampling of the
nucleus with that row's uniform number for the step. A row's text therefore does not depend on which
other rows share its batch, which shard evaluated it, or the order of the batches (up to the float noise
of a different batch shape, which can only flip a draw that lands within ~1e-7 of a bucket edge).
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..scoring import kv_cache_kwarg, model_device, model_max_positions, output_kv_cache


def row_seed(*parts: object) -> int:
    """A 63-bit seed from any printable key parts (stable across processes and Python versions)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass
class Decoded:
    """One generated continuation: the new ids (EOS excluded) and their decoded text."""

    ids: list[int]
    text: str
    hit_eos: bool


def nucleus_choice(logits: torch.Tensor, u: torch.Tensor, top_p: float, temperature: float) -> torch.Tensor:
    """Inverse-CDF draw from the top-p nucleus of ``softmax(logits / T)``, one uniform ``u`` per row."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    cum = sorted_p.cumsum(dim=-1)
    keep = (cum - sorted_p) < top_p  # smallest prefix whose mass reaches top_p (the first is always kept)
    kept = sorted_p * keep
    cdf = kept.cumsum(dim=-1)
    target = u[:, None].to(cdf.dtype) * cdf[:, -1:]
    pick = (cdf < target).sum(dim=-1, keepdim=True).clamp(max=keep.sum(dim=-1, keepdim=True) - 1)
    return order.gather(1, pick)


@torch.no_grad()
def decode_batch(model: torch.nn.Module, tokenizer, prompt_ids: Sequence[Sequence[int]], *,
                 max_new_tokens: int, greedy: bool = True, top_p: float = 0.9, temperature: float = 1.0,
                 seeds: Sequence[int] | None = None, stop_at_eos: bool = True) -> list[Decoded]:
    """Continue every prompt (ids, BOS/chat markers included) in ONE left-padded batch.

    ``greedy=False`` needs one seed per row. Rows stop at EOS (``stop_at_eos``); the batch stops when
    every row has stopped or at ``max_new_tokens``, and never runs past the model's positions.
    """
    n = len(prompt_ids)
    if n == 0:
        return []
    if not greedy:
        if seeds is None or len(seeds) != n:
            raise ValueError("nucleus sampling needs one seed per row")
        if not 0.0 < top_p <= 1.0 or temperature <= 0:
            raise ValueError(f"need 0 < top_p <= 1 and temperature > 0, got {top_p}, {temperature}")
    dev = model_device(model)
    lens = [len(x) for x in prompt_ids]
    width = max(lens)
    limit = model_max_positions(model)
    steps = max_new_tokens if limit is None else max(0, min(max_new_tokens, limit - width))
    if steps == 0:
        return [Decoded([], "", False) for _ in prompt_ids]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    eos = tokenizer.eos_token_id if stop_at_eos else None
    input_ids = torch.tensor([[pad] * (width - k) + list(x) for x, k in zip(prompt_ids, lens, strict=True)],
                             device=dev)
    mask = torch.tensor([[0] * (width - k) + [1] * k for k in lens], device=dev)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    uniforms = None
    if not greedy:
        # per-row uniforms for every step, drawn up front from the row's own generator
        uniforms = torch.stack([torch.rand(steps, generator=torch.Generator().manual_seed(int(s)))
                                for s in seeds]).to(dev)  # type: ignore[union-attr]
    done = torch.zeros(n, dtype=torch.bool, device=dev)
    out_cols: list[torch.Tensor] = []
    past = None
    step_ids, step_pos = input_ids, pos
    # only the last position's logits are needed: skip the vocabulary projection elsewhere when supported
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    cache_kw = kv_cache_kwarg(model)
    for t in range(steps):
        extra[cache_kw] = past
        out = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, use_cache=True, **extra)
        past = output_kv_cache(out)
        logits = out.logits[:, -1, :]
        if greedy:
            nxt = logits.argmax(dim=-1, keepdim=True)
        else:
            nxt = nucleus_choice(logits, uniforms[:, t], top_p, temperature)  # type: ignore[index]
        nxt = torch.where(done[:, None], torch.full_like(nxt, pad), nxt)
        out_cols.append(nxt)
        if eos is not None:
            done |= nxt[:, 0] == eos
            if bool(done.all()):
                break
        step_ids = nxt
        step_pos = step_pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)  # finished rows' outputs are ignored
    gen = torch.cat(out_cols, dim=1).tolist()
    result: list[Decoded] = []
    for row in gen:
        ids: list[int] = []
        hit = False
        for tok_id in row:
            if eos is not None and tok_id == eos:
                hit = True
                break
            ids.append(tok_id)
        if eos is None:  # without EOS stopping, finished rows never exist: nothing was padded
            ids = row
        result.append(Decoded(ids, tokenizer.decode(ids, skip_special_tokens=True), hit))
    return result
