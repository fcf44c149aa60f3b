"""Hyperparameters (pydantic, unknown keys are errors), presets (methods.md §4) and the default rule.

Resolution order: method defaults → preset for the model (by name) or the depth-proportional rule →
user overrides (YAML/CLI). The resolved values and their provenance are recorded with every result.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

from ..safe_yaml import MAX_VALUES, expanded_size, yaml_error_line

NullspaceMode = Literal["threshold", "energy", "auto"]  # auto: threshold, energy if that selects none/all
FactToken = Literal["subject_last", "subject_first", "subject_first_after_last", "last"]


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    method: str
    layers: list[StrictInt] = Field(default_factory=list)  # strict: YAML `true` (or 1.0) is not layer 1
    solve_dtype: Literal["float64", "float32"] = "float64"  # [OURS] fp64 solves (§9)
    template_seed: int = 0  # [OURS] seeded context templates (§2.3)
    provenance: str = "default"  # preset name, "rule", or "proposed"

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


class _StatsFields(BaseModel):
    mom2_dataset: str = "auto"
    mom2_n_samples: int = Field(100_000, ge=1)
    mom2_dtype: Literal["float32", "float64"] = "float32"
    mom2_max_len: int | None = Field(None, ge=1)
    mom2_max_tokens: int | None = Field(None, ge=1)
    mom2_seed: int = 1
    exclude_bos_from_stats: bool = False


class _NullspaceFields(BaseModel):
    """AlphaEdit's projection (§3.3): absolute threshold on the normalised Σ, energy, or auto (§4.3)."""

    nullspace_mode: NullspaceMode = "threshold"
    nullspace_threshold: float = Field(2e-2, gt=0, allow_inf_nan=False)
    nullspace_energy: float = Field(1e-3, gt=0, lt=1)


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


def resolve_hparams(method: str, model_name: str, n_layers: int, overrides: dict[str, Any] | None = None,
                    d_ff: int | None = None) -> _Base:
    """Defaults → preset or rule → overrides; validates layer indices against the model."""
    if method not in HPARAMS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(sorted(HPARAMS))}")
    cls = HPARAMS[method]
    preset, values = preset_for(model_name, method, n_layers)
    if preset is None:
        values = rule_values(method, n_layers, d_ff)
        if method in _TOYWORLD and is_toyworld(model_name):
            values.update(_TOYWORLD[method], provenance="preset:toyworld")
    else:
        values["provenance"] = f"preset:{preset}"
    values.update(overrides or {})
    values["method"] = method
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
    return hp


def load_overrides(path: str | Path) -> dict[str, Any]:
    """Hyperparameter overrides from a YAML file (a mapping)."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as exc:
        raise ValueError(f"{p}: cannot read hyperparameters: {exc}") from None
    except yaml.YAMLError as exc:  # one line: PyYAML's own message spans several, with a source snippet
        raise ValueError(f"{p}: cannot read hyperparameters: {yaml_error_line(exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{p}: hyperparameters must be a mapping, got {type(data).__name__}")
    if expanded_size(data, MAX_VALUES) > MAX_VALUES:  # YAML aliases can expand enormously
        raise ValueError(f"{p}: hyperparameters hold more than {MAX_VALUES} values (with YAML aliases "
                         "expanded)")
    return data
