"""``shift/v1``: hidden-representation shift between the unedited and the edited model (methods.md §5.6).

States: the block output (residual stream after the block) of each chosen layer, read with a forward
hook on the adapter's block module, at the subject's last token (``position: subject_last``; the last
token for a prompt without a subject, or with ``position: last``). BEFORE states come from the base
weights (the ``base`` context manager), AFTER states from the model as it is.

Projection: per layer, PCA fitted in fp64 on the BEFORE states of records ``0 .. n_basis−1`` of the
record list (not of the shard, so every shard and every step projects into the same basis), centred at
their mean, each axis sign-fixed so that its largest-magnitude component is positive. Rows carry each
prompt's pre/post coordinates; the set-level numbers are computed by :func:`shift_summary` over the
concatenated rows of a (step, layer):

- ``D1``, ``D2``: overlap coefficient ∫ min(p, q) of Gaussian KDEs (Scott bandwidth) of the pre and
  post coordinates along PC1 / PC2, on ``kde_grid`` points spanning the joint range ± 3 bandwidths, each
  density normalised on the grid (1 = identical marginals, 0 = disjoint);
- ``H``: symmetric Hausdorff distance between the 2-D point sets;
- ``P``: share of post points inside the pre points' 95 % ellipse (2-D Gaussian fit, Mahalanobis² ≤ 5.991),
  beside ``P_pre``, the share of the pre points themselves (what P is without any shift);
- ``centroid_shift_2d``: distance between the pre and post centroids in the plane, and the per-prompt
  means of the full-space ``l2_shift`` (‖h_post − h_pre‖), ``rel_shift`` and ``cosine_drift``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...models.adapters import ModelAdapter, block_hidden
from ..records import prompt_text, request_of
from ..scoring import PromptEncoder, model_device, plan_batches
from .protocols import SHIFT
from .settings import ShiftSettings

CHI2_95_2D = 5.991


@dataclass(frozen=True)
class ShiftPrompt:
    prompt_id: str
    text: str
    subject: str | None = None


def shift_prompts_from(records: Sequence[Any]) -> list[ShiftPrompt]:
    """Prompts from ShiftPrompt / dicts ``{id?, prompt, subject?}`` / strings / CounterFact-ZsRE records."""
    out = []
    for i, r in enumerate(records):
        if isinstance(r, ShiftPrompt):
            out.append(r)
        elif isinstance(r, str):
            out.append(ShiftPrompt(str(i), r))
        elif isinstance(r, dict):
            if not r.get("prompt"):
                raise ValueError(f"shift prompt {i} has no 'prompt'")
            out.append(ShiftPrompt(str(r.get("id", i)), str(r["prompt"]), r.get("subject")))
        else:  # an edit-dataset record: its rewrite prompt with the subject filled in (known facts)
            req = request_of(r)
            out.append(ShiftPrompt(str(req.case_id), prompt_text(req), req.subject))
    return out


def load_prompt_file(path: str | Path) -> list[ShiftPrompt]:
    """``.txt``: one prompt a line; ``.jsonl``/``.json``: ``{id?, prompt, subject?}`` objects."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".txt":
        return [ShiftPrompt(str(i), line) for i, line in enumerate(x for x in text.splitlines() if x.strip())]
    raw = json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines()
                                                                  if x.strip()]
    return shift_prompts_from(raw)


def _position(tok: Any, encoder: PromptEncoder, p: ShiftPrompt, ids: list[int], mode: str) -> int:
    if mode == "subject_last" and p.subject and p.subject in p.text:
        # subject_last = n(prefix + subject) − 1, BOS included (methods.md §2.2); rfind: the last mention
        end = p.text.rfind(p.subject) + len(p.subject)
        return len(encoder.encode_prefixes([p.text[:end]])[0]) - 1
    return len(ids) - 1


