"""Keys ``k`` (edited-module inputs) and hidden states at the fact token, methods.md §2.4.

One batched forward serves a whole batch of requests × templates; it stops after the highest module
needed, so layers above the edited window are never computed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..data.requests import EditRequest
from .hooks import capture_input, capture_output, hooks, run_forward
from .templates import fill
from .tokens import chunks_by_tokens, encode, fact_token_index, pad_id, pad_right


@torch.no_grad()
def read_at_fact_tokens(
    lm,
    items: Sequence[tuple[str, str]],
    key_layers: Sequence[int] = (),
    out_layers: Sequence[int] = (),
    fact_token: str = "subject_last",
    max_tokens: int = 16384,
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """For ``(template_with_{}, subject)`` items: keys at ``key_layers`` (n, d_in) and block outputs at
    ``out_layers`` (n, d_model), both fp32, read at each item's fact token."""
    ad, tok = lm.adapter, lm.tokenizer
    for layer in [*key_layers, *out_layers]:
        ad.check_layer(layer)
    texts = [t.replace("{}", s) for t, s in items]
    seqs = [encode(tok, t) for t in texts]
    idxs = [fact_token_index(tok, t, s, fact_token) for t, s in items]
    top_key = max(key_layers, default=-1)
    top_out = max(out_layers, default=-1)
    keys: dict[int, list[torch.Tensor]] = {layer: [] for layer in key_layers}
    outs: dict[int, list[torch.Tensor]] = {layer: [] for layer in out_layers}
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # less padding
    for chunk in chunks_by_tokens([len(seqs[i]) for i in order], max_tokens):
        rows = [order[j] for j in chunk]
        batch = pad_right([seqs[i] for i in rows], pad_id(tok), ad.device)
        sink: dict = {}
        factories = [capture_input(ad.down_proj(layer), sink, ("k", layer),
                                   stop=(layer == top_key and top_key > top_out)) for layer in key_layers]
        factories += [capture_output(ad.block(layer), sink, ("h", layer), stop=(layer == top_out))
                      for layer in out_layers]
        with hooks(factories):
            run_forward(lm.model, batch.input_ids, batch.attention_mask)
        r = torch.arange(len(rows), device=ad.device)
        pos = torch.tensor([idxs[i] for i in rows], device=ad.device)
        for layer in key_layers:
            keys[layer].append(sink[("k", layer)][r, pos].float().cpu())
        for layer in out_layers:
            outs[layer].append(sink[("h", layer)][r, pos].float().cpu())
    inv = torch.empty(len(order), dtype=torch.long)
    inv[torch.tensor(order)] = torch.arange(len(order))

    def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(parts, 0)[inv]

    return {k: _cat(v) for k, v in keys.items()}, {k: _cat(v) for k, v in outs.items()}


def template_items(requests: Sequence[EditRequest], groups: Sequence[Sequence[str]]) -> list[tuple[str, str]]:
    """Items ordered request-major: for each request, every template of every group."""
    return [(fill(ctx, r.prompt), r.subject) for r in requests for group in groups for ctx in group]


def average_over_templates(flat: torch.Tensor, n_requests: int, groups: Sequence[Sequence[str]]) -> torch.Tensor:
    """Mean within each template group, then mean of group means (MEMIT [REF]); one group = plain mean."""
    per_req = flat.view(n_requests, sum(len(g) for g in groups), -1)
    means, start = [], 0
    for g in groups:
        means.append(per_req[:, start:start + len(g)].mean(1))
        start += len(g)
    return torch.stack(means, 0).mean(0)


def compute_keys_and_outputs(
    lm,
    requests: Sequence[EditRequest],
    groups: Sequence[Sequence[str]],
    key_layer: int,
    out_layer: int | None = None,
    fact_token: str = "subject_last",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Template-averaged keys ``K`` (d_in, u) at ``key_layer`` and, in the same forward, the block output
    at ``out_layer`` for the bare prompts (d_model, u) — the ``H`` of the residual ``R = Z − H``."""
    if groups[0][0] != "{}":
        raise ValueError("the first template must be the bare prompt '{}'")
    items = template_items(requests, groups)
    k, h = read_at_fact_tokens(lm, items, [key_layer], [out_layer] if out_layer is not None else [], fact_token)
    keys = average_over_templates(k[key_layer], len(requests), groups).T.contiguous()
    if out_layer is None:
        return keys, None
    per_req = sum(len(g) for g in groups)
    bare = h[out_layer].view(len(requests), per_req, -1)[:, 0]
    return keys, bare.T.contiguous()
