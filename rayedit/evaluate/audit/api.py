"""One entry point per purpose: load a suite's records, run a record range, summarise rows."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from .general import GeneralItem, general_items, general_rows, general_summary
from .protocols import AUDIT_PROTOCOLS
from .safety import Judge, safety_rows, safety_summary
from .settings import SETTINGS, GeneralFile
from .shift import ShiftPrompt, load_prompt_file, shift_prompts_from, shift_rows, shift_summary
from .uncertainty import ProbeFact, load_probe_file, probes_from_records, uncertainty_rows, uncertainty_summary

AUDIT_SUITES: tuple[str, ...] = ("general", "uncertainty", "safety", "shift")
UseBase = Callable[[], AbstractContextManager[Any]]


def audit_settings(name: str, settings: BaseModel | dict[str, Any] | None = None) -> Any:
    """The suite's settings model from a model, a dict (validated, unknown keys refused) or None (defaults)."""
    if name not in SETTINGS:
        raise ValueError(f"unknown audit suite {name!r} (known: {', '.join(AUDIT_SUITES)})")
    cls = SETTINGS[name]
    if settings is None:
        return cls()
    if isinstance(settings, cls):
        return settings
    if isinstance(settings, BaseModel):
        raise TypeError(f"settings for {name!r} must be {cls.__name__}, got {type(settings).__name__}")
    return cls.model_validate({"suite": name, **settings})


def _world_root(world: Any) -> Path:
    return Path(getattr(world, "root", world))


def _first_json(path: Path) -> dict[str, Any]:
    text = path.read_text(encoding="utf-8").lstrip()
    if text.startswith("["):
        data = json.loads(text)
        return data[0] if data and isinstance(data[0], dict) else {}
    line = next((x for x in text.splitlines() if x.strip()), "{}")
    first = json.loads(line)
    return first if isinstance(first, dict) else {}


def _edit_records(path: Path, limit: int | None) -> list[Any]:
    """CounterFact or ZsRE records from a file, by its layout."""
    from ...data.loaders import load_counterfact, load_zsre

    first = _first_json(path)
    if "requested_rewrite" in first:
        return list(load_counterfact(path, limit=limit))
    if "src" in first:
        return list(load_zsre(path, limit=limit))
    raise ValueError(f"{path}: neither a probe file, a CounterFact file nor a ZsRE file")


def audit_records(name: str, settings: BaseModel | dict[str, Any] | None = None, source: Any = None, *,
                  world: Any = None) -> list[Any]:
    """The records the suite iterates over (shard them by index range for :func:`run_audit_suite`).

    - ``general``: :class:`GeneralItem` of the packaged tasks + ``settings.files`` + ``source`` (a list of
      :class:`GeneralFile` or dicts);
    - ``uncertainty``: :class:`ProbeFact` from ``source`` (edit-dataset records, probe dicts, or a probe /
      CounterFact / ZsRE file), else ``settings.source``, else the toy ``world``'s CounterFact file; with
      ``world`` (a ToyWorld or its folder) the toy world's templates supply the paraphrases;
    - ``safety``: malicious queries from ``source`` (records or a JSONL file), ``settings.source`` or the
      world's held-out ``malicious_eval.jsonl``;
    - ``shift``: :class:`ShiftPrompt` from ``source`` (records, dicts, strings, or a file), ``settings.source``
      or the world's CounterFact rewrite prompts (the known facts, subject filled in).

    ``settings.limit`` keeps the first N.
    """
    s = audit_settings(name, settings)
    if name == "general":
        extra = [f if isinstance(f, GeneralFile) else GeneralFile.model_validate(f) for f in (source or [])]
        return general_items(s, extra)
    src = source if source is not None else s.source
    limit = s.limit
    if name == "safety":
        from ...data.loaders import load_malicious

        if src is None:
            if world is None:
                raise ValueError("safety: give source (malicious queries or a file) or world")
            src = _world_root(world) / "malicious_eval.jsonl"
        if isinstance(src, str | Path):
            return list(load_malicious(Path(src), limit=limit))
        return list(src)[:limit]
    if src is None:
        if world is None:
            raise ValueError(f"{name}: give source (records or a file) or world")
        src = _world_root(world) / "counterfact.json"
    if name == "uncertainty":
        if isinstance(src, str | Path):
            path = Path(src)
            if "queries" in _first_json(path):
                facts = load_probe_file(path)
                return facts[:limit] if limit else facts
            src = _edit_records(path, limit)
        return probes_from_records(list(src)[:limit], s, world=world)
    # shift
    if isinstance(src, str | Path):
        path = Path(src)
        if path.suffix != ".txt" and ({"requested_rewrite", "src"} & set(_first_json(path))):
            return shift_prompts_from(_edit_records(path, limit))
        prompts = load_prompt_file(path)
        return prompts[:limit] if limit else prompts
    return shift_prompts_from(list(src)[:limit])


