"""``uncertainty/v1``: SPUQ-style uncertainty growth Δ_U (methods.md §6).

For each probed fact the suite builds queries — the edit query S1 (role ``edit``) and neighbourhood
queries S2, S3, ... (role ``neighborhood``) — each with M paraphrases; it samples K answers per
paraphrase (nucleus sampling with per-row seeds, so pre and post use the same random numbers), embeds
the answers with one sentence-embedding model and computes

- ``U_alea = (1/M) Σ_j (1/K) Σ_i ‖h_i^(j) − c^(j)‖``  (spread of the answers to one wording),
- ``U_epis = mean_{j<l} ‖c^(j) − c^(l)‖``             (disagreement between wordings),
- ``U = ½ (U_alea + U_epis)``, ``Δ_U = (U_post − U_pre) / U_pre``.

Before/after. Two ways, same numbers (sampling is deterministic per fact, query, paraphrase and sample):

1. ``base=use_base`` (a context-manager factory under which the model carries the unedited weights):
   U_pre is measured in the same call (and memoised in ``cache`` when given), and the rows carry
   ``u_pre``, ``delta_u`` and ``delta_u_abs``;
2. no ``base``: rows carry U only; run the suite once on the unedited model (step 0) and join later with
   :func:`attach_delta_u` (the stored-rows design: no second model pass per step).

Paraphrase sources, recorded per query in ``paraphrase_source``: ``file`` (a probe file), ``toyworld``
(all of the relation's templates in the toy world), ``dataset`` (CounterFact rewrite prompt +
paraphrase_prompts; ZsRE src + rephrase), ``fallback`` when the dataset has fewer than M wordings
(padded with the fixed syntactic variants of :data:`SYNTACTIC_VARIANTS`, methods.md §6.1 [OURS]).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from ...editing.tokens import chunks_by_total
from ..records import case_id_of, prompt_text, request_of, str_list
from ..scoring import PromptEncoder, model_max_positions
from .protocols import UNCERTAINTY
from .sampling import decode_batch, row_seed
from .settings import UncertaintySettings

NAN = float("nan")
# [OURS] fallback wordings of one query when the dataset gives fewer than M (methods.md §6.1)
SYNTACTIC_VARIANTS = ("{}", "Complete the sentence: {}", "Fact: {}", "In other words, {}",
                      "Here is a true statement: {}", "Recall that {}", "As is well documented, {}",
                      "It is a fact that {}")


class ProbeQuery(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    role: Literal["edit", "neighborhood"]
    paraphrases: list[str] = Field(min_length=2)
    source: str = "file"


class ProbeFact(BaseModel):
    """One probed fact: its queries, each with ≥ 2 paraphrases (a line of a probe file)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    fact_id: str
    queries: list[ProbeQuery] = Field(min_length=1)


# -- U, Δ_U ---------------------------------------------------------------------------------------------
def spuq(embeddings: torch.Tensor) -> tuple[float, float, float]:
    """``(U_alea, U_epis, U)`` of embeddings shaped ``(M, K, D)`` (Euclidean distances, fp64)."""
    if embeddings.ndim != 3 or embeddings.shape[0] < 2 or embeddings.shape[1] < 1:
        raise ValueError(f"need embeddings of shape (M >= 2, K >= 1, D), got {tuple(embeddings.shape)}")
    h = embeddings.double()
    centroids = h.mean(dim=1)
    u_alea = float((h - centroids[:, None]).norm(dim=-1).mean())
    u_epis = float(torch.pdist(centroids).mean())
    return u_alea, u_epis, 0.5 * (u_alea + u_epis)


def delta_u(u_post: float, u_pre: float, min_u_pre: float = 1e-6) -> float:
    """Relative growth ``(U_post − U_pre) / U_pre``; NaN when U_pre is (near) zero."""
    if not (u_pre >= min_u_pre and u_pre > 0) or math.isnan(u_post):
        return NAN
    return (u_post - u_pre) / u_pre


def query_key(row: dict[str, Any]) -> tuple[str, str, int]:
    return (str(row["fact_id"]), str(row["role"]), int(row["query_index"]))


