"""Hyperparameters (pydantic, unknown keys are errors), presets (methods.md §4) and the default rule.

Resolution, lowest layer first: method defaults → preset for the model (by name) or the depth-proportional
rule → a preset file's values → the ``compat: reference`` bundle → the user's values (YAML/CLI/spec, or an
official ROME/MEMIT/AlphaEdit/EasyEdit hparams file, see ``reference.py``). A value the user sets is never
replaced by a lower layer; user values that contradict each other are an error naming both. Every resolved
value's source is kept in ``value_sources`` and recorded with every result.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

from ..safe_yaml import MAX_VALUES, expanded_size, yaml_error_line

NullspaceMode = Literal["threshold", "energy", "auto"]  # auto: threshold, energy if that selects none/all
Compat = Literal["ours", "reference"]
FactToken = Literal["subject_last", "subject_first", "subject_first_after_last", "last"]


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    method: str
    layers: list[StrictInt] = Field(default_factory=list)  # strict: YAML `true` (or 1.0) is not layer 1
    solve_dtype: Literal["float64", "float32"] = "float64"  # [OURS] fp64 solves (§9)
    template_seed: int = 0  # [OURS] seeded context templates (§2.3)
    provenance: str = "default"  # preset name, "rule", or "proposed"
    # "reference": every behaviour methods.md tags [REF] (see COMPAT_REFERENCE); "ours": our defaults
    compat: Compat = "ours"
    # where each resolved value came from (default, preset:…, preset-file:…, rule, compat:reference, user,
    # reference-file:…); filled by resolve_hparams
    value_sources: dict[str, str] = Field(default_factory=dict)
    # keys of an official hparams file that only name modules/datasets: checked against the model, kept here
    reference_settings: dict[str, Any] = Field(default_factory=dict)

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: list[int]) -> list[int]:
        if any(x < 0 for x in v):
            raise ValueError("layer indices must be >= 0")
        if len(set(v)) != len(v):
            raise ValueError("layers must be distinct")
        return sorted(v)


class _TargetFields(BaseModel):
    fact_token: FactToken = "subject_last"
    v_num_grad_steps: int = Field(20, ge=1, le=10_000)
    v_lr: float = Field(0.5, gt=0, allow_inf_nan=False)
    v_weight_decay: float = Field(0.5, ge=0, allow_inf_nan=False)
    clamp_norm_factor: float = Field(0.75, gt=0, allow_inf_nan=False)
    kl_factor: float = Field(0.0625, ge=0, allow_inf_nan=False)
    v_max_seqs_per_forward: int = Field(1024, ge=1)
    # fixed context templates instead of sampling them (§2.3): MEMIT's nested groups
    # ``[["{}"], ["… {}", …]]`` or ROME's flat list (one group); a file name is read at resolution
    context_templates: list[list[str]] | None = None

    @field_validator("context_templates", mode="before")
    @classmethod
    def _groups(cls, v: Any) -> Any:
        if isinstance(v, list) and v and all(isinstance(x, str) for x in v):
            v = [v]  # ROME's flat list: one group, a plain mean
        if isinstance(v, list):
            for gi, group in enumerate(v):
                if not isinstance(group, list) or not group:
                    raise ValueError(f"group {gi}: expected a non-empty list of template strings")
                for ti, t in enumerate(group):
                    if not isinstance(t, str) or t.count("{}") != 1:
                        raise ValueError(f"group {gi}, template {ti}: {str(t)[:60]!r} must contain '{{}}' once")
        return v


class _StatsFields(BaseModel):
    mom2_dataset: str = "auto"
    mom2_n_samples: int = Field(100_000, ge=1)
    mom2_dtype: Literal["float32", "float64"] = "float32"
    mom2_max_len: int | None = Field(None, ge=1)
    mom2_max_tokens: int | None = Field(None, ge=1)
    mom2_seed: int = 1
    exclude_bos_from_stats: bool = False
    # a precomputed second moment instead of computing one (safetensors: per edited layer ``sum.<l>`` (Σ k kᵀ)
    # or ``cov.<l>`` (normalised), and ``count.<l>`` tokens); checked against the model's d_ff
    covariance_file: str | None = None


class _NullspaceFields(BaseModel):
    """AlphaEdit's projection (§3.3): absolute threshold on the normalised Σ, energy, or auto (§4.3)."""

    nullspace_mode: NullspaceMode = "threshold"
    nullspace_threshold: float = Field(2e-2, gt=0, allow_inf_nan=False)
    nullspace_energy: float = Field(1e-3, gt=0, lt=1)
    # [OURS] eigh in float64; [REF] SVD of the float32 covariance
    nullspace_decomposition: Literal["eigh", "svd"] = "eigh"
    nullspace_dtype: Literal["float64", "float32"] = "float64"