@torch.no_grad()
def hidden_states(model: Any, tokenizer: Any, prompts: Sequence[ShiftPrompt], layers: Sequence[int],
                  position: str = "subject_last", max_batch_size: int = 64) -> dict[int, torch.Tensor]:
    """``{layer: (n_prompts, d_model) fp32}`` block outputs at the chosen token, right-padded batches."""
    adapter = ModelAdapter(model)
    encoder = PromptEncoder(tokenizer)
    ids = encoder.encode_prefixes([p.text for p in prompts])
    pos = [_position(tokenizer, encoder, p, x, position) for p, x in zip(prompts, ids, strict=True)]
    out = {layer: torch.zeros(len(prompts), 0) for layer in layers}
    chunks: dict[int, list[tuple[list[int], torch.Tensor]]] = {layer: [] for layer in layers}
    dev = model_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    captured: dict[int, torch.Tensor] = {}
    hooks = []
    for layer in layers:
        def hook(_m, _args, output, layer=layer):
            captured[layer] = block_hidden(output)
        hooks.append(adapter.block(layer).register_forward_hook(hook))
    try:
        for batch in plan_batches([len(x) for x in ids], 1 << 30, max_batch_size):
            width = max(len(ids[i]) for i in batch)
            inp = torch.tensor([ids[i] + [pad] * (width - len(ids[i])) for i in batch], device=dev)
            mask = torch.tensor([[1] * len(ids[i]) + [0] * (width - len(ids[i])) for i in batch], device=dev)
            captured.clear()
            model(input_ids=inp, attention_mask=mask, use_cache=False)
            rows = torch.arange(len(batch), device=dev)
            at = torch.tensor([pos[i] for i in batch], device=dev)
            for layer in layers:
                chunks[layer].append((batch, captured[layer][rows, at].float().cpu()))
    finally:
        for h in hooks:
            h.remove()
    for layer in layers:
        d = chunks[layer][0][1].shape[-1]
        full = torch.zeros(len(prompts), d)
        for batch, vals in chunks[layer]:
            full[torch.tensor(batch)] = vals
        out[layer] = full
    return out


def pca_basis(states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean (d,), axes (2, d))`` of the states, fp64, each axis sign-fixed (largest |component| > 0)."""
    x = states.double()
    mean = x.mean(dim=0)
    _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
    axes = vh[:2].clone()
    if axes.shape[0] < 2:  # fewer than 2 directions of variation: pad with zeros (coordinates collapse)
        axes = torch.cat([axes, torch.zeros(2 - axes.shape[0], x.shape[1], dtype=x.dtype)])
    for a in axes:
        j = int(a.abs().argmax())
        if a[j] < 0:
            a.neg_()
    return mean, axes


def _basis_key(prompts: Sequence[ShiftPrompt], layers: Sequence[int], position: str) -> str:
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{position}|{list(layers)}".encode())
    for p in prompts:
        h.update(f"{p.prompt_id}\x00{p.text}\x00{p.subject}\x01".encode())
    return h.hexdigest()


def shift_rows(model: Any, tokenizer: Any, all_prompts: Sequence[ShiftPrompt], start: int, stop: int,
               settings: ShiftSettings, base: Callable[[], AbstractContextManager[Any]] | None,
               cache: dict[Any, Any] | None = None) -> list[dict[str, Any]]:
    if base is None:
        raise ValueError("the shift suite needs base=use_base (a context manager under which the model carries "
                         "the unedited weights): BEFORE states are hidden states of the base model")
    if start >= stop:
        return []
    n_layers = ModelAdapter(model).n_layers
    layers = list(settings.layers) if settings.layers is not None else list(range(n_layers))
    bad = [x for x in layers if x >= n_layers]
    if bad:
        raise ValueError(f"shift layers {bad} out of range for a model with {n_layers} layers")
    shard = list(all_prompts[start:stop])
    basis_prompts = list(all_prompts[:min(settings.n_basis, len(all_prompts))])
    opts = dict(position=settings.position, max_batch_size=settings.max_batch_size)
    bkey = ("shift-basis", _basis_key(basis_prompts, layers, settings.position))
    basis = cache.get(bkey) if cache is not None else None
    pre_key = ("shift-pre", _basis_key(shard, layers, settings.position))
    pre = cache.get(pre_key) if cache is not None else None
    if basis is None or pre is None:
        with base() if base is not None else nullcontext():
            if basis is None:
                states = hidden_states(model, tokenizer, basis_prompts, layers, **opts)
                basis = {layer: pca_basis(states[layer]) for layer in layers}
            if pre is None:
                pre = hidden_states(model, tokenizer, shard, layers, **opts)
        if cache is not None:
            cache[bkey], cache[pre_key] = basis, pre
    post = hidden_states(model, tokenizer, shard, layers, **opts)
    bhash = bkey[1]
    rows: list[dict[str, Any]] = []
    for layer in layers:
        mean, axes = basis[layer]
        a, b = pre[layer].double(), post[layer].double()
        pa, pb = ((a - mean) @ axes.T).tolist(), ((b - mean) @ axes.T).tolist()
        l2 = (b - a).norm(dim=-1)
        na, nb = a.norm(dim=-1), b.norm(dim=-1)
        cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
        for i, p in enumerate(shard):
            rows.append({
                "protocol": SHIFT.id, "record_index": start + i, "prompt_id": p.prompt_id, "layer": layer,
                "position": settings.position if p.subject else "last",
                "l2_shift": float(l2[i]), "rel_shift": float(l2[i] / na[i]) if na[i] > 0 else float("nan"),
                "cosine_drift": float(1.0 - cos[i]), "norm_pre": float(na[i]), "norm_post": float(nb[i]),
                "pre_x": pa[i][0], "pre_y": pa[i][1], "post_x": pb[i][0], "post_y": pb[i][1],
                "basis_n": len(basis_prompts), "basis_id": bhash,
            })
    return rows


# -- set-level statistics ---------------------------------------------------------------------------------
def kde_overlap(x: np.ndarray, y: np.ndarray, grid: int = 512) -> float:
    """Overlap coefficient ∫ min(p, q) of Gaussian KDEs (Scott bandwidth) of two 1-D samples."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2 or len(y) < 2:
        return float("nan")

    def bandwidth(v: np.ndarray) -> float:
        s = float(v.std(ddof=1))
        return s * len(v) ** (-1 / 5) if s > 0 else 0.0

    hx, hy = bandwidth(x), bandwidth(y)
    scale = max(np.abs(np.concatenate([x, y])).max(), 1.0)
    floor = 1e-6 * scale  # a set without spread becomes a narrow bump rather than a division by zero
    hx, hy = max(hx, floor), max(hy, floor)
    lo = min(x.min(), y.min()) - 3 * max(hx, hy)
    hi = max(x.max(), y.max()) + 3 * max(hx, hy)
    g = np.linspace(lo, hi, grid)

    def density(v: np.ndarray, h: float) -> np.ndarray:
        d = np.exp(-0.5 * ((g[:, None] - v[None, :]) / h) ** 2).sum(axis=1)
        area = np.trapezoid(d, g)
        return d / area if area > 0 else d

    return float(np.trapezoid(np.minimum(density(x, hx), density(y, hy)), g))


