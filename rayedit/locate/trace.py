"""Causal tracing (ROME, Meng et al. 2022, §2.1): where does a model recall a fact?

For a fact (subject s, prompt, true object o) three runs are compared:

1. **clean**: the prompt as is; every hidden state of the traced kinds is recorded;
2. **corrupted**: Gaussian noise ``ε ~ N(0, ν²)`` is added to the input embeddings of the subject's tokens,
   ``ν = noise_multiplier × σ`` with ``σ`` the standard deviation of the embedding coordinates of the
   subject tokens of the traced facts (ROME: 3σ); ``samples`` noise draws per fact, fixed seeds;
3. **corrupted-with-restoration**: the corrupted run, except that one state, the output of ``kind`` ∈
   {hidden (block output / residual stream), mlp (MLP output), attn (attention output)} at one layer and
   one token position, is set back to its clean value.

The **indirect effect** of a state is ``P_restored(o) − P_corrupted(o)``, the **total effect** of the
subject is ``P_clean(o) − P_corrupted(o)``; probabilities are means over the noise draws (as ROME).
``P(o)`` is the teacher-forced probability of all of the object's tokens ([OURS]: ROME scores the first
token only; for single-token objects the two agree).

All restorations of one fact are rows of a few batched forwards: row ``(r, s)`` is restoration ``r``
with noise draw ``s``, and hooks on the traced modules copy clean states into exactly the rows that
restore them, so one forward handles many (layer, position) restorations. Everything is deterministic:
the noise of a fact is drawn from a generator seeded by (seed, case_id) and is the same for every
restoration of that fact.

No Ray, no boto3: the runtime shards facts over replicas and calls :func:`trace_facts` per shard.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..editing.hooks import hooks, replace_hidden
from ..editing.tokens import encode, n_tokens, target_ids
from ..models.adapters import block_hidden

KINDS = ("hidden", "mlp", "attn")
ROLES = ("before_subject", "subject_first", "subject_middle", "subject_last", "after_subject", "further", "last")
TRACE_FORMAT = "rayedit-trace/v1"
#: attention modules relative to a decoder block, per adapter family (the adapter knows MLPs, not attention)
ATTN_MODULE = {"gpt2": "attn", "gptj": "attn", "gpt_neox": "attention", "llama": "self_attn",
               "mistral": "self_attn", "qwen2": "self_attn", "qwen3": "self_attn"}
NOISE_RULE = ("nu = {mult:g} x std of the input-embedding coordinates of the subject tokens of the {n} traced "
              "facts (ROME 3-sigma rule)")


@dataclass(frozen=True)
class TraceFact:
    """One fact to trace: ``prompt`` has one ``{}`` for ``subject``; ``target`` is the true object."""

    case_id: str
    prompt: str
    subject: str
    target: str

    @property
    def text(self) -> str:
        return self.prompt.replace("{}", self.subject)


@dataclass(frozen=True)
class TraceSettings:
    kinds: tuple[str, ...] = KINDS
    noise_multiplier: float = 3.0  # ν = multiplier × σ(subject embeddings) [PAPER] ROME: 3
    noise: float | None = None  # absolute ν (overrides the multiplier rule)
    samples: int = 10  # noise draws per fact [REF] ROME: 10
    window: int = 1  # layers restored around the traced one (ROME's figures use 10 for mlp/attn)
    seed: int = 0
    max_rows: int = 512  # sequences per forward (memory/speed only; results do not depend on it)
    # [OURS] restore only the tokens of these roles (None: every token, as ROME). The window is chosen from
    # subject_last alone, so ("subject_last", "last") costs ~2/n_tokens of a full trace (SmolLM2: 1/6).
    roles: tuple[str, ...] | None = None
    # [OURS] restore nothing for a fact the clean model does not predict (top-1 ≠ the object's first token): it
    # gives one row of kind "clean" (its p_clean) instead. ROME built known_1000 with this criterion on GPT-2 XL;
    # SmolLM2-135M predicts ~6 % of those facts, so a trace of them samples many and pays for few.
    known_only: bool = False

    def __post_init__(self) -> None:
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise ValueError(f"unknown trace kinds {bad}; choose from {', '.join(KINDS)}")
        if self.samples < 1 or self.window < 1 or self.max_rows < 1:
            raise ValueError("samples, window and max_rows must be >= 1")
        if self.noise_multiplier <= 0 or (self.noise is not None and self.noise <= 0):
            raise ValueError("the noise level must be positive")
        if self.roles is not None:
            bad = [r for r in self.roles if r not in ROLES]
            if bad or not self.roles:
                raise ValueError(f"unknown token roles {bad}; choose from {', '.join(ROLES)}")

    def to_dict(self) -> dict[str, Any]:
        d = {**asdict(self), "kinds": list(self.kinds)}
        if self.roles is None:
            d.pop("roles")  # a full trace keeps the identity it had before roles existed (resume)
        else:
            d["roles"] = list(self.roles)
        if not self.known_only:
            d.pop("known_only")  # likewise
        return d


def facts_from_records(records: Iterable[Any]) -> list[TraceFact]:
    """Trace facts from EditRequests or dataset records: the *true* object is traced.

    CounterFact records and requests use ``target_true``; a ZsRE record (no ``target_true``) uses its
    ``target_new``, which is the true answer under the default ``zsre_target: answers0``.
    """
    out: list[TraceFact] = []
    for rec in records:
        req = getattr(rec, "request", rec)
        target = getattr(req, "target_true", None) or getattr(rec, "target_true", None)
        if target is None and not hasattr(rec, "neighborhood_prompts"):
            target = req.target_new  # ZsRE answers0: the model's true answer
        if target is None:
            raise ValueError(f"record {req.case_id!r} has no true target to trace")
        out.append(TraceFact(str(req.case_id), req.prompt, req.subject, target))
    return out


# --- tokens ---------------------------------------------------------------------------------------
@dataclass
class _Encoded:
    ids: list[int]  # prompt tokens (with BOS if the tokenizer adds one)
    target: list[int]  # object tokens
    subj: tuple[int, int]  # [first, last] subject token positions (inclusive)

    @property
    def n_prompt(self) -> int:
        return len(self.ids)


def _encode(tok, fact: TraceFact) -> _Encoded:
    """Token ids and the subject's token span, from character offsets when the tokenizer gives them.

    Counting the tokens of the prefix alone is off by one for BPE tokenizers when the prefix ends with a
    space ("The birthplace of " has a lone space token that merges into the subject's first token in
    context), so the span comes from the offsets of the tokens overlapping the subject's characters.
    """
    prefix = fact.prompt.split("{}", 1)[0]
    ids = encode(tok, fact.text)
    first = last = -1
    try:
        offsets = tok(fact.text, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, TypeError, ValueError, KeyError):
        offsets = None
    if offsets is not None and len(offsets) == len(ids):
        a, b = len(prefix), len(prefix) + len(fact.subject)
        inside = [i for i, (s, e) in enumerate(offsets) if e > s and s < b and e > a]
        if inside:
            first, last = inside[0], inside[-1]
    if first < 0:  # slow tokenizers: token counts (methods.md §2.2), the prefix without its trailing space
        first = n_tokens(tok, prefix.rstrip()) if prefix.strip() else n_tokens(tok, "")
        last = n_tokens(tok, prefix + fact.subject) - 1
    if not 0 <= first <= last < len(ids):
        raise ValueError(f"fact {fact.case_id!r}: cannot locate the subject tokens of {fact.subject!r}")
    return _Encoded(ids, target_ids(tok, fact.text, fact.target), (first, last))


def token_role(pos: int, enc: _Encoded) -> str:
    """ROME's token groups: subject first/middle/last, first subsequent token, further tokens, last token."""
    first, last = enc.subj
    if pos == enc.n_prompt - 1 and pos > last:
        return "last"
    if pos == last:
        return "subject_last"
    if pos == first:
        return "subject_first"
    if first < pos < last:
        return "subject_middle"
    if pos == last + 1:
        return "after_subject"
    return "before_subject" if pos < first else "further"