def attach_delta_u(rows: Sequence[dict[str, Any]], base_rows: Sequence[dict[str, Any]],
                   min_u_pre: float = 1e-6) -> list[dict[str, Any]]:
    """Rows of a step + rows of the unedited model (same settings) → rows with ``u_pre``, ``delta_u``.

    Joined on (fact_id, role, query_index); a query absent from ``base_rows`` gets NaN. The settings
    that move U (seed, top_p, temperature, max_new_tokens, M, K, embedding model) must match.
    """
    pre = {query_key(r): r for r in base_rows}
    out = []
    for r in rows:
        b = pre.get(query_key(r))
        r = dict(r)
        if b is not None:
            for k in ("uncertainty_settings",):
                if r.get(k) != b.get(k):
                    raise ValueError(f"fact {r['fact_id']!r}: rows were computed under different settings "
                                     f"({r.get(k)} vs {b.get(k)})")
        u_pre = float(b["u"]) if b is not None else NAN
        r.update(u_pre=u_pre, u_alea_pre=float(b["u_alea"]) if b else NAN,
                 u_epis_pre=float(b["u_epis"]) if b else NAN,
                 delta_u=delta_u(float(r["u"]), u_pre, min_u_pre), delta_u_abs=float(r["u"]) - u_pre)
        out.append(r)
    return out


# -- probes -------------------------------------------------------------------------------------------
def _pad(wordings: Sequence[str], m: int, source: str) -> tuple[list[str], str]:
    """The first M distinct wordings; fewer than M are padded with syntactic variants (flagged fallback)."""
    out = list(dict.fromkeys(w for w in wordings if w.strip()))
    if len(out) >= m:
        return out[:m], source
    base = out[0]
    for v in SYNTACTIC_VARIANTS[1:]:
        if len(out) >= m:
            break
        text = v.format(base)
        if text not in out:
            out.append(text)
    if len(out) < m:
        raise ValueError(f"cannot build {m} paraphrases of {base!r}")
    return out, "fallback"


def load_world_templates(world: Any) -> tuple[dict[str, list[str]], list[str]]:
    """``(templates by relation id, known subjects)`` of a toy world (object, folder or kb.json path)."""
    root = Path(getattr(world, "root", world))
    kb_path = root / "kb.json" if root.is_dir() else root
    kb = json.loads(kb_path.read_text(encoding="utf-8"))
    # canonical prompt first, then the held-out wordings, then the rest of the training wordings
    templates = {r["relation_id"]: [*r["train_templates"][:1], *r["heldout_templates"], r["heldout_question"],
                                    r["question_template"], *r["train_templates"][1:]]
                 for r in kb.get("relations", [])}
    subjects = [*kb.get("persons", []), *kb.get("countries", [])]
    return templates, subjects


def _subject_in(prompt: str, subjects: Sequence[str]) -> str | None:
    found = [s for s in subjects if s in prompt]
    return max(found, key=len) if found else None


def probes_from_records(records: Sequence[Any], settings: UncertaintySettings, world: Any | None = None
                        ) -> list[ProbeFact]:
    """Probe facts for CounterFact/ZsRE records (or ProbeFact/dicts, passed through)."""
    m = settings.n_paraphrases
    templates, subjects = load_world_templates(world) if world is not None else ({}, [])
    out: list[ProbeFact] = []
    for rec in records:
        if isinstance(rec, ProbeFact):
            out.append(rec)
            continue
        if isinstance(rec, dict):
            out.append(ProbeFact.model_validate(rec))
            continue
        req = request_of(rec)
        fid = case_id_of(rec)
        rid = getattr(rec, "relation_id", None)
        queries: list[ProbeQuery] = []
        # S1: the edit query
        if rid in templates:
            words, src = _pad([t.replace("{}", req.subject) for t in templates[rid]], m, "toyworld")
        else:
            words, src = _pad([prompt_text(req), *str_list(rec, "paraphrase_prompts"), *str_list(rec, "rephrase")],
                              m, "dataset")
        queries.append(ProbeQuery(role="edit", paraphrases=words, source=src))
        # S2, S3, ...: neighbourhood queries (other subjects, same relation and true object)
        neigh = str_list(rec, "neighborhood_prompts")
        if not neigh and getattr(rec, "loc", None):
            neigh = [str(rec.loc)]
        for prompt in neigh[:settings.n_neighbors]:
            other = _subject_in(prompt, subjects) if rid in templates else None
            if other is not None:
                words, src = _pad([prompt, *(t.replace("{}", other) for t in templates[rid])], m, "toyworld")
            else:
                words, src = _pad([prompt], m, "dataset")
            queries.append(ProbeQuery(role="neighborhood", paraphrases=words, source=src))
        out.append(ProbeFact(fact_id=fid, queries=queries))
    return out


def load_probe_file(path: str | Path) -> list[ProbeFact]:
    """A JSON list or JSONL of ``{fact_id, queries: [{role, paraphrases: [...]}, ...]}``."""
    text = Path(path).read_text(encoding="utf-8")
    stripped = text.lstrip()
    raw = json.loads(text) if stripped.startswith("[") else [json.loads(x) for x in text.splitlines() if x.strip()]
    facts = []
    for i, r in enumerate(raw):
        try:
            facts.append(ProbeFact.model_validate(r))
        except Exception as exc:
            raise ValueError(f"{path}: probe {i}: {exc}") from None
    return facts


