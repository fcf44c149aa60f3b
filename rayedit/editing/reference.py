"""Official ROME / MEMIT / AlphaEdit (and EasyEdit) hyperparameter files, read as they are.

Keys that mean the same thing in rayedit (``layers``, ``v_*``, ``clamp_norm_factor``, ``kl_factor``,
``fact_token``, ``mom2_update_weight``, ``L2``, ``nullspace_threshold``, ``mom2_n_samples``, …) are used as
the user's values. Keys that only name modules, datasets or devices are set aside under
``reference_settings`` (recorded with the resolved hyperparameters), after the ones that can be wrong for
the model are checked: a module template the adapter does not match, a loss layer other than the last,
another layer selection or other template lengths are errors naming the key.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

# keys that name modules of the model: compared with the adapter's module paths
MODULE_KEYS = ("rewrite_module_tmp", "layer_module_tmp", "mlp_module_tmp", "attn_module_tmp", "ln_f_module",
               "lm_head_module")
# keys of the reference code (and EasyEdit) with no rayedit meaning: recorded, some checked
OTHER_KEYS = ("alg_name", "model_name", "mom2_dataset", "layer_selection", "context_template_length_params",
              "v_loss_layer", "stats_dir", "device", "model_parallel", "fp16", "max_length", "P_loc",
              "mom2_adjustment")
# template lengths the reference samples: ROME [(length, samples)], MEMIT family (hard-coded there)
REFERENCE_TEMPLATE_LENGTHS = {"rome": [[5, 10], [10, 10]], "memit": [[10, 5]]}
# how the input-embedding module is named where the LM head is tied to it (GPT-2's files name it)
TIED_EMBEDDINGS = ("transformer.wte", "model.embed_tokens", "gpt_neox.embed_in")


def is_reference(data: dict[str, Any]) -> bool:
    """Does ``data`` look like an official hparams file (module templates or EasyEdit's ``alg_name``)?"""
    return any(k in data for k in MODULE_KEYS) or "alg_name" in data


def mark_reference_file(data: dict[str, Any], path: Path, raw: bytes) -> dict[str, Any]:
    """Tag the values of an official file with its name and hash (``absorb_reference_keys`` sets aside)."""
    out = dict(data)
    # the values (to label their source at resolution), without the module names, which are set aside there
    out["reference_settings"] = {"file": path.name, "sha256": hashlib.sha256(raw).hexdigest(),
                                 "values": {k: v for k, v in data.items() if k not in MODULE_KEYS}}
    return out


def absorb_reference_keys(method: str, user: dict[str, Any], fields: dict[str, Any]) -> None:
    """In place: move reference-only keys (and keys of other methods that this method does not use, e.g.
    AlphaEdit files' ``mom2_update_weight``) of an official file's values into ``reference_settings``."""
    ref = user.get("reference_settings")
    if not is_reference(user) and not ref:
        return
    from .hparams import HPARAMS

    any_method = set().union(*(cls.model_fields for cls in HPARAMS.values()))
    ref = dict(ref or {})
    set_aside = dict(ref.get("set_aside", {}))
    # a reference file's ``mom2_dataset`` names their Wikipedia dump: set aside (rayedit's corpus is stats_corpus)
    for k in list(user):
        if k == "reference_settings" or (k in fields and k != "mom2_dataset"):
            continue
        if k in MODULE_KEYS or k in OTHER_KEYS:
            set_aside[k] = user.pop(k)
        elif k in any_method:
            set_aside[k] = user.pop(k)
            set_aside.setdefault("unused_by_" + method, []).append(k)
    ref["set_aside"] = set_aside
    ref.setdefault("values", {})
    user["reference_settings"] = ref


def _expected_modules(model_type: str) -> dict[str, tuple[str, ...]]:
    from ..models.adapters import FAMILIES

    f = FAMILIES[model_type]
    return {
        "rewrite_module_tmp": (f"{f.layers}.{{}}.{f.down_proj}",),
        "layer_module_tmp": (f"{f.layers}.{{}}",),
        "mlp_module_tmp": (f"{f.layers}.{{}}.{f.mlp}",),
        "ln_f_module": (f.final_norm,),
        "lm_head_module": (f.lm_head, *TIED_EMBEDDINGS),
    }


def check_reference_settings(method: str, ref: dict[str, Any], n_layers: int, model_type: str | None) -> None:
    """Errors for set-aside keys that contradict the model or rayedit's pipeline (one line, key named)."""
    aside = ref.get("set_aside", {})
    where = f"reference hparams{' ' + ref['file'] if ref.get('file') else ''}"
    problems = []
    if model_type is not None:
        from ..models.adapters import FAMILIES

        if model_type in FAMILIES:
            for k, allowed in _expected_modules(model_type).items():
                if k in aside and aside[k] not in allowed:
                    problems.append(f"{k}={aside[k]!r} does not match the {model_type} adapter ({allowed[0]!r})")
            attn = aside.get("attn_module_tmp")
            prefix = f"{FAMILIES[model_type].layers}.{{}}."
            if attn is not None and not str(attn).startswith(prefix):
                problems.append(f"attn_module_tmp={attn!r} is not inside a {model_type} block ({prefix}…)")
    if "v_loss_layer" in aside and aside["v_loss_layer"] != n_layers - 1:
        problems.append(f"v_loss_layer={aside['v_loss_layer']!r}: rayedit reads the target loss at the last "
                        f"layer ({n_layers - 1}) of this model")
    if "layer_selection" in aside and aside["layer_selection"] != "all":
        problems.append(f"layer_selection={aside['layer_selection']!r}: only 'all' (every listed layer) exists")
    lengths = aside.get("context_template_length_params")
    expected = REFERENCE_TEMPLATE_LENGTHS["rome" if method == "rome" else "memit"]
    if lengths is not None and lengths != expected:
        problems.append(f"context_template_length_params={lengths!r}: rayedit samples {expected} for {method}; "
                        "give other templates as context_templates")
    alg = aside.get("alg_name")
    if alg is not None and str(alg).lower().replace("-", "_") != method:
        problems.append(f"alg_name={alg!r} is not {method}")
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems))