# --- noise ----------------------------------------------------------------------------------------
def embedding_std(lm, facts: Sequence[TraceFact]) -> float:
    """σ of the input-embedding coordinates of the subject tokens (in context) of ``facts``."""
    emb = lm.model.get_input_embeddings()
    rows = []
    for f in facts:
        enc = _encode(lm.tokenizer, f)
        rows.append(torch.tensor(enc.ids[enc.subj[0]: enc.subj[1] + 1]))
    if not rows:
        raise ValueError("no facts to measure the embedding scale on")
    with torch.no_grad():
        vecs = emb.weight.detach()[torch.cat(rows).to(emb.weight.device)].float()
    return float(vecs.std())


def noise_level(lm, facts: Sequence[TraceFact], settings: TraceSettings) -> tuple[float, str]:
    """(ν, the rule that produced it)."""
    if settings.noise is not None:
        return float(settings.noise), f"nu = {settings.noise:g} (given)"
    sigma = embedding_std(lm, facts)
    return settings.noise_multiplier * sigma, NOISE_RULE.format(mult=settings.noise_multiplier, n=len(facts))


def _fact_generator(seed: int, case_id: str) -> torch.Generator:
    digest = hashlib.blake2b(f"{seed}:{case_id}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


# --- modules --------------------------------------------------------------------------------------
def traced_module(lm, kind: str, layer: int) -> torch.nn.Module:
    """The module whose output is state ``kind`` at ``layer``."""
    ad = lm.adapter
    if kind == "hidden":
        return ad.block(layer)
    if kind == "mlp":
        return ad.mlp(layer)
    if kind == "attn":
        block = ad.block(layer)
        name = ATTN_MODULE.get(ad.model_type)
        for cand in ([name] if name else []) + ["self_attn", "attn", "attention"]:
            if cand and hasattr(block, cand):
                return getattr(block, cand)
        raise ValueError(f"no attention module known for model type {ad.model_type!r}")
    raise ValueError(f"unknown trace kind {kind!r}")


def _restored_layers(layer: int, window: int, n_layers: int) -> range:
    """ROME's window: ``window`` layers centred on ``layer``, clipped to the model."""
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


# --- tracing --------------------------------------------------------------------------------------
@dataclass
class _Plan:
    """Restorations of one fact: index 0 is 'none' (the corrupted baseline)."""

    items: list[tuple[str, int, int] | None] = field(default_factory=lambda: [None])


def _forward_probs(lm, enc: _Encoded, noise: torch.Tensor, plan: _Plan, rows: list[tuple[int, int]],
                   clean: dict[tuple[str, int], torch.Tensor], window: int) -> torch.Tensor:
    """P(object) for each (restoration index, noise draw) row, in one forward."""
    model, ad = lm.model, lm.adapter
    device = ad.device
    seq = enc.ids + enc.target[:-1]
    x = torch.tensor([seq] * len(rows), device=device)
    mask = torch.ones_like(x)
    first, last = enc.subj
    draws = torch.tensor([s for _, s in rows], device=device)

    def add_noise(_m, _a, out):
        h = out.clone()
        h[:, first:last + 1] += noise[draws].to(h.dtype)
        return h

    # (kind, layer) → rows restoring it and their positions
    patch: dict[tuple[str, int], tuple[list[int], list[int]]] = {}
    for row, (r, _s) in enumerate(rows):
        item = plan.items[r]
        if item is None:
            continue
        kind, layer, pos = item
        for lay in _restored_layers(layer, window, ad.n_layers):
            rr, pp = patch.setdefault((kind, lay), ([], []))
            rr.append(row)
            pp.append(pos)

    def restorer(key: tuple[str, int]):
        rr = torch.tensor(patch[key][0], device=device)
        pp = torch.tensor(patch[key][1], device=device)
        value = clean[key][pp]  # (n, d): clean state of this layer at each row's position

        def hook(_m, _a, out):
            h = block_hidden(out).clone()
            h[rr, pp] = value.to(h.dtype)
            return replace_hidden(out, h)

        return hook

    emb = model.get_input_embeddings()
    factories = [lambda: emb.register_forward_hook(add_noise)]
    for key in patch:
        mod = traced_module(lm, *key)
        factories.append(lambda mod=mod, key=key: mod.register_forward_hook(restorer(key)))
    with torch.no_grad(), hooks(factories):
        logits = model(input_ids=x, attention_mask=mask, use_cache=False).logits
    return _target_prob(logits, enc)


def _target_prob(logits: torch.Tensor, enc: _Encoded) -> torch.Tensor:
    lp = torch.log_softmax(logits.float(), dim=-1)
    start = enc.n_prompt - 1
    tgt = torch.tensor(enc.target, device=lp.device)
    pos = torch.arange(start, start + len(enc.target), device=lp.device)
    return lp[:, pos, tgt].sum(-1).exp()


def _clean_run(lm, enc: _Encoded, kinds: Sequence[str]) -> tuple[float, bool, dict[tuple[str, int], torch.Tensor]]:
    """P_clean(o), whether the model's top-1 next token is the object's first token, and all clean states."""
    states: dict[tuple[str, int], torch.Tensor] = {}

    def keeper(key):
        def hook(_m, _a, out):
            states[key] = block_hidden(out)[0].detach()
        return hook

    factories = [lambda mod=traced_module(lm, k, layer), key=(k, layer): mod.register_forward_hook(keeper(key))
                 for k in kinds for layer in range(lm.adapter.n_layers)]
    x = torch.tensor([enc.ids + enc.target[:-1]], device=lm.adapter.device)
    with torch.no_grad(), hooks(factories):
        logits = lm.model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits
    p = float(_target_prob(logits, enc)[0])
    known = int(logits[0, enc.n_prompt - 1].argmax()) == enc.target[0]
    return p, known, states


def trace_fact(lm, fact: TraceFact, nu: float, settings: TraceSettings = TraceSettings()) -> list[dict[str, Any]]:
    """Rows ``(case_id, kind, layer, position)`` with clean, corrupted and restored probabilities."""
    tok = lm.tokenizer
    enc = _encode(tok, fact)
    n_layers = lm.adapter.n_layers
    p_clean, known, clean = _clean_run(lm, enc, settings.kinds)
    tokens = tok.convert_ids_to_tokens(enc.ids)
    base = {"case_id": fact.case_id, "subject": fact.subject, "prompt": fact.text, "target": fact.target,
            "n_tokens": enc.n_prompt, "subject_first": enc.subj[0], "subject_last": enc.subj[1],
            "p_clean": p_clean, "p_corrupt": math.nan, "total_effect": math.nan, "known": known,
            "noise": nu, "samples": settings.samples, "window": settings.window, "seed": settings.seed,
            "format": TRACE_FORMAT}
    if settings.known_only and not known:
        return [{**base, "kind": "clean", "layer": -1, "position": -1, "token": "", "role": "none",
                 "p_restored": math.nan, "indirect_effect": math.nan}]
    n_subj = enc.subj[1] - enc.subj[0] + 1
    gen = _fact_generator(settings.seed, fact.case_id)
    noise = (torch.randn(settings.samples, n_subj, lm.adapter.d_model, generator=gen) * nu).to(lm.adapter.device)
    plan = _Plan()
    for kind in settings.kinds:
        for layer in range(n_layers):
            for pos in range(enc.n_prompt):
                if settings.roles is None or token_role(pos, enc) in settings.roles:
                    plan.items.append((kind, layer, pos))
    all_rows = [(r, s) for r in range(len(plan.items)) for s in range(settings.samples)]
    probs = torch.empty(len(all_rows))
    for a in range(0, len(all_rows), settings.max_rows):
        chunk = all_rows[a:a + settings.max_rows]
        probs[a:a + len(chunk)] = _forward_probs(lm, enc, noise, plan, chunk, clean, settings.window).cpu()
    per_item = probs.view(len(plan.items), settings.samples).mean(1)  # mean over noise draws (ROME)
    p_corrupt = float(per_item[0])
    base |= {"p_corrupt": p_corrupt, "total_effect": p_clean - p_corrupt}
    out: list[dict[str, Any]] = []
    for i, item in enumerate(plan.items[1:], start=1):
        kind, layer, pos = item  # type: ignore[misc]
        p = float(per_item[i])
        out.append({**base, "kind": kind, "layer": layer, "position": pos, "token": str(tokens[pos]),
                    "role": token_role(pos, enc), "p_restored": p, "indirect_effect": p - p_corrupt})
    return out


def trace_facts(lm, facts: Sequence[TraceFact], settings: TraceSettings = TraceSettings(), *,
                nu: float | None = None, noise_facts: Sequence[TraceFact] | None = None,
                extra_columns: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Trace every fact; ``ν`` from ``noise_facts`` (default: ``facts``) unless given.

    Shards of one trace pass the whole sample as ``noise_facts`` so that ν does not depend on sharding.
    """
    was_training = lm.model.training
    lm.model.eval()
    try:
        rule = None
        if nu is None:
            nu, rule = noise_level(lm, noise_facts or facts, settings)
        rows: list[dict[str, Any]] = []
        for f in facts:
            for r in trace_fact(lm, f, nu, settings):
                if rule:
                    r["noise_rule"] = rule
                if extra_columns:
                    r.update(extra_columns)
                rows.append(r)
        return rows
    finally:
        lm.model.train(was_training)


# --- aggregation and the suggested window ---------------------------------------------------------
@dataclass
class LayerEffects:
    """Mean indirect effect per layer for one (kind, token role), over the facts that count."""

    kind: str
    role: str
    effects: list[float]  # per layer
    n_facts: int
    rule: str  # which facts count


@dataclass
class WindowSuggestion:
    layers: list[int]
    score: float  # mean effect over the window
    width: int
    rule: str
    effects: LayerEffects

    def to_dict(self) -> dict[str, Any]:
        return {"layers": self.layers, "score": self.score, "width": self.width, "rule": self.rule,
                "kind": self.effects.kind, "role": self.effects.role, "effects": self.effects.effects,
                "n_facts": self.effects.n_facts, "facts_rule": self.effects.rule}


def _get(row: Any, key: str) -> Any:
    return row[key] if isinstance(row, dict) else getattr(row, key)


def layer_effects(rows: Iterable[Any], n_layers: int, kind: str = "mlp", role: str = "subject_last",
                  known_only: bool = True) -> LayerEffects:
    """Mean indirect effect per layer of ``kind`` restored at tokens of ``role``.

    With ``known_only`` (default) only facts the clean model gets right (top-1 next token = the object's
    first token) count, as ROME traces known facts; if none is known, every fact counts (and the rule says so).
    """
    sel = [r for r in rows if _get(r, "kind") == kind and _get(r, "role") == role]
    if known_only and any(bool(_get(r, "known")) for r in sel):
        sel = [r for r in sel if bool(_get(r, "known"))]
        rule = "facts whose clean top-1 next token is the object's first token"
    else:
        rule = "all traced facts" + (" (none was known by the model)" if known_only else "")
    sums = [0.0] * n_layers
    counts = [0] * n_layers
    facts = set()
    for r in sel:
        layer = int(_get(r, "layer"))
        sums[layer] += float(_get(r, "indirect_effect"))
        counts[layer] += 1
        facts.add(str(_get(r, "case_id")))
    effects = [s / c if c else math.nan for s, c in zip(sums, counts, strict=True)]
    return LayerEffects(kind, role, effects, len(facts), rule)


#: a window whose mean indirect effect stays below this probability locates nothing
UNINFORMATIVE = 1e-3


def default_width(n_layers: int) -> int:
    """Window width: the depth-proportional width of the hparams rule (2–5 layers, presets: ~5/32 of depth)."""
    return max(1, min(n_layers - 1, max(2, min(5, math.ceil(n_layers * 5 / 32)))))


def suggest_window(effects: LayerEffects, width: int | None = None) -> WindowSuggestion:
    """The ``width`` consecutive layers with the largest mean effect, never including the last layer.

    The last layer is excluded because an edit there can only act on the subject's own position (no
    later attention reads it) — the scan checks this. Ties go to the lower window.
    """
    n = len(effects.effects)
    if n < 2:
        raise ValueError("a suggested window needs a model with at least 2 layers")
    w = default_width(n) if width is None else int(width)
    w = max(1, min(w, n - 1))
    best: tuple[float, int] | None = None
    for start in range(0, n - w):  # windows inside layers 0 .. n-2
        vals = effects.effects[start:start + w]
        if any(math.isnan(v) for v in vals):
            continue
        score = sum(vals) / w
        if best is None or score > best[0] + 1e-12:
            best = (score, start)
    if best is None:
        raise ValueError("no layer has a measured effect")
    rule = (f"the window of {w} consecutive layers with the largest mean indirect effect of {effects.kind} "
            f"restoration at the {effects.role.replace('_', ' ')} token ({effects.rule}; {effects.n_facts} facts), "
            f"excluding the last layer ({n - 1}); ties to the lower window")
    if best[0] < UNINFORMATIVE:
        rule += (f". WARNING: no window reaches a mean effect of {UNINFORMATIVE:g}: the trace does not locate the "
                 "facts (an untrained model, or facts it does not know); choose layers by a scan")
    return WindowSuggestion(list(range(best[1], best[1] + w)), best[0], w, rule, effects)


def peak_layer(effects: LayerEffects) -> int:
    vals = [(-math.inf if math.isnan(v) else v) for v in effects.effects]
    return max(range(len(vals)), key=lambda i: vals[i])