# -- the suite ----------------------------------------------------------------------------------------
def settings_tag(s: UncertaintySettings, embedder_name: str) -> str:
    """What must match between U_pre and U_post (stored in every row as ``uncertainty_settings``)."""
    return (f"M={s.n_paraphrases};K={s.n_samples};top_p={s.top_p};T={s.temperature};max_new={s.max_new_tokens};"
            f"seed={s.seed};chat={s.chat_template};system={bool(s.system_prompt)};emb={embedder_name}")


class _Prompts:
    """Prompt ids (raw with BOS, or chat-templated with an optional system prompt), cut to leave answer room."""

    def __init__(self, model: Any, tokenizer: Any, settings: UncertaintySettings) -> None:
        if settings.system_prompt and not settings.chat_template:
            raise ValueError("system_prompt needs chat_template: true")
        self.tok = tokenizer
        self.settings = settings
        self.encoder = PromptEncoder(tokenizer, chat_template=settings.chat_template and not settings.system_prompt)
        limit = model_max_positions(model)
        self.budget = None if limit is None else max(2, limit - min(settings.max_new_tokens, limit // 2))

    def ids(self, texts: Sequence[str]) -> list[list[int]]:
        s = self.settings
        if s.system_prompt:
            msgs = [[{"role": "system", "content": s.system_prompt}, {"role": "user", "content": t}] for t in texts]
            rendered = [self.tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in msgs]
            ids = [list(x) for x in self.tok(rendered, add_special_tokens=False)["input_ids"]]
        else:
            ids = self.encoder.encode_prefixes(list(texts))
        if self.budget is not None:
            ids = [x if len(x) <= self.budget else x[:1] + x[len(x) - self.budget + 1:] for x in ids]
        return ids


def measure_facts(model: Any, prompts: _Prompts, embedder: Any, items: Sequence[tuple[ProbeFact, Sequence[int]]],
                  settings: UncertaintySettings) -> list[list[dict[str, Any]]]:
    """U per query of several facts: ONE generation batch (facts × queries × M × K rows) + ONE embedding batch.

    Every row samples from its own seed (fact, role, query, paraphrase, sample), so a fact's answers do not
    depend on which facts share its batch.
    """
    m, k = settings.n_paraphrases, settings.n_samples
    texts: list[str] = []
    seeds: list[int] = []
    for fact, queries in items:
        for qi in queries:
            q = fact.queries[qi]
            if len(q.paraphrases) < m:
                raise ValueError(f"fact {fact.fact_id!r} query {qi} has {len(q.paraphrases)} paraphrases, "
                                 f"fewer than n_paraphrases={m}")
            for j in range(m):
                for s in range(k):
                    texts.append(q.paraphrases[j])
                    seeds.append(row_seed(settings.seed, fact.fact_id, q.role, qi, j, s))
    ids = prompts.ids(texts)
    outs = decode_batch(model, prompts.tok, ids, max_new_tokens=settings.max_new_tokens, greedy=False,
                        top_p=settings.top_p, temperature=settings.temperature, seeds=seeds)
    answers = [o.text.strip() for o in outs]
    emb = embedder.embed(answers)
    emb = emb.reshape(len(answers) // (m * k), m, k, -1)
    results: list[list[dict[str, Any]]] = []
    at = 0  # query block index
    for _fact, queries in items:
        rows = outs[at * m * k:(at + len(queries)) * m * k]
        steps = max((len(o.ids) + int(o.hit_eos) for o in rows), default=0)  # forward passes this fact needed
        res = []
        for qi in queries:
            u_alea, u_epis, u = spuq(emb[at])
            block = answers[at * m * k:(at + 1) * m * k]
            res.append({"query_index": qi, "u_alea": u_alea, "u_epis": u_epis, "u": u, "decode_steps": steps,
                        "answers": [block[j * k:(j + 1) * k] for j in range(m)],
                        "mean_answer_tokens": sum(len(o.ids) for o in outs[at * m * k:(at + 1) * m * k]) / (m * k)})
            at += 1
        results.append(res)
    return results


def uncertainty_rows(model: Any, tokenizer: Any, facts: Sequence[tuple[int, ProbeFact]],
                     settings: UncertaintySettings, embedder: Any,
                     base: Callable[[], AbstractContextManager[Any]] | None = None,
                     cache: dict[Any, Any] | None = None, keep_raw: bool = True) -> list[dict[str, Any]]:
    prompts = _Prompts(model, tokenizer, settings)
    tag = settings_tag(settings, getattr(embedder, "name", type(embedder).__name__))
    roles = set(settings.roles)
    chosen_of = {index: [i for i, q in enumerate(fact.queries) if q.role in roles] for index, fact in facts}
    tested = [(index, fact) for index, fact in facts if chosen_of[index]]
    # several facts per generation batch (up to max_batch_rows sampled rows): one pass per batch, not per fact
    n_rows = [len(chosen_of[index]) * settings.n_paraphrases * settings.n_samples for index, _ in tested]
    rows: list[dict[str, Any]] = []
    for chunk in chunks_by_total(n_rows, settings.max_batch_rows):
        batch = [tested[i] for i in chunk]
        items = [(fact, chosen_of[index]) for index, fact in batch]
        posts = measure_facts(model, prompts, embedder, items, settings)
        pres: list[list[dict[str, Any]] | None] = [None] * len(batch)
        if base is not None:
            keys = [("uncertainty", tag, fact.model_dump_json(), tuple(chosen_of[index])) for index, fact in batch]
            pres = [cache.get(key) if cache is not None else None for key in keys]
            missing = [n for n, p in enumerate(pres) if p is None]
            if missing:
                with base():
                    measured = measure_facts(model, prompts, embedder, [items[n] for n in missing], settings)
                for n, pre in zip(missing, measured, strict=True):
                    pres[n] = pre
                    if cache is not None:
                        cache[keys[n]] = pre
        for (index, fact), post, pre in zip(batch, posts, pres, strict=True):
            rows.extend(_rows_of_fact(index, fact, post, pre, settings, tag, keep_raw))
    return rows


def _rows_of_fact(index: int, fact: ProbeFact, post: list[dict[str, Any]], pre: list[dict[str, Any]] | None,
                  settings: UncertaintySettings, tag: str, keep_raw: bool) -> list[dict[str, Any]]:
    rows = []
    for n, r in enumerate(post):
        q = fact.queries[r["query_index"]]
        row: dict[str, Any] = {
            "protocol": UNCERTAINTY.id, "record_index": index, "fact_id": fact.fact_id, "role": q.role,
            "query_index": r["query_index"], "paraphrase_source": q.source, "n_paraphrases": settings.n_paraphrases,
            "n_samples": settings.n_samples, "u_alea": r["u_alea"], "u_epis": r["u_epis"], "u": r["u"],
            "mean_answer_tokens": r["mean_answer_tokens"], "decode_steps": r["decode_steps"],
            "uncertainty_settings": tag,
        }
        if pre is not None:
            p = pre[n]
            row.update(u_pre=p["u"], u_alea_pre=p["u_alea"], u_epis_pre=p["u_epis"],
                       delta_u=delta_u(r["u"], p["u"], settings.min_u_pre), delta_u_abs=r["u"] - p["u"])
        if keep_raw:
            row["paraphrases"] = list(q.paraphrases[:settings.n_paraphrases])
            row["answers"] = r["answers"]
            if pre is not None:
                row["answers_pre"] = pre[n]["answers"]
        rows.append(row)
    return rows


def uncertainty_summary(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per role: mean U (post, pre), mean per-query Δ_U (NaN skipped; headline), ratio-of-means Δ_U, mean Δ_U abs."""
    by_role: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_role.setdefault(str(r["role"]), []).append(r)
    out: dict[str, dict[str, float]] = {}
    for role, group in by_role.items():
        u = [float(r["u"]) for r in group]
        pre = [float(r["u_pre"]) for r in group if "u_pre" in r and not math.isnan(float(r["u_pre"]))]
        rel = [float(r["delta_u"]) for r in group if "delta_u" in r and not math.isnan(float(r["delta_u"]))]
        ab = [float(r["delta_u_abs"]) for r in group if "delta_u_abs" in r and not math.isnan(float(r["delta_u_abs"]))]
        paired = [(float(r["u"]), float(r["u_pre"])) for r in group
                  if "u_pre" in r and not math.isnan(float(r["u_pre"]))]
        sum_pre = sum(p for _, p in paired)
        out[role] = {
            "n": len(group),
            "u": sum(u) / len(u),
            "u_alea": sum(float(r["u_alea"]) for r in group) / len(group),
            "u_epis": sum(float(r["u_epis"]) for r in group) / len(group),
            "u_pre": sum(pre) / len(pre) if pre else NAN,
            "delta_u": sum(rel) / len(rel) if rel else NAN,
            "n_delta_u": len(rel),
            "delta_u_ratio_of_means": (sum(a for a, _ in paired) - sum_pre) / sum_pre if sum_pre > 0 else NAN,
            "delta_u_abs": sum(ab) / len(ab) if ab else NAN,
        }
    return out