class MemitHparams(_Base, _TargetFields, _StatsFields, _NullspaceFields):
    method: Literal["memit"] = "memit"
    mom2_update_weight: float = Field(15_000.0, ge=0, allow_inf_nan=False)
    sequential_cache: bool = False  # MEMIT-seq: add the running C_p of past keys (§3.2)
    project: Literal["none", "nullspace"] = "none"  # AlphaEdit's "one line" plug-in (§3.3)


class AlphaEditHparams(_Base, _TargetFields, _StatsFields, _NullspaceFields):
    method: Literal["alphaedit"] = "alphaedit"
    L2: float = Field(10.0, gt=0, allow_inf_nan=False)
    # [OURS] scale-free alternative for models without a preset: α = L2_relative · tr(Σ_l)
    L2_relative: float | None = Field(None, gt=0, allow_inf_nan=False)


class RomeHparams(_Base, _TargetFields, _StatsFields):
    method: Literal["rome"] = "rome"
    clamp_norm_factor: float = Field(4.0, gt=0, allow_inf_nan=False)
    mom2_adjustment: bool = True
    rome_key: Literal["original", "rrome"] = "rrome"  # [OURS] r-ROME default for sequential campaigns


class FtHparams(_Base, _StatsFields, _NullspaceFields):
    method: Literal["ft"] = "ft"
    lr: float = Field(5e-4, gt=0, allow_inf_nan=False)
    num_steps: int = Field(25, ge=1, le=10_000)
    batch_size: int = Field(64, ge=1)
    norm_constraint: float | None = Field(None, gt=0, allow_inf_nan=False)  # L∞ ball around W0 (FT-L)
    objective: Literal["prompt_last", "target_new"] = "prompt_last"  # FT-L [REF] | FT-M
    weight_decay: float = Field(0.0, ge=0)
    project: Literal["none", "nullspace"] = "none"


class SameHparams(AlphaEditHparams):
    """SAME (§7, [OURS]): AlphaEdit + safety constraints. Prompts: a malicious-query JSONL (``prompt`` field)
    and benign instructions (``builtin:general`` sentences or a JSONL/text file)."""

    method: Literal["same"] = "same"  # type: ignore[assignment]
    safety_malicious: str | None = None
    safety_benign: str = "builtin:general"
    n_mal: int = Field(128, ge=2)
    n_ben: int = Field(128, ge=2)
    k_s: int = Field(4, ge=1)
    r_m: int = Field(64, ge=1)
    key_energy: float = Field(0.99, gt=0, le=1)
    token_window: int = Field(8, ge=1)
    safety_chat_template: bool = True  # used when the tokenizer has one
    same_target_projection: bool = True  # constraint 1
    same_output_projection: bool = True  # constraint 2
    same_key_mode: Literal["hard", "soft", "off"] = "hard"  # constraint 3
    mu_s: float = Field(1.0, ge=0)


class MoseHparams(_Base, _TargetFields, _StatsFields):
    """MOSE, paper-faithful closed form (§3.6, [OURS] engineering): orthogonal Procrustes, W ← R W."""

    method: Literal["mose"] = "mose"
    variant: Literal["procrustes"] = "procrustes"
    layer_selection: Literal["fixed", "mose"] = "fixed"
    candidate_layers: list[StrictInt] | None = None  # for layer_selection: mose (default: lower half, no layer 0)
    mose_lambda: float | None = Field(None, gt=0, allow_inf_nan=False)  # absolute λ, else relative:
    mose_lambda_rel: float = Field(1.0, gt=0, allow_inf_nan=False)  # λ = ρ·mean‖Wk‖² / (tr(G)/d_out)
    mose_protect_past: float = Field(0.0, ge=0, allow_inf_nan=False)  # γ·W C_p Wᵀ of past edit keys


class MoseOftHparams(_Base):
    """MOSE as the released code does it (§3.6 [REF]): block-diagonal Cayley rotation on the input side,
    trained by Adam on the target NLL; the generator persists across edits."""

    method: Literal["mose_oft"] = "mose_oft"
    variant: Literal["oft"] = "oft"
    blocks: int = Field(4, ge=1)
    lr: float = Field(5e-4, gt=0, allow_inf_nan=False)
    num_steps: int = Field(25, ge=1, le=10_000)
    batch_size: int = Field(1, ge=1)
    radius_factor: float = Field(1e-5, gt=0, allow_inf_nan=False)


