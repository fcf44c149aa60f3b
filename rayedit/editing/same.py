"""SAME — safety-aware model editing (methods.md §7, [OURS] interpretation: AlphaEdit + three constraints).

Safety statistics, once per stream on the pre-edit model, from malicious vs benign instructions:
- residual stream at the last prompt token → safety direction ``r = τ/‖τ‖``, ``τ = μ_mal − μ_ben``, and a
  ``k_s``-dim safety subspace ``S`` (``r`` first, then top singular directions of the benign-centred
  malicious activations with ``r`` removed);
- keys at the last ``token_window`` prompt tokens → malicious key subspace ``Q`` (99 % of the energy).
Constraints: (1) ``δ ← (I − S_z S_zᵀ) δ`` in the target optimisation; (2) ``Δ ← (I − S Sᵀ) Δ`` (the exact
optimum of the output-projected AlphaEdit objective); (3) ``P_safe`` = projector onto
``null(Σ) ∩ span(Q)^⊥`` in place of AlphaEdit's ``P`` (or, ``same_key_mode: soft``, ``μ_s K_mal K_malᵀ``
added to the cache ``C_p``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import torch

from .hooks import capture_input, capture_output, hooks, run_forward
from .solvers import AlphaEdit
from .tokens import encode, pad_id, pad_right


def format_prompts(tok, prompts: Sequence[str], chat: bool) -> list[list[int]]:
    """Token ids of instructions, wrapped in the chat template with a generation prompt when asked (§10.17)."""
    if chat and getattr(tok, "chat_template", None):
        out = []
        for p in prompts:
            ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
            # newer transformers return a BatchEncoding (a mapping) here, older ones a plain list of ids
            if hasattr(ids, "keys"):
                ids = ids["input_ids"]
            out.append([int(i) for i in ids])
        return out
    return [encode(tok, p) for p in prompts]


@torch.no_grad()
def last_token_activations(lm, seqs: Sequence[Sequence[int]], out_layers: Sequence[int], key_layers: Sequence[int],
                           window: int, batch: int = 32) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Block outputs at the last token (n, d_model) and keys at the last ``window`` tokens (n·w, d_ff)."""
    ad = lm.adapter
    outs: dict[int, list[torch.Tensor]] = {layer: [] for layer in out_layers}
    keys: dict[int, list[torch.Tensor]] = {layer: [] for layer in key_layers}
    top_out, top_key = max(out_layers), max(key_layers)
    for s in range(0, len(seqs), batch):
        chunk = seqs[s:s + batch]
        b = pad_right(chunk, pad_id(lm.tokenizer), ad.device)
        sink: dict = {}
        f = [capture_output(ad.block(layer), sink, ("h", layer), stop=(layer == top_out and top_out >= top_key))
             for layer in out_layers]
        f += [capture_input(ad.down_proj(layer), sink, ("k", layer), stop=(layer == top_key and top_key > top_out))
              for layer in key_layers]
        with hooks(f):
            run_forward(lm.model, b.input_ids, b.attention_mask)
        last = torch.tensor([n - 1 for n in b.lengths], device=ad.device)
        rows = torch.arange(len(chunk), device=ad.device)
        for layer in out_layers:
            outs[layer].append(sink[("h", layer)][rows, last].float().cpu())
        for layer in key_layers:
            k = sink[("k", layer)]
            for j, n in enumerate(b.lengths):
                keys[layer].append(k[j, max(0, n - window):n].float().cpu())
    return ({k: torch.cat(v) for k, v in outs.items()}, {k: torch.cat(v) for k, v in keys.items()})


def safety_subspace(h_mal: torch.Tensor, h_ben: torch.Tensor, k_s: int) -> torch.Tensor:
    """``S`` (d_model, k_s), orthonormal, first column the safety direction ``r``."""
    mu_ben = h_ben.double().mean(0)
    tau = h_mal.double().mean(0) - mu_ben
    r = tau / tau.norm()
    centred = h_mal.double() - mu_ben
    centred = centred - (centred @ r)[:, None] * r[None]
    cols = [r]
    if k_s > 1:
        _u, _s, vh = torch.linalg.svd(centred, full_matrices=False)
        for v in vh:
            if len(cols) == k_s:
                break
            for c in cols:  # Gram–Schmidt against what we have
                v = v - (v @ c) * c
            if v.norm() > 1e-8:
                cols.append(v / v.norm())
    return torch.stack(cols, 1).float()


