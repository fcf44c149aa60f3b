"""MOSE — multiplicative orthogonal sequential editing (methods.md §3.6), both variants.

``mose`` (paper, closed form): per layer the orthogonal Procrustes solution of
``min_R λ‖R W K0 − W K0‖² + ‖R W K_E − V_E‖²`` with ``K0K0ᵀ`` replaced by the normalised covariance
``Σ`` (count folded into λ): ``M = λ G + V_E (W K_E)ᵀ``, ``G = W Σ Wᵀ``, ``R = U Vᵀ`` from ``SVD(M)``,
``W ← R W`` (left multiplication: output space). Norm and all singular values of ``W`` are preserved.

``mose_oft`` (what the released code does): a block-diagonal Cayley rotation ``Q`` on the input side,
``W_eff = W0 Qᵀ``, trained with Adam on the target NLL; the generator persists across edits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..data.requests import EditRequest
from .keys import compute_keys_and_outputs
from .solvers import LocateThenEdit, Solver, examples_nll, nll_examples
from .targets import Targets, compute_targets
from .tokens import pad_id


class Mose(LocateThenEdit):
    name = "mose"

    def candidate_layers(self) -> list[int]:
        n = self.editor.lm.adapter.n_layers
        return self.hp.candidate_layers or list(range(1, max(2, n // 2)))

    def prepare(self) -> None:
        layers = set(self.hp.layers)
        if self.hp.layer_selection == "mose":
            n = self.editor.lm.adapter.n_layers
            for c in self.candidate_layers():
                layers |= {x for x in (c - 1, c, c + 1) if 0 <= x < n}
        self.editor.covariances(sorted(layers))

    def select_layers(self, requests: Sequence[EditRequest], groups) -> tuple[list[int], Targets | None]:
        """Paper eq. 21–22: the layer whose needed residual, relative to ``‖W‖₂·‖k‖``, is smallest."""
        if self.hp.layer_selection == "fixed":
            return list(self.hp.layers), None
        ed = self.editor
        contexts = [c for g in groups for c in g]
        scores: dict[int, float] = {}
        cached: dict[int, Targets] = {}
        for layer in self.candidate_layers():
            tg = compute_targets(ed.lm, requests, contexts, self.target_config(layer, "block"))
            keys, h = compute_keys_and_outputs(ed.lm, requests, groups, layer, layer, self.hp.fact_token)
            spectral = float(torch.linalg.matrix_norm(ed.lm.adapter.get_weight(layer).double(), ord=2))
            a = keys.norm(dim=0).double()  # activation strength per request (eq. 21)
            scores[layer] = float(((tg.z - h).double() / (spectral * a)).norm())
            cached[layer] = tg
        best = min(scores, key=scores.__getitem__)
        n = ed.lm.adapter.n_layers
        layers = [x for x in (best - 1, best, best + 1) if 0 <= x < n]
        ed.state.info.setdefault("mose_layer_scores", []).append({str(k): v for k, v in scores.items()})
        return layers, cached.get(layers[-1])

    def layer_update(self, layer, keys, resid, w, info):
        ed, hp = self.editor, self.hp
        st = ed.state.tensors
        w64 = w.double()
        gram_key, rot_key = f"mose_gram.{layer}", f"mose_rotation.{layer}"
        if gram_key not in st:  # G = W Σ Wᵀ once; afterwards G ← R G Rᵀ (exact: Σ is fixed)
            st[gram_key] = (w64 @ ed.covariance(layer).double() @ w64.T)
        gram = st[gram_key].double()
        wk = w64 @ keys
        values = wk + resid  # V_E = W K_E + R_l
        if hp.mose_lambda is not None:
            lam = hp.mose_lambda
        else:
            lam = hp.mose_lambda_rel * float((wk ** 2).sum(0).mean()) / (float(gram.trace()) / gram.shape[0])
        m = lam * gram + values @ wk.T
        if hp.mose_protect_past and f"cache_c.{layer}" in st:
            m = m + hp.mose_protect_past * (w64 @ st[f"cache_c.{layer}"].double() @ w64.T)
        u, _s, vh = torch.linalg.svd(m)
        rot = u @ vh  # no determinant correction: the paper optimises over O(d)
        st[gram_key] = rot @ gram @ rot.T
        prev = st.get(rot_key)
        st[rot_key] = rot if prev is None else rot @ prev.double()
        eye = torch.eye(rot.shape[0], dtype=torch.float64)
        info.update({"mose_lambda": lam, "rotation_angle_fro": float((rot - eye).norm()),
                     "orthogonality_error": float((rot.T @ rot - eye).norm()), "variant": "procrustes"})
        return rot @ w64 - w64

    def after_batch(self, requests, groups):
        return self.cache_update(requests, groups) if self.hp.mose_protect_past else {}


def cayley_blocks(generators: torch.Tensor) -> torch.Tensor:
    """``Q_b = (I − S_b)(I + S_b)⁻¹`` with ``S_b = ½(G_b − G_bᵀ)``: orthogonal for any generator."""
    s = 0.5 * (generators - generators.transpose(-1, -2))
    eye = torch.eye(s.shape[-1], dtype=s.dtype, device=s.device).expand_as(s)
    return torch.linalg.solve(eye + s, eye - s, left=False)


def rotate_input(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``x ↦ Qᵀx`` per token (row form ``x Q``) with block-diagonal ``Q`` given as (r, b, b) blocks."""
    r, b, _ = q.shape
    xs = x.reshape(*x.shape[:-1], r, b)
    return torch.einsum("...rb,rbc->...rc", xs, q.to(x.dtype)).reshape(x.shape)


