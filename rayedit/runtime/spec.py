"""Campaign spec (YAML) → validated pydantic model, plus deep checks (hparams, data files).

Every model forbids unknown keys, so a typo is an error with its key path instead of a silently
ignored setting. No Ray here: validation runs before anything heavy starts.
"""

from __future__ import annotations

import difflib
import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rayedit.data.requests import EditRequest
from rayedit.store import sanitize_id

Mode = Literal["sequential_batches", "sequential", "single", "batch"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Strict):
    name: str = Field(min_length=1, description='hub name, local folder, or "tiny:<family>"')
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    replicas: int = Field(1, ge=1)
    gpus_per_replica: float = Field(0.0, ge=0)
    cpus_per_replica: float = Field(0.5, gt=0)  # small by default: tests and laptops have 2 CPUs

    @field_validator("name")
    @classmethod
    def _tiny_family(cls, v: str) -> str:
        if v.startswith("tiny:"):
            from rayedit.models import TINY_FAMILIES

            fam = v.split(":", 1)[1]
            if fam not in TINY_FAMILIES:
                raise ValueError(f"unknown tiny family {fam!r}; choose one of {', '.join(TINY_FAMILIES)}")
        return v


class MethodSpec(_Strict):
    name: str
    hparams: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)  # each combination becomes its own stream

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from rayedit.editing import METHODS

        if v not in METHODS:
            raise ValueError(f"unknown method {v!r}; choose one of {', '.join(METHODS)}")
        return v

    @field_validator("grid")
    @classmethod
    def _grid_nonempty(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for k, vals in v.items():
            if not vals:
                raise ValueError(f"grid value list for {k!r} is empty")
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


class DatasetSpec(_Strict):
    kind: Literal["requests"] = "requests"
    path: str
    name: str | None = None
    limit: int | None = Field(None, ge=1)

    @property
    def label(self) -> str:
        return self.name or Path(self.path).stem


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
    stats_corpus: str = "builtin:general"
    stats_samples: int | None = Field(None, ge=1)  # default for mom2_n_samples unless a method overrides it

    @model_validator(mode="after")
    def _mode_batch(self) -> CampaignSpec:
        if self.mode in ("sequential", "single") and self.batch_size != 1:
            raise ValueError(f"mode {self.mode!r} edits one request at a time: batch_size must be 1")
        if self.mode == "batch" and self.batch_size != self.edits_per_stream:
            raise ValueError("mode 'batch' applies all edits at once: batch_size must equal edits_per_stream")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError("seeds must be distinct")
        return self

    @property
    def campaign_id(self) -> str:
        return sanitize_id(self.name)

    def frozen_yaml(self) -> str:
        """Canonical YAML of the campaign's identity (the store URI is where it lives, not what it is)."""
        data = self.model_dump(mode="json", exclude={"store"})
        return yaml.safe_dump(data, sort_keys=True, default_flow_style=False)


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


def streams(spec: CampaignSpec) -> list[Stream]:
    out: list[Stream] = []
    for mi, m in enumerate(spec.models):
        for meth in spec.methods:
            for label, hp in meth.variants():
                if spec.stats_samples is not None and meth.name != "ft":
                    hp = {"mom2_n_samples": spec.stats_samples} | hp
                for di, d in enumerate(spec.datasets):
                    for seed in spec.seeds:
                        sid = sanitize_id(f"{m.name}--{label}--{d.label}--s{seed}")
                        out.append(Stream(sid, mi, m.name, meth.name, label, hp, d.label, di, seed))
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
    return ".".join(str(p) for p in loc) or "<root>"


def parse_spec(data: Any, origin: str = "spec") -> CampaignSpec:
    if not isinstance(data, dict):
        raise SpecError([f"<root>: {origin} must be a mapping, got {type(data).__name__}"])
    try:
        return CampaignSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError([f"{_loc(e['loc'])}: {e['msg']}" for e in exc.errors()]) from None


def load_spec(path: str | Path) -> CampaignSpec:
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise SpecError([f"<root>: spec file not found: {p}"]) from None
    except yaml.YAMLError as exc:
        raise SpecError([f"<root>: {p} is not valid YAML: {exc}"]) from None
    return parse_spec(data, str(p))


def spec_from_yaml(text: str, origin: str = "frozen spec") -> CampaignSpec:
    return parse_spec(yaml.safe_load(text), origin)


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


def stream_requests(spec: CampaignSpec, stream: Stream, base_dir: Path | None = None) -> list[EditRequest]:
    """The stream's ordered requests: the dataset (limit), shuffled by the seed, first edits_per_stream."""
    d = spec.datasets[stream.dataset_index]
    reqs = read_requests(resolve_data_path(d.path, base_dir), d.limit)
    order = list(range(len(reqs)))
    random.Random(stream.seed).shuffle(order)  # the seed picks the edit order (and so the edit set)
    return [reqs[i] for i in order[: spec.edits_per_stream]]


# --- deep validation --------------------------------------------------------------------------------
def _model_layers(name: str) -> tuple[int, int | None] | None:
    """(n_layers, d_ff) without loading weights, or None if the config cannot be read offline."""
    if name.startswith("tiny:"):
        from rayedit.models.tiny import tiny_config, tiny_tokenizer

        fam = name.split(":", 1)[1]
        cfg = tiny_config(fam, len(tiny_tokenizer(fam)))
    else:
        try:
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(name)
        except Exception:
            return None
    n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    d_ff = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None)
    return (int(n), d_ff) if n else None


def model_id(name: str) -> str:
    """The name hparams presets are matched on (tiny models use the name build_tiny_model gives them)."""
    return f"tiny-{name.split(':', 1)[1]}-4L-seed0" if name.startswith("tiny:") else name


def validate_spec_file(path: str | Path) -> tuple[CampaignSpec | None, list[str]]:
    """Every problem of a spec file, each with its key path (empty list = valid)."""
    try:
        spec = load_spec(path)
    except SpecError as exc:
        return None, exc.problems
    problems = deep_check(spec, Path(path).resolve().parent)
    return spec, problems


def deep_check(spec: CampaignSpec, base_dir: Path | None = None) -> list[str]:
    problems: list[str] = []
    try:
        streams(spec)
    except SpecError as exc:
        problems += exc.problems
    from rayedit.editing import resolve_hparams

    for m in spec.models:
        shape = _model_layers(m.name)
        if shape is None:
            continue
        for ji, meth in enumerate(spec.methods):
            for label, hp in meth.variants():
                if spec.stats_samples is not None and meth.name != "ft":
                    hp = {"mom2_n_samples": spec.stats_samples} | hp
                try:
                    resolve_hparams(meth.name, model_id(m.name), shape[0], hp, d_ff=shape[1])
                except ValueError as exc:
                    where = f"methods.{ji}.{'grid' if meth.grid else 'hparams'}"
                    problems.append(f"{where}: {exc} (model {m.name}, {label})")
    for di, d in enumerate(spec.datasets):
        p = resolve_data_path(d.path, base_dir)
        if not p.is_file():
            problems.append(f"datasets.{di}.path: data file not found: {d.path}")
            continue
        try:
            reqs = read_requests(p, d.limit)
        except SpecError as exc:
            problems += [f"datasets.{di}: {e}" for e in exc.problems]
            continue
        if not reqs:
            problems.append(f"datasets.{di}.path: {d.path} has no requests")
        elif len(reqs) < spec.edits_per_stream:
            problems.append(f"edits_per_stream: {spec.edits_per_stream} edits asked, but datasets.{di} "
                            f"({d.path}) has only {len(reqs)} requests")
    return problems