@contextmanager
def _eval_mode(model: Any):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def run_audit_suite(name: str, model: Any, tokenizer: Any, records: Sequence[Any],
                    settings: BaseModel | dict[str, Any] | None = None, base: UseBase | None = None, *,
                    start: int = 0, stop: int | None = None, keep_raw: bool = True,
                    extra_columns: dict[str, Any] | None = None, embedder: Any = None, judge: Judge | None = None,
                    cache: dict[Any, Any] | None = None) -> list[dict[str, Any]]:
    """Rows of suite ``name`` for ``records[start:stop]`` (``record_index`` = position in ``records``).

    ``base``: a zero-argument context-manager factory under which the same model object carries the
    unedited weights (the runtime's replica restores its base tensors on enter and puts the step's
    tensors back on exit). ``shift`` needs it; ``uncertainty`` uses it for ``u_pre``/``delta_u``
    (without it, join a step-0 run later with :func:`attach_delta_u`); ``general`` and ``safety``
    ignore it. ``cache``: a dict kept per replica *and base model*; the suites memoise base-model
    results in it (U_pre per fact, BEFORE states and the PCA basis), so later steps skip them.
    ``embedder`` (uncertainty) and ``judge`` (safety) override the models named in the settings.
    """
    s = audit_settings(name, settings)
    stop = len(records) if stop is None else min(stop, len(records))
    if start < 0 or start > stop:
        raise ValueError(f"bad record range [{start}, {stop}) for {len(records)} records")
    chunk = [(i, records[i]) for i in range(start, stop)]
    with _eval_mode(model):
        if name == "general":
            bad = [type(r).__name__ for _, r in chunk if not isinstance(r, GeneralItem)]
            if bad:
                raise TypeError(f"general: records must be GeneralItem (from audit_records), got {bad[0]}")
            rows = general_rows(model, tokenizer, chunk, s, keep_raw=keep_raw)
        elif name == "uncertainty":
            if embedder is None:
                from .embed import get_embedder

                embedder = get_embedder(s.embedding_model, batch_size=s.embedding_batch_size)
            facts = [(i, r if isinstance(r, ProbeFact) else probes_from_records([r], s)[0]) for i, r in chunk]
            rows = uncertainty_rows(model, tokenizer, facts, s, embedder, base=base, cache=cache, keep_raw=keep_raw)
        elif name == "safety":
            rows = safety_rows(model, tokenizer, chunk, s, judge=judge, keep_raw=keep_raw)
        else:
            prompts = [r if isinstance(r, ShiftPrompt) else shift_prompts_from([r])[0] for r in records]
            rows = shift_rows(model, tokenizer, prompts, start, stop, s, base, cache=cache)
    if extra_columns:
        for row in rows:
            for k, v in extra_columns.items():
                row.setdefault(k, v)
    return rows


_SUMMARIES: dict[str, tuple[str, Callable[[Sequence[dict[str, Any]]], dict[Any, dict[str, float]]]]] = {
    "general": ("task", general_summary), "uncertainty": ("role", uncertainty_summary),
    "safety": ("category", safety_summary), "shift": ("layer", shift_summary)}


def summarize_audit(rows: Sequence[dict[str, Any]], by: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Tidy set-level summary: one row per (protocol, *by, group, metric) with ``value``.

    ``group`` is the task (general), role (uncertainty), category or ``all`` (safety), layer (shift).
    Group ``by`` the identity columns of a campaign (e.g. model, method, step): set-level numbers such as
    F1 or the KDE overlaps are only meaningful within one (model, method, step).
    """
    by_proto: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        by_proto.setdefault((r["protocol"], *(r.get(k) for k in by)), []).append(r)
    ids = {p.id: n for n, p in AUDIT_PROTOCOLS.items()}
    out: list[dict[str, Any]] = []
    for key, group in by_proto.items():
        suite = ids.get(key[0])
        if suite is None:
            continue  # not an audit protocol (rows of other suites are summarised by rayedit.evaluate)
        kind, fn = _SUMMARIES[suite]
        for g, metrics in fn(group).items():
            for metric, value in metrics.items():
                out.append({"protocol": key[0], **dict(zip(by, key[1:], strict=True)), "group_kind": kind,
                            "group": str(g), "metric": metric, "value": float(value)})
    return out