class MoseOft(Solver):
    name = "mose_oft"
    template_style = None

    def edit_batch(self, requests):
        ed, hp = self.editor, self.hp
        ad, model = ed.lm.adapter, ed.lm.model
        st = ed.state.tensors
        d_ff = ad.d_ff
        if d_ff % hp.blocks:
            raise ValueError(f"mose_oft: d_ff={d_ff} is not divisible by blocks={hp.blocks}")
        b = d_ff // hp.blocks
        radius = hp.radius_factor * b ** 2 / hp.blocks ** 0.5
        gens, current = {}, {}
        for layer in hp.layers:
            if f"base.{layer}" not in st:
                st[f"base.{layer}"] = ad.get_weight(layer).cpu()  # W0: the effective weight is W0 Qᵀ
            g = st.get(f"oft_generator.{layer}")
            gens[layer] = (torch.zeros(hp.blocks, b, b) if g is None else g.clone()).to(ad.device).requires_grad_(True)
            current[layer] = ad.get_weight(layer)
            ad.set_weight(layer, st[f"base.{layer}"])
        requires = [p.requires_grad for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(False)

        def hook_for(layer: int):
            def pre(_m, args):
                return (rotate_input(args[0], cayley_blocks(gens[layer])), *args[1:])

            return ad.down_proj(layer).register_forward_pre_hook(pre)

        opt = torch.optim.Adam(list(gens.values()), lr=hp.lr)
        examples = nll_examples(ed.lm.tokenizer, requests, "target_new")
        pid = pad_id(ed.lm.tokenizer)
        handles = [hook_for(layer) for layer in hp.layers]
        losses = []
        try:
            for _ in range(hp.num_steps):  # [REF] no early stop
                for s in range(0, len(examples), hp.batch_size):
                    loss = examples_nll(model, examples[s:s + hp.batch_size], pid, ad.device)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    losses.append(float(loss.detach()))
                    with torch.no_grad():  # Frobenius-ball projection of each generator block [REF]
                        for g in gens.values():
                            norms = g.flatten(1).norm(dim=1).clamp_min(1e-12)
                            g.mul_(torch.clamp(radius / norms, max=1.0)[:, None, None])
        finally:
            for h in handles:
                h.remove()
            for p, r in zip(model.parameters(), requires, strict=True):
                p.requires_grad_(r)
        layer_rows = []
        with torch.no_grad():
            for layer in hp.layers:
                q = cayley_blocks(gens[layer].detach().double())
                w0 = st[f"base.{layer}"].double()
                w_eff = rotate_input(w0, q.transpose(-1, -2))  # W_eff = W0 Qᵀ (the hook maps k ↦ Qᵀk)
                st[f"oft_generator.{layer}"] = gens[layer].detach().cpu()
                ad.set_weight(layer, current[layer])
                delta = (w_eff - current[layer].double()).float()
                ed.add_delta(layer, delta)
                eye = torch.eye(b, dtype=torch.float64)
                layer_rows.append({"layer": layer, "variant": "oft", "update_norm": float(delta.norm()),
                                   "orthogonality_error": float(max((qb.T @ qb - eye).norm() for qb in q))})
        rows = [{"case_id": r.case_id, "oft_final_loss": losses[-1] if losses else None} for r in requests]
        return {"targets": None, "layer_rows": layer_rows, "rows": rows, "steps": len(losses)}