HPARAMS: dict[str, type[_Base]] = {
    "memit": MemitHparams,
    "alphaedit": AlphaEditHparams,
    "rome": RomeHparams,
    "ft": FtHparams,
    "mose": MoseHparams,
    "mose_oft": MoseOftHparams,
    "same": SameHparams,
}
_MOSE_LAYERS = {"gpt2-xl": [4, 5, 6, 7, 8], "llama-3-8b": [19, 20, 21], "qwen2.5-7b": [4, 5, 6]}

# ---------------------------------------------------------------------------------------------- presets
_MEMIT_FAMILY = {
    # methods.md §4.1 (AlphaEdit reference configs) and §4.3 (EasyEdit Qwen)
    "gpt2-xl": dict(layers=[13, 14, 15, 16, 17], v_num_grad_steps=20, v_lr=0.5, v_weight_decay=0.5,
                    clamp_norm_factor=0.75, kl_factor=0.0625, mom2_update_weight=20_000),
    "gpt-j-6b": dict(layers=[3, 4, 5, 6, 7, 8], v_num_grad_steps=25, v_lr=0.5, v_weight_decay=0.5,
                     clamp_norm_factor=0.75, kl_factor=0.0625, mom2_update_weight=15_000),
    "llama-3-8b": dict(layers=[4, 5, 6, 7, 8], v_num_grad_steps=25, v_lr=0.1, v_weight_decay=0.5,
                       clamp_norm_factor=0.75, kl_factor=0.0625, mom2_update_weight=15_000),
    "qwen2.5-7b": dict(layers=[4, 5, 6, 7, 8], v_num_grad_steps=25, v_lr=0.5, v_weight_decay=1e-3,
                       clamp_norm_factor=4.0, kl_factor=0.0625, mom2_update_weight=15_000),
}
_ROME = {
    "gpt2-xl": dict(layers=[17], v_num_grad_steps=20, v_lr=0.5, v_weight_decay=0.5, clamp_norm_factor=4.0),
    "gpt-j-6b": dict(layers=[5], v_num_grad_steps=20, v_lr=0.5, v_weight_decay=0.5, clamp_norm_factor=4.0),
    "llama-3-8b": dict(layers=[5], v_num_grad_steps=25, v_lr=0.5, v_weight_decay=1e-3, clamp_norm_factor=4.0,
                       mom2_adjustment=False),
    "qwen2.5-7b": dict(layers=[5], v_num_grad_steps=25, v_lr=0.5, v_weight_decay=1e-3, clamp_norm_factor=4.0,
                       mom2_adjustment=False),
}
_FT = {
    "gpt2-xl": dict(layers=[1]),
    "gpt-j-6b": dict(layers=[21]),
    "llama-3-8b": dict(layers=[21]),
    "qwen2.5-7b": dict(layers=[27], batch_size=1),
}
_N_LAYERS = {"gpt2-xl": 48, "gpt-j-6b": 28, "llama-3-8b": 32, "qwen2.5-7b": 28}
PRESET_ALIASES = {
    "gpt2-xl": ("gpt2-xl",),
    "gpt-j-6b": ("gpt-j-6b", "gpt-j-6B".lower()),
    "llama-3-8b": ("meta-llama-3-8b", "llama-3-8b", "llama-3.1-8b", "llama3-8b"),
    "qwen2.5-7b": ("qwen2.5-7b",),
}


def preset_for(model_name: str, method: str, n_layers: int) -> tuple[str | None, dict]:
    """The preset matching ``model_name`` (case-insensitive substring), if its layer count fits."""
    name = model_name.lower()
    for preset, aliases in PRESET_ALIASES.items():
        if any(a in name for a in aliases) and _N_LAYERS[preset] == n_layers:
            if method in ("memit", "alphaedit", "same"):
                vals = dict(_MEMIT_FAMILY[preset])
                if method in ("alphaedit", "same"):
                    vals.pop("mom2_update_weight")  # unused by AlphaEdit's solve (§3.3)
                    vals["L2"] = 1.0 if preset == "qwen2.5-7b" else 10.0
                return preset, vals
            if method == "rome":
                return preset, dict(_ROME[preset])
            if method == "ft":
                return preset, dict(_FT[preset])
            if method in ("mose", "mose_oft") and preset in _MOSE_LAYERS:
                vals = {"layers": list(_MOSE_LAYERS[preset])}
                if method == "mose":
                    mf = dict(_MEMIT_FAMILY[preset])
                    mf.pop("layers"), mf.pop("mom2_update_weight")
                    vals.update(mf)
                return preset, vals
    return None, {}


