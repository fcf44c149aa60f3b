"""Target values ``z`` / ``v*``: the gradient optimisation of a residual vector δ, methods.md §2.5.

All requests of a batch are optimised in one batched forward per step. δ has one row per request and
each row only reaches its own request's sequences, and Adam is element-wise, so this is exactly the
reference's one-request-at-a-time procedure (including per-request early stop and clamping), at the
cost of one forward/backward per step for the whole batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..data.requests import EditRequest
from .hooks import add_at_positions, hooks
from .templates import fill
from .tokens import encode, fact_token_index, pad_id, pad_right, target_ids

KL_PROMPT = "{} is a"
LOSS_STOP = 5e-2  # [REF] stop once the total loss is below this


@dataclass
class TargetConfig:
    layer: int
    site: str = "block"  # "block": residual stream after the layer (MEMIT family); "mlp": MLP output (ROME)
    steps: int = 20
    lr: float = 0.5
    weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    fact_token: str = "subject_last"
    max_seqs_per_forward: int = 1024
    # optional projection applied to δ after every Adam step, before the clamp (SAME §7.2 uses it)
    delta_projection: torch.Tensor | None = field(default=None, repr=False)


@dataclass
class Targets:
    z: torch.Tensor  # (d_model, u) target values, fp32
    h0: torch.Tensor  # (d_model, u) unmodified hidden at the bare prompt's fact token
    delta: torch.Tensor  # (d_model, u) = z − h0
    rows: list[dict]  # per-request diagnostics (§6.4)
    steps_run: int  # forward passes of the batch (for the compute floor of benchmarks)


def _build_sequences(lm, requests: Sequence[EditRequest], contexts: Sequence[str], fact_token: str):
    tok = lm.tokenizer
    seqs: list[list[int]] = []
    req_of_seq: list[int] = []
    fact_pos: list[int] = []
    tgt: list[tuple[int, list[int], list[int]]] = []  # (seq, positions, token ids) of rewriting prompts
    kl_seq: list[int] = []
    first_seq: list[int] = []
    for r_i, r in enumerate(requests):
        ids_t = target_ids(tok, r.text, r.target_new)
        for c_i, ctx in enumerate(contexts):
            templ = fill(ctx, r.prompt)
            prompt_ids = encode(tok, templ.replace("{}", r.subject))
            s = len(seqs)
            # id-level teacher forcing: no decode/re-encode of target tokens [FIX of §10.3]
            seqs.append(prompt_ids + ids_t[:-1])
            req_of_seq.append(r_i)
            fact_pos.append(fact_token_index(tok, templ, r.subject, fact_token))
            start = len(prompt_ids) - 1
            tgt.append((s, list(range(start, start + len(ids_t))), ids_t))
            if c_i == 0:
                first_seq.append(s)
        s = len(seqs)
        seqs.append(encode(tok, KL_PROMPT.replace("{}", r.subject)))
        req_of_seq.append(r_i)
        fact_pos.append(fact_token_index(tok, KL_PROMPT, r.subject, "subject_last"))  # §10.12
        kl_seq.append(s)
    return seqs, req_of_seq, fact_pos, tgt, kl_seq, first_seq


def compute_targets(lm, requests: Sequence[EditRequest], contexts: Sequence[str], cfg: TargetConfig) -> Targets:
    """Optimise δ for every request; returns ``z = h0 + δ`` at ``cfg.layer`` (block output or MLP output)."""
    if contexts[0] != "{}":
        raise ValueError("the first context must be the bare prompt '{}' (it defines h0)")
    model, ad = lm.model, lm.adapter
    device = ad.device
    u = len(requests)
    seqs, req_of_seq, fact_pos, tgt, kl_seq, first_seq = _build_sequences(lm, requests, contexts, cfg.fact_token)
    batch = pad_right(seqs, pad_id(lm.tokenizer), device)
    rows_t = torch.arange(len(seqs), device=device)
    pos_t = torch.tensor(fact_pos, device=device)
    req_t = torch.tensor(req_of_seq, device=device)
    n_ctx = len(contexts)

    site = ad.block(cfg.layer) if cfg.site == "block" else ad.mlp(cfg.layer)
    delta = torch.zeros(u, ad.d_model, dtype=torch.float32, device=device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.lr)
    sink: dict = {}

    # gather indices for the NLL of every rewriting prompt's target tokens
    nll_seq = torch.tensor([s for s, p, _ in tgt for _ in p], device=device)
    nll_pos = torch.tensor([q for _, p, _ in tgt for q in p], device=device)
    nll_tok = torch.tensor([t for _, _, ids in tgt for t in ids], device=device)
    # per rewriting prompt: mean over its T target tokens; per request: mean over its prompts
    tok_prompt = torch.tensor([j for j, (_, p, _) in enumerate(tgt) for _ in p], device=device)
    tok_count = torch.tensor([len(p) for _, p, _ in tgt], dtype=torch.float32, device=device)
    prompt_req = torch.tensor([req_of_seq[s] for s, _, _ in tgt], device=device)
    kl_rows = torch.tensor(kl_seq, device=device)
    kl_pos = pos_t[kl_rows]
    # the only positions whose logits the loss reads: the target tokens, then each KL prompt's fact token
    read_rows, read_pos = torch.cat([nll_seq, kl_rows]), torch.cat([nll_pos, kl_pos])
    n_nll = len(nll_seq)

    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    done = torch.zeros(u, dtype=torch.bool)
    final_nll = torch.zeros(u)
    steps_used = torch.zeros(u, dtype=torch.long)
    h0: torch.Tensor | None = None
    kl_init: torch.Tensor | None = None
    steps_run = 0
    try:
        for it in range(cfg.steps):
            opt.zero_grad(set_to_none=True)
            with hooks([add_at_positions(site, rows_t, pos_t, lambda: delta[req_t], sink, "h")]):
                logits = ad.logits_at(batch.input_ids, batch.attention_mask, read_rows, read_pos)
            steps_run += 1
            if h0 is None:
                h0 = sink["h"][torch.tensor(first_seq, device=device), pos_t[first_seq]].detach().float()
            lp_tok = torch.log_softmax(logits[:n_nll].float(), -1).gather(1, nll_tok[:, None])[:, 0]
            per_prompt = torch.zeros(len(tgt), device=device).index_add(0, tok_prompt, -lp_tok) / tok_count
            nll = torch.zeros(u, device=device).index_add(0, prompt_req, per_prompt) / n_ctx
            kl_lp = torch.log_softmax(logits[n_nll:].float(), -1)
            if kl_init is None:
                kl_init = kl_lp.detach().clone()
            kl = cfg.kl_factor * (kl_lp.exp() * (kl_lp - kl_init)).sum(-1)  # KL(P_δ ‖ P_0)
            wd = cfg.weight_decay * delta.norm(dim=1) / h0.norm(dim=1) ** 2
            loss = nll + kl + wd
            active = ~done
            final_nll[active] = nll.detach().cpu()[active]
            steps_used[active] = it + 1
            done |= loss.detach().cpu() < LOSS_STOP
            if bool(done.all()) or it == cfg.steps - 1:
                break
            keep = delta.detach()[done.to(device)].clone()
            loss[(~done).to(device)].sum().backward()
            opt.step()
            with torch.no_grad():
                if cfg.delta_projection is not None:
                    delta.copy_(delta @ cfg.delta_projection.to(delta).T)
                max_norm = cfg.clamp_norm_factor * h0.norm(dim=1)
                norms = delta.norm(dim=1)
                scale = torch.where(norms > max_norm, max_norm / norms.clamp_min(1e-12), torch.ones_like(norms))
                delta.mul_(scale[:, None])
                if done.any():  # requests that already converged keep their δ (as if their loop had ended)
                    delta[done.to(device)] = keep
    finally:
        for p, r in zip(model.parameters(), requires, strict=True):
            p.requires_grad_(r)
    assert h0 is not None
    d = delta.detach().float()
    z = h0 + d
    rows = [
        {"case_id": r.case_id, "delta_norm": float(d[i].norm()), "h0_norm": float(h0[i].norm()),
         "z_norm": float(z[i].norm()), "target_nll": float(final_nll[i]), "target_steps": int(steps_used[i])}
        for i, r in enumerate(requests)
    ]
    return Targets(z=z.T.contiguous().cpu(), h0=h0.T.contiguous().cpu(), delta=d.T.contiguous().cpu(), rows=rows,
                   steps_run=steps_run)
