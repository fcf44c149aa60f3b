"""Solvers: how a batch's keys and targets become weight updates (methods.md §3).

The shared locate-then-edit pipeline lives in :class:`LocateThenEdit` (targets at the last edited layer,
then for each layer ascending: keys on the current model, residual spread, ``layer_update``, apply). A
method is a small subclass that supplies ``layer_update`` and optional per-stream preparation and
after-batch bookkeeping. ROME reuses the same key/target functions one request at a time; FT is the
gradient baseline.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ..data.requests import EditRequest
from .keys import compute_keys_and_outputs, read_at_fact_tokens, template_items
from .linalg import null_space_energy, null_space_projection, robust_solve
from .targets import TargetConfig, Targets, compute_targets
from .tokens import encode, pad_id, pad_right, target_ids

if TYPE_CHECKING:
    from .editor import Editor

log = logging.getLogger(__name__)
# [OURS] above this share of the statistics' key energy in the null space, say that the projection protects
# little (AlphaEdit's premise is a null space that the preserved keys barely reach)
NULLSPACE_ENERGY_WARN = 0.1


# --------------------------------------------------------------------------------- closed forms (pure)
def memit_delta(keys: torch.Tensor, resid: torch.Tensor, cov: torch.Tensor, lam: float,
                cache: torch.Tensor | None = None, dtype: str = "float64", label: str = "memit"):
    """``Δ = R Kᵀ (λΣ + [C_p] + K Kᵀ)⁻¹`` — the minimiser of ``‖ΔK − R‖² + λ tr(ΔΣΔᵀ) [+ tr(ΔC_pΔᵀ)]``.

    keys (d_in, u), resid (d_out, u), cov (d_in, d_in); returns (Δ (d_out, d_in) fp64, SolveReport)."""
    keys, resid = keys.double(), resid.double()
    a = lam * cov.double() + keys @ keys.T
    if cache is not None:
        a = a + cache.double()
    x, rep = robust_solve(a, keys @ resid.T, label, dtype)
    return x.T.double(), rep


def alphaedit_delta(keys: torch.Tensor, resid: torch.Tensor, projection: torch.Tensor,
                    cache: torch.Tensor | None, alpha: float, dtype: str = "float64", label: str = "alphaedit"):
    """``(P(KKᵀ + C_p) + αI) X = P K Rᵀ``, ``Δ = Xᵀ``; the solution satisfies ``Δ = Δ P`` (§3.3)."""
    keys, resid, p = keys.double(), resid.double(), projection.double()
    kk = keys @ keys.T
    if cache is not None:
        kk = kk + cache.double()
    a = p @ kk + alpha * torch.eye(p.shape[0], dtype=torch.float64)
    x, rep = robust_solve(a, p @ keys @ resid.T, label, dtype)
    return x.T.double(), rep


def rome_delta(w: torch.Tensor, bias: torch.Tensor | None, key: torch.Tensor, left: torch.Tensor,
               v_star: torch.Tensor) -> torch.Tensor:
    """Rank one ``Δ = r uᵀ`` with ``u = left/‖left‖`` and ``r = (v* − (W key + b)) / (key·u)``: then
    ``(W + Δ) key + b = v*`` exactly."""
    u = left.double() / left.double().norm()
    key = key.double()
    out = w.double() @ key + (bias.double() if bias is not None else 0.0)
    right = (v_star.double() - out) / (key @ u)
    return torch.outer(right, u)


def nll_examples(tok, requests: Sequence[EditRequest], objective: str = "target_new"):
    """(input ids, positions, target ids) per request. ``target_new``: teacher forced after the prompt;
    ``prompt_last``: every target token read at the last prompt position (FT-L [REF])."""
    ex = []
    for r in requests:
        prompt_ids = encode(tok, r.text)
        t_ids = target_ids(tok, r.text, r.target_new)
        if objective == "prompt_last":
            ex.append((prompt_ids, [len(prompt_ids) - 1] * len(t_ids), t_ids))
        else:
            start = len(prompt_ids) - 1
            ex.append((prompt_ids + t_ids[:-1], list(range(start, start + len(t_ids))), t_ids))
    return ex


def examples_nll(model, examples, pad: int, device) -> torch.Tensor:
    """Mean over requests of the mean target-token NLL, one right-padded forward."""
    batch = pad_right([e[0] for e in examples], pad, device)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    per_req = []
    for j, (_ids, pos, toks) in enumerate(examples):
        lp = torch.log_softmax(logits[j, pos].float(), -1)
        per_req.append(-lp.gather(1, torch.tensor(toks, device=device)[:, None]).mean())
    return torch.stack(per_req).mean()


class Solver:
    """Base: a method plugged into the editor."""

    name = "base"
    template_style: str | None = "memit"
    needs_stats = False
    keep_null_basis = False

    def __init__(self, editor: Editor) -> None:
        self.editor = editor
        self.hp = editor.hp

    def prepare(self) -> None:
        """Once per stream, on the pre-edit model (statistics, projections)."""

    def edit_batch(self, requests: Sequence[EditRequest]) -> dict:
        raise NotImplementedError

    # -- shared helpers ------------------------------------------------------------------------
    def target_config(self, layer: int, site: str) -> TargetConfig:
        hp = self.hp
        return TargetConfig(layer=layer, site=site, steps=hp.v_num_grad_steps, lr=hp.v_lr,
                            weight_decay=hp.v_weight_decay, clamp_norm_factor=hp.clamp_norm_factor,
                            kl_factor=hp.kl_factor, fact_token=hp.fact_token,
                            max_seqs_per_forward=hp.v_max_seqs_per_forward)

    def null_space(self, layer: int) -> torch.Tensor:
        """AlphaEdit projection of ``layer`` (computed once per stream from the pre-edit statistics)."""
        st = self.editor.state
        key = f"projection.{layer}"
        if key not in st.tensors:
            ns = null_space_projection(self.editor.covariance(layer), self.hp.nullspace_mode,
                                       self.hp.nullspace_threshold, self.hp.nullspace_energy,
                                       label=f"layer {layer}: ", decomposition=self.hp.nullspace_decomposition,
                                       dtype=self.hp.nullspace_dtype)
            st.tensors[key] = ns.projection
            if self.keep_null_basis:
                st.tensors[f"nullspace_basis.{layer}"] = ns.basis
            st.info[f"nullspace_rank.{layer}"] = ns.rank
            st.info[f"nullspace_mode.{layer}"] = ns.mode
            st.info[f"cov_eigen_quantiles.{layer}"] = [float(x) for x in torch.quantile(
                ns.eigenvalues, torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64))]
            self.record_null_space_energy(layer, ns.projection, ns.rank)
        return st.tensors[key]

    def record_null_space_energy(self, layer: int, projection: torch.Tensor, rank: int) -> None:
        """Keep ``tr(PΣ)/tr(Σ)`` with the state (and the edit rows), and say when the projection protects little
        of the preserved keys: an absolute threshold tuned on a large model can keep most directions of a small
        one (SmolLM2, 2e-2: rank ~1000 of 1536, a third of the key energy)."""
        share = null_space_energy(projection, self.editor.covariance(layer))
        self.editor.state.info[f"nullspace_energy.{layer}"] = share
        if share > NULLSPACE_ENERGY_WARN:
            log.warning("layer %d: the null space (rank %d of %d) holds %.0f%% of the statistics' key energy, so "
                        "updates projected on it still change that share of preserved keys' outputs (a lower "
                        "nullspace_threshold, or nullspace_mode: energy, protects more at some efficacy cost)",
                        layer, rank, projection.shape[0], 100 * share)


class LocateThenEdit(Solver):
    """MEMIT-family pipeline: ``Z`` at the last layer; per layer ``K``, ``R_l = (Z − H)/(m − i)``, update."""

    needs_stats = True

    def layer_update(self, layer: int, keys: torch.Tensor, resid: torch.Tensor, w: torch.Tensor,
                     info: dict) -> torch.Tensor:
        raise NotImplementedError

    def after_batch(self, requests: Sequence[EditRequest], groups: Sequence[Sequence[str]]) -> dict:
        return {}

    def edit_batch(self, requests: Sequence[EditRequest]) -> dict:
        ed, hp = self.editor, self.hp
        groups = ed.templates("memit")
        contexts = [c for g in groups for c in g]
        layers, targets = self.select_layers(requests, groups)
        self.batch_layers = list(layers)
        z_layer = layers[-1]
        if targets is None:
            targets = compute_targets(ed.lm, requests, contexts, self.target_config(z_layer, "block"))
        layer_rows = []
        for i, layer in enumerate(layers):
            keys, h = compute_keys_and_outputs(ed.lm, requests, groups, layer, z_layer, hp.fact_token)
            resid = (targets.z - h) / (len(layers) - i)
            w = ed.lm.adapter.get_weight(layer)
            info: dict = {"layer": layer, "resid_norm": float(resid.norm()),
                          "key_norm_mean": float(keys.norm(dim=0).mean())}
            delta = self.layer_update(layer, keys.double(), resid.double(), w, info)
            ed.add_delta(layer, delta.float())
            info["update_norm"] = float(delta.norm())
            layer_rows.append(info)
        extra = self.after_batch(requests, groups)
        return {"targets": targets, "layer_rows": layer_rows, "layers": list(layers), **extra}

    def select_layers(self, requests: Sequence[EditRequest], groups) -> tuple[list[int], Targets | None]:
        """The layers of this batch (fixed by default) and, if already computed, their targets."""
        return list(self.hp.layers), None

    def cache_update(self, requests: Sequence[EditRequest], groups: Sequence[Sequence[str]]) -> dict:
        """``C_p^l += K^l K^lᵀ`` with keys recomputed on the edited model, all layers in one forward."""
        ed, hp = self.editor, self.hp
        items = template_items(requests, groups)
        from .keys import average_over_templates

        flat, _ = read_at_fact_tokens(ed.lm, items, getattr(self, "batch_layers", hp.layers), [], hp.fact_token)
        new_keys = {}
        for layer in flat:
            k = average_over_templates(flat[layer], len(requests), groups).T.contiguous()  # (d_in, u)
            name = f"cache_c.{layer}"
            prev = ed.state.tensors.get(name)
            kk = (k.double() @ k.double().T).float()
            ed.state.tensors[name] = kk if prev is None else prev + kk
            new_keys[layer] = k
        return {"cache_keys": new_keys}


class Memit(LocateThenEdit):
    """MEMIT (§3.2): ``Δ = R Kᵀ (λΣ + [C_p] + K Kᵀ)⁻¹``; optional null-space plug-in ``Δ ← Δ P``."""

    name = "memit"

    def prepare(self) -> None:
        self.editor.covariances(self.hp.layers)
        if self.hp.project == "nullspace":
            for layer in self.hp.layers:
                self.null_space(layer)

    def layer_update(self, layer, keys, resid, w, info):
        hp = self.hp
        cache = self.editor.state.tensors.get(f"cache_c.{layer}") if hp.sequential_cache else None
        delta, rep = memit_delta(keys, resid, self.editor.covariance(layer), hp.mom2_update_weight, cache,
                                 hp.solve_dtype, label=f"memit layer {layer}")
        info["regularised_solve"] = rep.regularised
        if hp.project == "nullspace":
            delta = delta @ self.null_space(layer).double()
            info["nullspace_rank"] = self.editor.state.info[f"nullspace_rank.{layer}"]
            info["nullspace_energy"] = self.editor.state.info.get(f"nullspace_energy.{layer}")
        return delta

    def after_batch(self, requests, groups):
        return self.cache_update(requests, groups) if self.hp.sequential_cache else {}


class AlphaEdit(LocateThenEdit):
    """AlphaEdit (§3.3): ``(P(KKᵀ + C_p) + αI) X = P K Rᵀ``, ``Δ = Xᵀ`` (so ``Δ = Δ P``); ``C_p`` grows."""

    name = "alphaedit"

    def prepare(self) -> None:
        for layer in self.hp.layers:
            self.null_space(layer)

    def layer_update(self, layer, keys, resid, w, info):
        alpha = self.hp.L2
        if self.hp.L2_relative is not None:
            alpha = self.hp.L2_relative * float(self.editor.covariance(layer).double().trace())
        info["L2"] = alpha
        delta, rep = alphaedit_delta(keys, resid, self.null_space(layer), self.editor.state.tensors.get(
            f"cache_c.{layer}"), alpha, self.hp.solve_dtype, label=f"alphaedit layer {layer}")
        info["regularised_solve"] = rep.regularised
        info["nullspace_rank"] = self.editor.state.info[f"nullspace_rank.{layer}"]
        info["nullspace_energy"] = self.editor.state.info.get(f"nullspace_energy.{layer}")
        return delta

    def after_batch(self, requests, groups):
        return self.cache_update(requests, groups)


class Rome(Solver):
    """ROME (§3.1), one request at a time: ``Δ = r uᵀ``, ``u = Σ⁻¹k*/‖·‖``, ``r = (v* − W k − b)/(k·u)``."""

    name = "rome"
    template_style = "rome"

    @property
    def needs_stats(self) -> bool:  # type: ignore[override]
        return self.hp.mom2_adjustment

    def prepare(self) -> None:
        if self.hp.mom2_adjustment:
            self.editor.covariances(self.hp.layers)

    def edit_batch(self, requests):
        ed, hp = self.editor, self.hp
        layer = hp.layers[0]
        groups = ed.templates("rome")
        contexts = groups[0]
        rows, layer_rows, steps = [], [], 0
        z_all, h0_all, d_all = [], [], []
        for r in requests:
            flat, _ = read_at_fact_tokens(ed.lm, template_items([r], groups), [layer], [], hp.fact_token)
            k_star = flat[layer].mean(0).double()
            k_bare = flat[layer][0].double()
            left = k_star
            if hp.mom2_adjustment:
                left, _rep = robust_solve(ed.covariance(layer).double(), k_star, f"rome layer {layer}",
                                          hp.solve_dtype)
            tg = compute_targets(ed.lm, [r], contexts, self.target_config(layer, "mlp"))
            steps += tg.steps_run
            key = k_star if hp.rome_key == "rrome" else k_bare
            bias = ed.lm.adapter.down_proj(layer).bias
            delta = rome_delta(ed.lm.adapter.get_weight(layer, torch.float64), None if bias is None else
                               bias.detach(), key, left, tg.z[:, 0])
            ed.add_delta(layer, delta.float())
            rows.extend(tg.rows)
            z_all.append(tg.z)
            h0_all.append(tg.h0)
            d_all.append(tg.delta)
            layer_rows.append({"layer": layer, "case_id": r.case_id, "update_norm": float(delta.norm()),
                               "right_vector_norm": float(delta.norm())})  # ‖r uᵀ‖ = ‖r‖
        targets = Targets(torch.cat(z_all, 1), torch.cat(h0_all, 1), torch.cat(d_all, 1), rows, steps)
        return {"targets": targets, "layer_rows": layer_rows}


class FineTune(Solver):
    """FT-L / FT-M (§3.7): Adam on the edited weights, optional L∞ ball around ``W0``, optional ``Δ P``."""

    name = "ft"
    template_style = None

    @property
    def needs_stats(self) -> bool:  # type: ignore[override]
        return self.hp.project == "nullspace"

    def prepare(self) -> None:
        if self.hp.project == "nullspace":
            for layer in self.hp.layers:
                self.null_space(layer)


    def edit_batch(self, requests):
        ed, hp = self.editor, self.hp
        model, ad = ed.lm.model, ed.lm.adapter
        params = [ad.weight_param(layer) for layer in hp.layers]
        w0 = [p.detach().clone() for p in params]
        requires = [p.requires_grad for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
        examples = nll_examples(ed.lm.tokenizer, requests, hp.objective)
        pid = pad_id(ed.lm.tokenizer)
        losses: list[float] = []
        steps = 0
        try:
            for _epoch in range(hp.num_steps):
                epoch = []
                for s in range(0, len(examples), hp.batch_size):
                    mb = examples[s:s + hp.batch_size]
                    loss = examples_nll(model, mb, pid, ad.device)
                    steps += 1
                    epoch.append(float(loss.detach()))
                    if epoch[-1] < 1e-2:  # [REF] skip the step once this mini-batch is fit
                        continue
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    if hp.norm_constraint is not None:
                        with torch.no_grad():
                            for p, p0 in zip(params, w0, strict=True):
                                p.copy_(torch.clamp(p, p0 - hp.norm_constraint, p0 + hp.norm_constraint))
                losses.append(sum(epoch) / len(epoch))
                if losses[-1] < 1e-2:
                    break
        finally:
            for p, r in zip(model.parameters(), requires, strict=True):
                p.requires_grad_(r)
        layer_rows = []
        with torch.no_grad():
            for layer, p, p0 in zip(hp.layers, params, w0, strict=True):
                delta = ad.to_math(p.detach() - p0).float()
                p.copy_(p0)  # restore, then apply through the editor (masters, NaN checks, rollback)
                if hp.project == "nullspace":
                    delta = (delta.double() @ self.null_space(layer).double()).float()
                ed.add_delta(layer, delta)
                layer_rows.append({"layer": layer, "update_norm": float(delta.norm())})
        rows = [{"case_id": r.case_id, "ft_final_loss": losses[-1] if losses else None,
                 "ft_epochs": len(losses)} for r in requests]
        return {"targets": None, "layer_rows": layer_rows, "rows": rows, "steps": steps}


SOLVERS: dict[str, type[Solver]] = {"memit": Memit, "alphaedit": AlphaEdit, "rome": Rome, "ft": FineTune}


def _register_more() -> None:
    from .mose import Mose, MoseOft
    from .same import Same

    SOLVERS.update({"mose": Mose, "mose_oft": MoseOft, "same": Same})


_register_more()