def rule_layers(method: str, n_layers: int) -> list[int]:
    """Depth-proportional default for models without a preset (the presets' windows sit at ~12–30 %)."""
    if n_layers <= 2:
        return [0]
    start = max(1, round(n_layers * 4 / 32))
    width = max(2, min(5, math.ceil(n_layers * 5 / 32)))
    window = [x for x in range(start, start + width) if x < n_layers - 1] or [n_layers // 2]
    if method == "rome":
        # ~15 % depth, where the ROME presets sit (Llama-3/Qwen/GPT-J: layer 5 of 28-32); the middle of the
        # MEMIT window overshoots on shallow models (toy world, 4 layers: layer 1 edits reach 100 % efficacy
        # one at a time, layer 2 only 85 %)
        return [min(max(1, round(n_layers * 5 / 32)), n_layers - 2)]
    if method == "ft":
        return [min(n_layers - 1, round(n_layers * 2 / 3))]
    if method in ("mose", "mose_oft"):  # [l*−1, l*, l*+1] around the middle of the window
        mid = window[len(window) // 2]
        return [x for x in (mid - 1, mid, mid + 1) if 0 <= x < n_layers]
    return window


def rule_values(method: str, n_layers: int, d_ff: int | None) -> dict[str, Any]:
    """[OURS] defaults for models without a preset (methods.md §4.3 proposal), scale-free where the
    reference values are absolute: λ scaled by d_ff relative to Llama-3-8B's 14336 (the update strength
    of MEMIT goes like kᵀ(λΣ)⁻¹k ≈ d_ff/λ), α relative to tr(Σ), an energy fallback for the null space,
    and the small target weight decay of the Llama/Qwen configs (‖δ‖/‖h0‖² is not scale-free)."""
    vals: dict[str, Any] = {"layers": rule_layers(method, n_layers), "provenance": "rule"}
    if method in ("memit", "alphaedit", "rome", "mose", "same"):
        vals.update(v_num_grad_steps=25, v_lr=0.5, v_weight_decay=1e-3)
    if method == "memit" and d_ff:
        vals["mom2_update_weight"] = round(15_000 * d_ff / 14_336, 3)
    if method in ("alphaedit", "same"):
        vals.update(nullspace_mode="auto", nullspace_energy=5e-2, L2_relative=1e-2)
    if method == "mose_oft" and d_ff:
        # the [REF] radius 1e-5·b²/√r (b = d_ff/r) is "practically never active" on the released models
        # (≈ 64 for Llama-3-8B); it shrinks with b², and on a d_ff=512 model (radius 0.08) it pins Q ≈ I
        # (toy world: 0 % efficacy). Keep the released models' absolute radius instead.
        vals["radius_factor"] = 1e-5 * (14_336 / d_ff) ** 2
    return vals


# [OURS] calibrated on the toy world (seed 0, 4 layers, d_ff 512; benchmarks/toyworld_methods.py), applied on
# top of the rule for a toy world model (see ``is_toyworld``).
# Its facts are read mostly from the non-final subject tokens (causal trace: restoring them recovers 0.6-0.75
# of p(true), the subject's last token 0.1-0.17), so a z-edit at the last subject token needs
# ‖δ‖ ≈ 1.5‖h0‖: with 0.75 efficacy stays at 60 % even for 10 edits. Layer 1 alone: z at layer 2 leaves one
# attention layer to move the edit to the answer position (20 edits: 80 % vs 95 %). SAME: the malicious keys
# need more than 64 directions for 99 % of their energy in d_ff = 512; r_m 64 / 96 / 128 keep 90 / 98 / 100 %
# of refusals after 100 edits at 74 / 63 / 52 % efficacy (AlphaEdit: 0 % refusals, 76 % efficacy).
_TOYWORLD: dict[str, dict[str, Any]] = {
    "memit": dict(layers=[1], clamp_norm_factor=1.5),
    "alphaedit": dict(layers=[1], clamp_norm_factor=1.5),
    "same": dict(layers=[1], clamp_norm_factor=1.5, r_m=96),
    "mose": dict(layers=[0, 1, 2], clamp_norm_factor=1.5),
    "mose_oft": dict(layers=[1]),
    "rome": dict(layers=[1]),
}


def is_toyworld(model_name: str) -> bool:
    """``toyworld:<seed>``, a path containing "toyworld" (the cache folders), or a model folder whose parent
    holds a toy world manifest (``rayedit toyworld build --out ANY``)."""
    if "toyworld" in model_name.lower():
        return True
    manifest = Path(model_name).parent / "manifest.json"
    try:
        return manifest.is_file() and '"rayedit-toyworld"' in manifest.read_text(encoding="utf-8")[:4096]
    except (OSError, ValueError):
        return False


# [REF] behaviours selected by ``compat: reference`` (methods.md tags): ROME's original key and float32 solve
# (the reference inverts Σ in float32), AlphaEdit's float32 solve, the projection from an SVD of the float32
# covariance with the absolute threshold, an absolute L2; no rule-scaled values (only rule layers remain).
# MEMIT's reference solve is float64 already.
COMPAT_REFERENCE: dict[str, Any] = {
    "rome_key": "original",
    "nullspace_mode": "threshold",
    "nullspace_decomposition": "svd",
    "nullspace_dtype": "float32",
    "L2_relative": None,
}
_COMPAT_FLOAT32_SOLVE = ("rome", "alphaedit", "same")

# explicit pairs that cannot both hold: (a, b, conflict(a_value, b_value))
_CONFLICTS: tuple[tuple[str, str, Any], ...] = (
    ("L2", "L2_relative", lambda a, b: b is not None),
    ("mose_lambda", "mose_lambda_rel", lambda a, b: a is not None),
    ("nullspace_threshold", "nullspace_mode", lambda a, b: b == "energy"),
    ("nullspace_energy", "nullspace_mode", lambda a, b: b == "threshold"),
)
# a user value that makes a lower layer's value of another key meaningless: (set key, other key, value)
_IMPLIED: tuple[tuple[str, str, Any], ...] = (
    ("L2", "L2_relative", None),  # an absolute α asked for is the α used
    ("mose_lambda_rel", "mose_lambda", None),
    ("nullspace_threshold", "nullspace_mode", "threshold"),
    ("nullspace_energy", "nullspace_mode", "energy"),
)
# keys whose value is a file read at resolution (its content becomes the value)
_FILE_KEYS = ("context_templates",)


def _read_templates(path: str) -> Any:
    p = Path(path).expanduser()
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))  # JSON is read as YAML
    except OSError as exc:
        raise ValueError(f"context_templates: cannot read {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"context_templates: {path}: {yaml_error_line(exc)}") from None
    if not isinstance(data, list):
        raise ValueError(f"context_templates: {path}: expected a list of templates (ROME) or of template groups "
                         f"(MEMIT), got {type(data).__name__}")
    return data


def resolve_hparams(method: str, model_name: str, n_layers: int, overrides: dict[str, Any] | None = None,
                    d_ff: int | None = None, model_type: str | None = None) -> _Base:
    """Defaults → preset or rule → preset file → compat bundle → user values; validates layer indices (and,
    given ``model_type``, an official hparams file's module names) against the model.

    ``overrides`` holds the user's values; under ``preset_values`` the values of a preset file (a lower
    layer). A dict carrying ``provenance: preset-file:…`` as a whole (specs frozen before presets were kept
    apart) is one preset layer."""
    if method not in HPARAMS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(sorted(HPARAMS))}")
    cls = HPARAMS[method]
    fields = cls.model_fields
    user = dict(overrides or {})
    preset_file = user.pop("preset_values", None)
    if preset_file is None and str(user.get("provenance", "")).startswith("preset-file:"):
        preset_file, user = user, {}
    preset_file = dict(preset_file or {})
    from .reference import absorb_reference_keys

    absorb_reference_keys(method, user, fields)  # official hparams files: translate and set aside
    for k in _FILE_KEYS:
        if isinstance(user.get(k), str):
            user[k] = _read_templates(user[k])
    problems = [f"{a}={user[a]!r} and {b}={user[b]!r} contradict each other; set one of them"
                for a, b, bad in _CONFLICTS if a in user and b in user and bad(user[a], user[b])]
    if problems:
        raise ValueError(f"invalid {method} hyperparameters: " + "; ".join(problems))
    compat = user.get("compat", preset_file.get("compat", "ours"))

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}

    def layer(vals: dict[str, Any], source: str) -> None:
        for k, v in vals.items():
            values[k] = v
            if k not in ("provenance", "method", "value_sources"):
                sources[k] = source

    preset, base = preset_for(model_name, method, n_layers)
    if preset is None:
        base = rule_values(method, n_layers, d_ff)
        if compat == "reference":  # no rule-scaled values; the rule's layers only
            base = {"layers": base["layers"], "provenance": "rule"}
        layer(base, "rule")
        if method in _TOYWORLD and is_toyworld(model_name):
            layer({**_TOYWORLD[method], "provenance": "preset:toyworld"}, "preset:toyworld")
    else:
        layer({**base, "provenance": f"preset:{preset}"}, f"preset:{preset}")
    if preset_file:
        layer(preset_file, str(preset_file.get("provenance") or "preset-file"))
    if compat == "reference":
        bundle = {k: v for k, v in COMPAT_REFERENCE.items() if k in fields}
        if method in _COMPAT_FLOAT32_SOLVE:
            bundle["solve_dtype"] = "float32"
        if method == "mose_oft":
            bundle["radius_factor"] = fields["radius_factor"].default  # the released absolute-size radius
        layer(bundle, "compat:reference")
    ref_values = (user.get("reference_settings") or {}).get("values", {})
    for k, v in user.items():
        values[k] = v
        if k not in ("provenance", "method", "value_sources", "reference_settings"):
            sources[k] = (f"reference-file:{user['reference_settings'].get('file', '?')}"
                          if k in ref_values and ref_values[k] == v else "user")
    for key, other, implied in _IMPLIED:  # explicit values win over what lower layers set beside them
        if key in user and other not in user and other in fields and values.get(other, implied) != implied:
            values[other] = implied
            sources[other] = f"implied by {key}"
    values["method"] = method
    values["value_sources"] = {k: sources.get(k, "default") for k in fields
                               if k not in ("method", "provenance", "value_sources", "reference_settings")}
    try:
        hp = cls(**values)
    except ValidationError as exc:
        errs = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"invalid {method} hyperparameters: {errs}") from None
    bad = [x for x in hp.layers if x >= n_layers]
    if bad or not hp.layers:
        raise ValueError(f"invalid {method} hyperparameters: layers {hp.layers} out of range for a model with "
                         f"{n_layers} layers (0..{n_layers - 1})")
    if method == "rome" and len(hp.layers) != 1:
        raise ValueError(f"invalid rome hyperparameters: ROME edits exactly one layer, got {hp.layers}")
    if hp.reference_settings:
        from .reference import check_reference_settings

        check_reference_settings(method, hp.reference_settings, n_layers, model_type)
    if getattr(hp, "covariance_file", None):
        from .covariance import check_covariance_file

        check_covariance_file(hp.covariance_file, hp.layers, d_ff)
    return hp