def hausdorff(a: np.ndarray, b: np.ndarray) -> float:
    d = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    return float(max(d.min(axis=1).max(), d.min(axis=0).max()))


def inside_ellipse(pre: np.ndarray, post: np.ndarray, chi2: float = CHI2_95_2D) -> float:
    mu = pre.mean(axis=0)
    cov = np.cov(pre.T) + 1e-12 * np.eye(2)
    diff = post - mu
    m2 = np.einsum("ij,jk,ik->i", diff, np.linalg.pinv(cov), diff)
    return float((m2 <= chi2).mean())


def shift_summary(rows: Sequence[dict[str, Any]], grid: int = 512) -> dict[int, dict[str, float]]:
    """Per layer (rows of ONE step): D1, D2, H, P and the means of the per-prompt shifts."""
    by_layer: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        by_layer.setdefault(int(r["layer"]), []).append(r)
    out: dict[int, dict[str, float]] = {}
    for layer, g in sorted(by_layer.items()):
        pre = np.array([[r["pre_x"], r["pre_y"]] for r in g], dtype=np.float64)
        post = np.array([[r["post_x"], r["post_y"]] for r in g], dtype=np.float64)
        out[layer] = {
            "n": len(g),
            "l2_shift": float(np.mean([r["l2_shift"] for r in g])),
            "rel_shift": float(np.nanmean([r["rel_shift"] for r in g])),
            "cosine_drift": float(np.mean([r["cosine_drift"] for r in g])),
            "D1": kde_overlap(pre[:, 0], post[:, 0], grid),
            "D2": kde_overlap(pre[:, 1], post[:, 1], grid),
            "H": hausdorff(pre, post),
            "P": inside_ellipse(pre, post) if len(g) >= 3 else float("nan"),
            "P_pre": inside_ellipse(pre, pre) if len(g) >= 3 else float("nan"),  # reference: pre points' own share
            "centroid_shift_2d": float(np.linalg.norm(post.mean(axis=0) - pre.mean(axis=0))),
        }
    return out
