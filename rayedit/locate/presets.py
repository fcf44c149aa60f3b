"""Preset files: a method's tuned hyperparameters for a model, with where they came from.

::

    format: rayedit-preset/v1
    method: memit
    model: toyworld:0
    hparams: {layers: [1, 2], v_lr: 0.5, clamp_norm_factor: 4.0, ...}
    stats_corpus: /path/to/corpus.jsonl        # optional: the corpus the statistics were computed on
    provenance:
      campaign: suggest-toyworld-0            # the campaign the numbers come from
      objective: efficacy_x_neighborhood
      statement: configurations ranked by ...  # the full ranking rule
      score: 0.93
      ...

Unknown keys are errors (pydantic, ``extra=forbid``) and ``hparams`` are validated through
``rayedit.editing.hparams`` (unknown hyperparameters, bad values and, given the model's depth, layer
indices). ``rayedit edit --preset FILE`` and ``presets rank/suggest`` use these functions.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

PRESET_FORMAT = "rayedit-preset/v1"


class PresetProvenance(BaseModel):
    model_config = ConfigDict(extra="forbid")

    campaign: str = Field(min_length=1)
    objective: str
    statement: str
    score: float
    config: str | None = None  # the campaign's method label of the winner
    metrics: dict[str, float] = Field(default_factory=dict)
    n_edits: int | None = None
    n_records: int | None = None
    source: Literal["sweep", "suggest", "manual"] = "sweep"
    created: str | None = None
    store: str | None = None
    ranking: list[dict[str, Any]] = Field(default_factory=list)
    trace: dict[str, Any] | None = None  # suggest: the trace's window and its rule
    scan: dict[str, Any] | None = None  # suggest: the scan's ranking and its objective

    @field_validator("score")
    @classmethod
    def _finite(cls, v: float) -> float:
        if math.isnan(v) or math.isinf(v):
            raise ValueError("score must be a finite number")
        return v


class Preset(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["rayedit-preset/v1"] = PRESET_FORMAT
    method: str
    model: str = Field(min_length=1)
    hparams: dict[str, Any] = Field(default_factory=dict)
    stats_corpus: str | None = None
    provenance: PresetProvenance

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        from ..editing.hparams import HPARAMS  # lazy: importing rayedit.editing loads torch

        if v not in HPARAMS:
            raise ValueError(f"unknown method {v!r}; choose one of {', '.join(sorted(HPARAMS))}")
        return v

    def overrides(self) -> dict[str, Any]:
        """What to hand to ``resolve_hparams``/``Editor``: the hparams, marked as coming from this preset."""
        return {**self.hparams, "provenance": f"preset-file:{self.provenance.campaign}"}


class PresetError(ValueError):
    """A preset file that cannot be read or does not validate; the message names the file and the key."""


def validate_hparams(method: str, hparams: dict[str, Any], *, n_layers: int | None = None,
                     d_ff: int | None = None, model_name: str = "preset", as_preset: bool = False) -> Any:
    """Validate ``hparams`` as ``method``'s hyperparameters; with ``n_layers`` also the layer indices.
    ``as_preset``: the values are a preset file's full set (a lower layer than the user's values).

    Returns the resolved hparams object (``rayedit.editing.hparams``)."""
    from ..editing.hparams import HPARAMS, resolve_hparams

    values = {k: v for k, v in hparams.items() if k not in ("method", "value_sources")}
    if n_layers is not None:
        return resolve_hparams(method, model_name, n_layers, {"preset_values": values} if as_preset else values,
                               d_ff=d_ff)
    try:
        return HPARAMS[method](**{**values, "method": method})
    except ValidationError as exc:
        errs = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"invalid {method} hyperparameters: {errs}") from None


def resolved_hparams(method: str, model_name: str, n_layers: int, overrides: dict[str, Any],
                     d_ff: int | None = None) -> dict[str, Any]:
    """The full set of ``method``'s hyperparameters for a model (defaults → preset/rule → overrides), as
    stored in a preset: a preset keeps meaning the same numbers when rule defaults change later."""
    hp = validate_hparams(method, overrides, n_layers=n_layers, d_ff=d_ff, model_name=model_name)
    return hp.model_dump(mode="json", exclude={"method", "provenance", "value_sources"})


def make_preset(data: dict[str, Any], *, n_layers: int | None = None, d_ff: int | None = None,
                origin: str = "preset") -> Preset:
    try:
        preset = Preset.model_validate(data)
    except ValidationError as exc:
        raise PresetError("; ".join(f"{origin}: {'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}"
                                    for e in exc.errors())) from None
    try:
        validate_hparams(preset.method, preset.hparams, n_layers=n_layers, d_ff=d_ff, model_name=preset.model,
                         as_preset=True)
    except ValueError as exc:
        raise PresetError(f"{origin}: hparams: {exc}") from None
    return preset


def load_preset(path: str | Path, *, n_layers: int | None = None, d_ff: int | None = None) -> Preset:
    """Read and validate a preset file (YAML)."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise PresetError(f"{p}: preset file not found") from None
    except (OSError, yaml.YAMLError) as exc:
        raise PresetError(f"{p}: cannot read preset: {exc}") from None
    if not isinstance(data, dict):
        raise PresetError(f"{p}: a preset must be a mapping, got {type(data).__name__}")
    return make_preset(data, n_layers=n_layers, d_ff=d_ff, origin=str(p))


def dump_preset(preset: Preset) -> str:
    data = preset.model_dump(mode="json", exclude_none=True)
    hp = data.get("hparams", {})
    data["hparams"] = {k: hp[k] for k in sorted(hp, key=lambda k: (k != "layers", k))}  # layers first, then a–z
    # a readable key order: what it is first, where it came from last
    ordered = {k: data[k] for k in ("format", "method", "model", "hparams", "stats_corpus", "provenance") if k in data}
    return yaml.safe_dump(ordered, sort_keys=False, default_flow_style=None, allow_unicode=True, width=110)


def save_preset(preset: Preset, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(dump_preset(preset))
    tmp.replace(p)
    return p