def describe_sources(hp: _Base) -> str:
    """One line for the terminal: the base provenance, then every value not from it or the defaults."""
    base = hp.provenance
    groups: dict[str, list[str]] = {}
    for k, src in hp.value_sources.items():
        if src not in ("default", base, f"preset:{base}") and not (base == "rule" and src == "rule"):
            groups.setdefault(src, []).append(k)
    parts = [base] + [f"{src}: {', '.join(keys)}" for src, keys in groups.items()]
    return "; ".join(parts)


def load_overrides(path: str | Path) -> dict[str, Any]:
    """Hyperparameter overrides from a YAML or JSON file (a mapping); an official ROME/MEMIT/AlphaEdit/EasyEdit
    file is tagged with its name and hash (its module/dataset keys are set aside at resolution)."""
    import json

    from .reference import is_reference, mark_reference_file

    p = Path(path)
    try:
        raw = p.read_bytes()
        # JSON as JSON: YAML 1.1 reads the reference files' ``5e-1`` as a string
        data = json.loads(raw) if p.suffix.lower() == ".json" else yaml.safe_load(raw)
    except OSError as exc:
        raise ValueError(f"{p}: cannot read hyperparameters: {exc}") from None
    except yaml.YAMLError as exc:  # one line: PyYAML's own message spans several, with a source snippet
        raise ValueError(f"{p}: cannot read hyperparameters: {yaml_error_line(exc)}") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{p}: cannot read hyperparameters: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{p}: hyperparameters must be a mapping, got {type(data).__name__}")
    if expanded_size(data, MAX_VALUES) > MAX_VALUES:  # YAML aliases can expand enormously
        raise ValueError(f"{p}: hyperparameters hold more than {MAX_VALUES} values (with YAML aliases "
                         "expanded)")
    if is_reference(data):
        data = mark_reference_file(data, p, raw)
    return data