def key_subspace(k_mal: torch.Tensor, energy: float, r_max: int) -> torch.Tensor:
    """``Q`` (d_ff, r_m): top eigenvectors of the malicious keys' second moment covering ``energy``."""
    m = k_mal.double().T @ k_mal.double() / k_mal.shape[0]
    evals, evecs = torch.linalg.eigh(m)
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
    frac = torch.cumsum(evals, 0) / evals.sum()
    r = min(int((frac < energy).sum()) + 1, r_max, evals.numel())
    return evecs[:, :r].float()


def safe_projection(null_basis: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Projector onto ``span(Û) ∩ span(Q)^⊥``: ``B`` = null space of ``QᵀÛ`` (SVD, tol 1e-6·σ_max)."""
    u = null_basis.double()
    m = q.double().T @ u
    _uu, s, vh = torch.linalg.svd(m, full_matrices=True)
    tol = 1e-6 * (float(s[0]) if s.numel() else 0.0)
    rank = int((s > tol).sum())
    basis = u @ vh[rank:].T
    return (basis @ basis.T).float(), basis.shape[1]


class Same(AlphaEdit):
    name = "same"

    @property
    def keep_null_basis(self) -> bool:  # type: ignore[override]
        return self.hp.same_key_mode == "hard"

    def prepare(self) -> None:
        ed, hp = self.editor, self.hp
        mal, ben = ed.safety_prompts()
        if len(mal) < 2 or len(ben) < 2:
            raise ValueError("SAME needs at least 2 malicious and 2 benign prompts")
        st = ed.state.tensors
        z_layer = hp.layers[-1]
        key = f"same_S.{z_layer}"
        if key not in st:
            chat = bool(hp.safety_chat_template and getattr(ed.lm.tokenizer, "chat_template", None))
            seq_m = format_prompts(ed.lm.tokenizer, mal, chat)
            seq_b = format_prompts(ed.lm.tokenizer, ben, chat)
            h_m, k_m = last_token_activations(ed.lm, seq_m, hp.layers, hp.layers, hp.token_window)
            h_b, _ = last_token_activations(ed.lm, seq_b, hp.layers, hp.layers, hp.token_window)
            for layer in hp.layers:
                st[f"same_S.{layer}"] = safety_subspace(h_m[layer], h_b[layer], hp.k_s)
                st[f"same_Q.{layer}"] = key_subspace(k_m[layer], hp.key_energy, hp.r_m)
                st[f"same_mu_ben.{layer}"] = h_b[layer].mean(0)
                if hp.same_key_mode == "soft":
                    kk = (k_m[layer].double().T @ k_m[layer].double()).float() * hp.mu_s
                    prev = st.get(f"cache_c.{layer}")
                    st[f"cache_c.{layer}"] = kk if prev is None else prev + kk
            digest = hashlib.sha256(json.dumps([mal, ben]).encode()).hexdigest()[:16]
            ed.state.info["same_prompts_sha256"] = digest
            ed.state.info["same_chat_template"] = chat
        for layer in hp.layers:
            self.null_space(layer)
            if hp.same_key_mode == "hard" and f"same_Psafe_rank.{layer}" not in ed.state.info:
                basis = ed.state.tensors.pop(f"nullspace_basis.{layer}")
                p_safe, rank = safe_projection(basis, st[f"same_Q.{layer}"])
                if rank == 0:
                    raise ValueError(f"layer {layer}: null(Σ) ∩ span(Q)^⊥ is empty; lower r_m or use soft mode")
                st[f"projection.{layer}"] = p_safe
                ed.state.info[f"same_Psafe_rank.{layer}"] = rank
                ed.state.info[f"nullspace_rank.{layer}"] = rank
                self.record_null_space_energy(layer, p_safe, rank)

    def target_config(self, layer: int, site: str):
        cfg = super().target_config(layer, site)
        if self.hp.same_target_projection:
            s = self.editor.state.tensors[f"same_S.{layer}"].double()
            cfg.delta_projection = (torch.eye(s.shape[0], dtype=torch.float64) - s @ s.T).float()
        return cfg

    def layer_update(self, layer, keys, resid, w, info):
        delta = super().layer_update(layer, keys, resid, w, info)
        if self.hp.same_output_projection:
            s = self.editor.state.tensors[f"same_S.{layer}"].double()
            delta = delta - s @ (s.T @ delta)  # (I − S Sᵀ) Δ
        return delta
