"""Coming from the reference code: official hparams files, ``compat: reference``, explicit values win, and
updates with fixed inputs (templates, a handed-in covariance) equal the reference's formulas computed
independently here in float64."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from rayedit.data.requests import EditRequest
from rayedit.editing import Editor, load_overrides, resolve_hparams
from rayedit.editing.hparams import describe_sources
from rayedit.models import build_tiny_model

N_LAYERS, D_FF = 4, 256  # the tiny models' shape

# official-format files as the ROME / MEMIT / AlphaEdit repositories ship them (GPT-2 module names)
GPT2_MODULES = {
    "rewrite_module_tmp": "transformer.h.{}.mlp.c_proj", "layer_module_tmp": "transformer.h.{}",
    "mlp_module_tmp": "transformer.h.{}.mlp", "attn_module_tmp": "transformer.h.{}.attn",
    "ln_f_module": "transformer.ln_f", "lm_head_module": "transformer.wte",
}
ROME_FILE = {"layers": [1], "fact_token": "subject_last", "v_num_grad_steps": 20, "v_lr": 0.5,
             "v_loss_layer": 3, "v_weight_decay": 0.5, "clamp_norm_factor": 4, "kl_factor": 0.0625,
             "mom2_adjustment": True, "context_template_length_params": [[5, 10], [10, 10]], **GPT2_MODULES,
             "mom2_dataset": "wikipedia", "mom2_n_samples": 100000, "mom2_dtype": "float32"}
MEMIT_FILE = {"layers": [1, 2], "clamp_norm_factor": 0.75, "layer_selection": "all", "fact_token": "subject_last",
              "v_num_grad_steps": 20, "v_lr": 0.5, "v_loss_layer": 3, "v_weight_decay": 0.5, "kl_factor": 0.0625,
              "mom2_adjustment": True, "mom2_update_weight": 20000, **GPT2_MODULES, "mom2_dataset": "wikipedia",
              "mom2_n_samples": 100000, "mom2_dtype": "float32"}
ALPHAEDIT_FILE = {**MEMIT_FILE, "nullspace_threshold": 2e-2, "L2": 10}
SET_ASIDE_MODULES = set(GPT2_MODULES)


def _write_json(path, data):
    path.write_text(json.dumps(data, indent=4).replace("0.5", "5e-1"))  # the files' own number style
    return path


def test_reference_files_resolve_to_the_reference_settings(tmp_path):
    """Every value of an official file (with ``compat: reference``) and its source."""
    f = _write_json(tmp_path / "gpt2-xl.json", ALPHAEDIT_FILE)
    over = load_overrides(f) | {"compat": "reference"}
    hp = resolve_hparams("alphaedit", "tiny-gpt2", N_LAYERS, over, d_ff=D_FF, model_type="gpt2")
    expect = {"layers": [1, 2], "clamp_norm_factor": 0.75, "fact_token": "subject_last", "v_num_grad_steps": 20,
              "v_lr": 0.5, "v_weight_decay": 0.5, "kl_factor": 0.0625, "mom2_n_samples": 100000,
              "mom2_dtype": "float32", "nullspace_threshold": 2e-2, "L2": 10.0}
    for k, v in expect.items():
        assert getattr(hp, k) == v, k
        assert hp.value_sources[k] == "reference-file:gpt2-xl.json", k
    reference_behaviour = {"solve_dtype": "float32", "nullspace_mode": "threshold", "nullspace_decomposition": "svd",
                           "nullspace_dtype": "float32", "L2_relative": None}
    for k, v in reference_behaviour.items():
        assert getattr(hp, k) == v, k
        assert hp.value_sources[k] == "compat:reference", k
    assert hp.compat == "reference" and hp.value_sources["compat"] == "user"
    aside = hp.reference_settings["set_aside"]
    assert SET_ASIDE_MODULES | {"layer_selection", "v_loss_layer", "mom2_dataset", "mom2_adjustment",
                                "mom2_update_weight"} <= set(aside)
    assert aside["unused_by_alphaedit"] == ["mom2_update_weight"]  # AlphaEdit's solve has no λ (§3.3)
    assert hp.reference_settings["sha256"] and hp.mom2_dataset == "auto"  # our corpus is chosen by stats_corpus

    rome = resolve_hparams("rome", "tiny-gpt2", N_LAYERS, load_overrides(_write_json(tmp_path / "r.json", ROME_FILE))
                           | {"compat": "reference"}, d_ff=D_FF, model_type="gpt2")
    assert (rome.rome_key, rome.solve_dtype, rome.mom2_adjustment, rome.clamp_norm_factor) == (
        "original", "float32", True, 4.0)
    assert rome.value_sources["rome_key"] == "compat:reference"
    assert rome.value_sources["mom2_adjustment"] == "reference-file:r.json"

    memit = resolve_hparams("memit", "tiny-gpt2", N_LAYERS, load_overrides(_write_json(tmp_path / "m.json", MEMIT_FILE))
                            | {"compat": "reference"}, d_ff=D_FF, model_type="gpt2")
    assert memit.mom2_update_weight == 20000 and memit.solve_dtype == "float64"  # MEMIT's [REF] solve is fp64
    assert memit.value_sources["mom2_update_weight"] == "reference-file:m.json"

    # ours stays ours: without the switch the rule's relative α and float64 solves remain
    ours = resolve_hparams("alphaedit", "tiny-gpt2", N_LAYERS, {}, d_ff=D_FF)
    assert (ours.compat, ours.solve_dtype, ours.L2_relative) == ("ours", "float64", 1e-2)
    assert ours.value_sources["L2_relative"] == "rule"


def test_easyedit_yaml_and_checks_against_the_model(tmp_path):
    y = tmp_path / "llama3-8b.yaml"
    y.write_text("alg_name: AlphaEdit\nmodel_name: ./hugging_cache/llama-3-8b-instruct\nstats_dir: ./data/stats\n"
                 "device: 0\nlayers: [1, 2]\nclamp_norm_factor: 0.75\nlayer_selection: all\n"
                 "fact_token: subject_last\nv_num_grad_steps: 25\nv_lr: 0.1\nv_loss_layer: 3\n"
                 "v_weight_decay: 0.5\nkl_factor: 0.0625\nmom2_adjustment: true\nmom2_update_weight: 15000\n"
                 "rewrite_module_tmp: model.layers.{}.mlp.down_proj\nlayer_module_tmp: model.layers.{}\n"
                 "mlp_module_tmp: model.layers.{}.mlp\nattn_module_tmp: model.layers.{}.self_attn\n"
                 "ln_f_module: model.norm\nlm_head_module: lm_head\nmom2_dataset: wikipedia\n"
                 "mom2_n_samples: 100000\nmom2_dtype: float32\nnullspace_threshold: 0.02\nL2: 1\n"
                 "model_parallel: false\n")
    hp = resolve_hparams("alphaedit", "tiny-llama", N_LAYERS, load_overrides(y), d_ff=D_FF, model_type="llama")
    assert (hp.L2, hp.v_lr, hp.layers) == (1.0, 0.1, [1, 2])
    assert hp.reference_settings["set_aside"]["model_name"] == "./hugging_cache/llama-3-8b-instruct"
    # a module template the adapter does not match is an error naming it
    with pytest.raises(ValueError, match="rewrite_module_tmp.*does not match the gpt2 adapter"):
        resolve_hparams("alphaedit", "tiny-gpt2", N_LAYERS, load_overrides(y), d_ff=D_FF, model_type="gpt2")
    bad = _write_json(tmp_path / "bad.json", {**MEMIT_FILE, "v_loss_layer": 47})
    with pytest.raises(ValueError, match="v_loss_layer=47"):
        resolve_hparams("memit", "tiny-gpt2", N_LAYERS, load_overrides(bad), d_ff=D_FF, model_type="gpt2")
    other = _write_json(tmp_path / "other.json", {**MEMIT_FILE, "alg_name": "ROME"})
    with pytest.raises(ValueError, match="alg_name='ROME' is not memit"):
        resolve_hparams("memit", "tiny-gpt2", N_LAYERS, load_overrides(other), d_ff=D_FF, model_type="gpt2")
    # a key that is neither ours nor the reference's is still an error
    with pytest.raises(ValueError, match="not_a_key"):
        resolve_hparams("memit", "tiny-gpt2", N_LAYERS, {**load_overrides(other), "alg_name": "MEMIT",
                                                          "not_a_key": 1}, d_ff=D_FF, model_type="gpt2")


def test_explicit_values_win_and_conflicts_are_errors():
    hp = resolve_hparams("alphaedit", "tiny-llama", N_LAYERS, {"L2": 1.0}, d_ff=D_FF)
    assert hp.L2 == 1.0 and hp.L2_relative is None
    assert hp.value_sources["L2"] == "user" and hp.value_sources["L2_relative"] == "implied by L2"
    assert "user: L2" in describe_sources(hp)  # `rayedit edit` no longer says only "(rule)"
    with pytest.raises(ValueError, match="L2=1.0 and L2_relative=0.1 contradict"):
        resolve_hparams("alphaedit", "tiny-llama", N_LAYERS, {"L2": 1.0, "L2_relative": 0.1}, d_ff=D_FF)
    hp = resolve_hparams("alphaedit", "tiny-llama", N_LAYERS, {"nullspace_threshold": 0.05}, d_ff=D_FF)
    assert hp.nullspace_mode == "threshold"  # the rule's auto mode could have replaced the threshold asked for
    with pytest.raises(ValueError, match="nullspace_threshold.*nullspace_mode.*contradict"):
        resolve_hparams("alphaedit", "tiny-llama", N_LAYERS, {"nullspace_threshold": 0.05,
                                                              "nullspace_mode": "energy"}, d_ff=D_FF)
    # an explicit value beats compat's bundle too
    hp = resolve_hparams("rome", "tiny-llama", N_LAYERS, {"compat": "reference", "rome_key": "rrome"}, d_ff=D_FF)
    assert hp.rome_key == "rrome" and hp.value_sources["rome_key"] == "user"
    # a preset file's values are a lower layer: the user's L2 wins over its L2_relative
    preset = resolve_hparams("alphaedit", "tiny-llama", N_LAYERS, {}, d_ff=D_FF).model_dump(
        mode="json", exclude={"method", "value_sources"}) | {"provenance": "preset-file:sweep"}
    hp = resolve_hparams("alphaedit", "tiny-llama", N_LAYERS, {"preset_values": preset, "L2": 3.0}, d_ff=D_FF)
    assert (hp.L2, hp.L2_relative, hp.value_sources["layers"]) == (3.0, None, "preset-file:sweep")


def test_explicit_l2_is_the_alpha_of_the_solve(tmp_path):
    torch.manual_seed(0)
    lm = build_tiny_model("llama")
    req = EditRequest(case_id="0", prompt="The favourite food of {}", subject="Alice Smith", target_new=" tea")
    path, _ = _stats_file(tmp_path, [1, 2], null_dims=64)
    res = Editor(lm, "alphaedit", {"L2": 1.0, "layers": [1, 2], "v_num_grad_steps": 3, "covariance_file": str(path),
                                   "context_templates": [["{}"], ["Hello. {}"]]}).apply([req])
    # the rule's α = L2_relative·tr(Σ) would be 0.01·tr(Σ) ≈ 5.3 here
    assert [r["L2"] for r in res.layer_rows if "L2" in r] == [1.0, 1.0]


# ---------------------------------------------------------------------------------------- fixed inputs
MEMIT_TEMPLATES = [["{}"], ["Alpha beta gamma. {}", "Once upon a time. {}"]]
ROME_TEMPLATES = ["{}", "Alpha beta gamma. {}", "Once upon a time. {}"]
REQUESTS = [EditRequest(case_id="0", prompt="The favourite food of {}", subject="Alice Smith", target_new=" tea"),
            EditRequest(case_id="1", prompt="The best friend of {}", subject="Bob Jones", target_new=" Carol")]


def _covariance(seed: int, null_dims: int) -> torch.Tensor:
    """A normalised second moment with a clear spectral gap: ``null_dims`` eigenvalues in [1e-3, 1e-2]
    (below AlphaEdit's 2e-2), the rest in [0.5, 5] (well conditioned for float32 solves)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(D_FF, D_FF, generator=g, dtype=torch.float64))
    evals = torch.cat([torch.linspace(1e-3, 1e-2, null_dims, dtype=torch.float64),
                       torch.linspace(0.5, 5.0, D_FF - null_dims, dtype=torch.float64)])
    return (q * evals) @ q.T


def _stats_file(tmp_path, layers, null_dims, scale=None):
    """``scale[layer]``: the keys' mean square per coordinate, so that λΣ and the edit keys are comparable."""
    tensors = {}
    for layer in layers:
        cov = _covariance(100 + layer, null_dims) * (scale or {}).get(layer, 1.0)
        tensors[f"sum.{layer}"] = (cov * 5000).float()  # a raw sum over 5000 tokens, as the reference stores it
        tensors[f"count.{layer}"] = torch.tensor([5000], dtype=torch.int64)
    path = tmp_path / "stats.safetensors"
    save_file(tensors, str(path))
    return path, {layer: (tensors[f"sum.{layer}"].double() / 5000) for layer in layers}


def _module(lm, layer):
    return dict(lm.model.named_modules())[f"{lm.adapter.spec.layers}.{layer}.{lm.adapter.spec.down_proj}"]


def _w_math(lm, layer) -> torch.Tensor:
    w = _module(lm, layer).weight.detach().double()
    return w if lm.adapter.spec.conv1d is False else w.T


def _read(lm, texts_subjects, layer, what):
    """Independent reading (one prompt per forward, plain hooks): the edited module's input ('key') or the
    block output ('block') at the subject's last token."""
    mod = _module(lm, layer) if what == "key" else dict(lm.model.named_modules())[f"{lm.adapter.spec.layers}.{layer}"]
    out = []
    for template, subject in texts_subjects:
        prefix = template[: template.index("{}")]
        text = template.replace("{}", subject)
        pos = len(lm.tokenizer(prefix + subject)["input_ids"]) - 1
        ids = torch.tensor([lm.tokenizer(text)["input_ids"]])
        seen = {}
        if what == "key":
            h = mod.register_forward_pre_hook(lambda _m, args, seen=seen: seen.__setitem__("x", args[0]))
        else:
            h = mod.register_forward_hook(lambda _m, _a, o, seen=seen: seen.__setitem__(
                "x", o[0] if isinstance(o, tuple) else o))
        with torch.no_grad():
            lm.model(input_ids=ids)
        h.remove()
        out.append(seen["x"][0, pos].double())
    return torch.stack(out, 1)


def _fill(context, prompt):
    return context.replace("{}", prompt)


def _memit_keys(lm, layer, requests, groups):
    cols = []
    for r in requests:
        means = [_read(lm, [(_fill(c, r.prompt), r.subject) for c in g], layer, "key").mean(1) for g in groups]
        cols.append(torch.stack(means).mean(0))
    return torch.stack(cols, 1)


def _apply(lm, layer, delta_math):
    mod = _module(lm, layer)
    with torch.no_grad():
        d = delta_math if lm.adapter.spec.conv1d is False else delta_math.T
        mod.weight += d.to(mod.weight.dtype)


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_fixed_inputs_match_the_reference_formulas(tmp_path, family, method):
    torch.manual_seed(0)
    lm = build_tiny_model(family)
    ref = copy.deepcopy(lm)  # the independent computation edits its own copy
    layers = [1, 2]
    # Σ at the keys' own scale (a random tiny model's keys are far from unit size), so the update is not
    # regularised to nothing; MEMIT's λΣ + KKᵀ stays well conditioned, AlphaEdit gets a null space
    scale = sum(float(_read(lm, [(r.prompt, r.subject) for r in REQUESTS], layer, "key").pow(2).mean())
                for layer in layers) / len(layers)
    null_dims = 64 if method == "alphaedit" else 0
    path, covs = _stats_file(tmp_path, layers, null_dims=null_dims, scale=dict.fromkeys(layers, scale))
    hp = {"layers": layers, "context_templates": MEMIT_TEMPLATES, "covariance_file": str(path), "v_num_grad_steps": 5,
          "compat": "reference"}
    alpha = 0.1 * D_FF * scale  # a tenth of a key's squared norm
    if method == "memit":
        hp["mom2_update_weight"] = 5.0
    else:
        hp.update(L2=alpha, nullspace_threshold=2e-2 * scale)
    res = Editor(lm, method, hp).apply(REQUESTS)
    z = res.targets.z.double()
    for i, layer in enumerate(layers):
        keys = _memit_keys(ref, layer, REQUESTS, MEMIT_TEMPLATES)  # (d_in, u) on the current (partly edited) copy
        h = _read(ref, [(r.prompt, r.subject) for r in REQUESTS], layers[-1], "block")
        resid = (z - h) / (len(layers) - i)
        if method == "memit":  # Δ = R Kᵀ (λΣ + K Kᵀ)⁻¹
            a = 5.0 * covs[layer] + keys @ keys.T
            delta = torch.linalg.solve(a, keys @ resid.T).T
        else:  # P from Σ's eigenvalues below 2e-2; (P K Kᵀ + αI) X = P K Rᵀ, Δ = Xᵀ
            evals, evecs = torch.linalg.eigh(covs[layer])
            u = evecs[:, evals < 2e-2 * scale]
            assert u.shape[1] == 64
            p = u @ u.T
            x = torch.linalg.solve(p @ keys @ keys.T + alpha * torch.eye(D_FF, dtype=torch.float64), p @ keys @ resid.T)
            delta = x.T
            assert _rel(delta @ p, delta) < 1e-10
        got = res.deltas[lm.adapter.weight_name(layer)].double()
        got = got if lm.adapter.spec.conv1d is False else got.T
        assert _rel(got, delta) < 1e-5, (method, family, layer, _rel(got, delta))
        _apply(ref, layer, delta)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_rome_fixed_inputs_match_the_reference_formula(tmp_path, family):
    torch.manual_seed(0)
    lm = build_tiny_model(family)
    ref = copy.deepcopy(lm)
    path, covs = _stats_file(tmp_path, [1], null_dims=0)
    (tmp_path / "templates.json").write_text(json.dumps(ROME_TEMPLATES))  # ROME's flat list, from a file
    res = Editor(lm, "rome", {"layers": [1], "context_templates": str(tmp_path / "templates.json"),
                              "covariance_file": str(path), "v_num_grad_steps": 5, "compat": "reference"}
                 ).apply(REQUESTS[:1])
    r = REQUESTS[0]
    keys = _read(ref, [(_fill(c, r.prompt), r.subject) for c in ROME_TEMPLATES], 1, "key")
    k_star, k_bare = keys.mean(1), keys[:, 0]
    u = torch.linalg.solve(covs[1], k_star)
    u = u / u.norm()
    bias = _module(ref, 1).bias
    w_out = _w_math(ref, 1) @ k_bare + (bias.detach().double() if bias is not None else 0.0)  # the edited MLP output
    right = (res.targets.z[:, 0].double() - w_out) / (k_bare @ u)  # original ROME: the bare prompt's key
    delta = torch.outer(right, u)
    got = res.deltas[lm.adapter.weight_name(1)].double()
    got = got if lm.adapter.spec.conv1d is False else got.T
    assert _rel(got, delta) < 1e-5, _rel(got, delta)


def test_covariance_file_is_checked_against_the_model(tmp_path):
    path, _ = _stats_file(tmp_path, [1], null_dims=0)
    with pytest.raises(ValueError, match="no statistics for layer 2"):
        resolve_hparams("memit", "tiny-llama", N_LAYERS, {"layers": [1, 2], "covariance_file": str(path)}, d_ff=D_FF)
    with pytest.raises(ValueError, match="512×512 expected"):
        resolve_hparams("memit", "tiny-llama", N_LAYERS, {"layers": [1], "covariance_file": str(path)}, d_ff=512)
    pkl = tmp_path / "stats.npz"
    pkl.write_bytes(b"PK\x03\x04 not safetensors")
    with pytest.raises(ValueError, match="not a safetensors file"):
        resolve_hparams("memit", "tiny-llama", N_LAYERS, {"layers": [1], "covariance_file": str(pkl)}, d_ff=D_FF)
    with pytest.raises(ValueError, match=r"context_templates.*must contain '\{\}' once"):
        resolve_hparams("memit", "tiny-llama", N_LAYERS, {"context_templates": [["{}"], ["no slot"]]}, d_ff=D_FF)


def test_attn_implementation_reaches_the_model(tmp_path):
    from rayedit.models import load_model, save_tiny_model

    folder = save_tiny_model("llama", tmp_path / "m")
    lm = load_model(str(folder), attn_implementation="eager")
    assert lm.model.config._attn_implementation == "eager"


def test_attn_implementation_and_reference_hparams_in_a_spec(tmp_path):
    """A spec's model option and a reference file's keys inline in a method's hparams, checked at validation."""
    from rayedit.runtime.spec import SpecError, deep_check, parse_spec

    data = tmp_path / "r.jsonl"
    data.write_text(json.dumps({"case_id": "c0", "prompt": "The best thing about {}", "subject": "Alice Smith",
                                "target_new": " tea"}) + "\n")
    d = {"name": "compat", "mode": "sequential_batches", "seeds": [0], "edits_per_stream": 1, "batch_size": 1,
         "models": [{"name": "tiny:gpt2", "attn_implementation": "eager"}],
         "methods": [{"name": "memit", "hparams": {**MEMIT_FILE, "compat": "reference"}}],
         "datasets": [{"kind": "requests", "path": str(data)}]}
    spec = parse_spec(d, "spec.yaml")
    assert spec.models[0].attn_implementation == "eager"
    assert deep_check(spec, tmp_path) == []
    bad = {**d, "models": [{"name": "tiny:gpt2", "attn_implementation": "fast"}]}
    with pytest.raises(SpecError, match="models.0.attn_implementation"):
        parse_spec(bad, "spec.yaml")
    wrong = {**d, "methods": [{"name": "memit", "hparams": {**MEMIT_FILE, "v_loss_layer": 47}}]}
    assert any("v_loss_layer=47" in p for p in deep_check(parse_spec(wrong, "spec.yaml"), tmp_path))
    other = {**d, "models": [{"name": "tiny:llama"}]}  # GPT-2 module names on a Llama model: before it loads
    assert any("rewrite_module_tmp" in p and "llama adapter" in p
               for p in deep_check(parse_spec(other, "spec.yaml"), tmp_path))


def test_spec_method_hparams_file_is_inlined(tmp_path):
    """``methods[i].hparams_file``: an official file's values become the method's hparams (its own keys win), the
    file's sha256 is recorded, and the frozen spec does not need the file again."""
    import yaml

    from rayedit.runtime.spec import SpecError, deep_check, load_spec, parse_spec, streams

    data = tmp_path / "r.jsonl"
    data.write_text(json.dumps({"case_id": "c0", "prompt": "The best thing about {}", "subject": "Alice Smith",
                                "target_new": " tea"}) + "\n")
    _write_json(tmp_path / "gpt2-xl.json", ALPHAEDIT_FILE)
    d = {"name": "compat", "mode": "sequential_batches", "seeds": [0], "edits_per_stream": 1, "batch_size": 1,
         "models": [{"name": "tiny:gpt2"}], "datasets": [{"kind": "requests", "path": "r.jsonl"}],
         "methods": [{"name": "alphaedit", "hparams_file": "gpt2-xl.json", "hparams": {"v_num_grad_steps": 3}}]}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(d))
    spec = load_spec(tmp_path / "spec.yaml")
    assert deep_check(spec, tmp_path) == []
    [stream] = streams(spec)
    assert stream.hparams["v_num_grad_steps"] == 3 and stream.hparams["L2"] == 10  # own keys win over the file
    assert stream.hparams["reference_settings"]["file"] == "gpt2-xl.json"
    assert len(spec.methods[0].hparams_file_sha256) == 64
    (tmp_path / "gpt2-xl.json").unlink()
    assert streams(parse_spec(spec.model_dump(mode="json"), "frozen"))[0].hparams == stream.hparams
    with pytest.raises(SpecError, match="methods.0.hparams_file"):
        load_spec(tmp_path / "spec.yaml")
