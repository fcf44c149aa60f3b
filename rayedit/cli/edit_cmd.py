"""`rayedit edit` (one edit, before/after probabilities; ``--preset FILE`` from `rayedit presets`) and
`rayedit models tiny`."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import typer

from rayedit.cli.app import app

models_app = typer.Typer(help="Model utilities.", no_args_is_help=True)
app.add_typer(models_app, name="models")


def fail(message: str, code: int = 2) -> None:
    """One clear line on stderr, then exit (no traceback for bad input)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _parse_set(values: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in values:
        if "=" not in item:
            fail(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def target_probability(lm, prompt_text: str, target: str) -> float:
    """P(target | prompt), teacher forced over all target tokens."""
    import torch

    from rayedit.editing.tokens import encode, target_ids

    ids = encode(lm.tokenizer, prompt_text)
    t = target_ids(lm.tokenizer, prompt_text, target)
    x = torch.tensor([ids + t[:-1]], device=lm.adapter.device)
    with torch.no_grad():
        lp = torch.log_softmax(lm.model(input_ids=x, use_cache=False).logits[0].float(), -1)
    return math.exp(sum(float(lp[len(ids) - 1 + j, tok]) for j, tok in enumerate(t)))


@app.command("edit")
def edit_command(
    model: str | None = typer.Option(None, "--model", help="HF hub name, local folder, .gguf file (or folder), "
                                                          "smollm2-135m (packaged), toyworld:<seed> or tiny:<family> "
                                                          "(default: the preset's model)"),
    method: str | None = typer.Option(None, "--method", help="rome | memit | alphaedit | ft | ... (default: the "
                                                            "preset's method, else memit)"),
    preset: Path | None = typer.Option(None, "--preset", help="preset file (`rayedit presets suggest|rank`): "
                                                              "method, hyperparameters, statistics corpus"),
    prompt: str = typer.Option(..., "--prompt", help='template with "{}" for the subject'),
    subject: str = typer.Option(..., "--subject"),
    target_new: str = typer.Option(..., "--target-new"),
    target_true: str | None = typer.Option(None, "--target-true"),
    stats_corpus: str | None = typer.Option(None, "--stats-corpus",
                                            help="builtin:general | enwiki-sample | file (.txt/.json/.jsonl/.parquet)"
                                                 " | hf:NAME[:CFG][@REV]"),
    hparams_file: Path | None = typer.Option(None, "--hparams", help="YAML/JSON file of hyperparameters (ours, or "
                                                                     "an official ROME/MEMIT/AlphaEdit/EasyEdit file)"),
    compat: str | None = typer.Option(None, "--compat", help="reference: every [REF] behaviour of the official "
                                                             "code (ROME's key, float32 solves, SVD projection, ...)"),
    set_: list[str] = typer.Option([], "--set", help="override one hyperparameter: KEY=VALUE (JSON value)"),
    layers: str | None = typer.Option(None, "--layers", help="comma-separated layer indices"),
    dtype: str = typer.Option("float32", "--dtype"),
    device: str | None = typer.Option(None, "--device"),
    attn_implementation: str | None = typer.Option(None, "--attn-implementation",
                                                   help="eager | sdpa | flash_attention_2 (transformers)"),
    save: Path | None = typer.Option(None, "--save", help="write the edited model (safetensors) here"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Edit one fact and print P(target_new) (and P(target_true)) before and after."""
    from pydantic import ValidationError

    from rayedit.data.requests import EditRequest
    from rayedit.editing import METHODS, load_overrides

    # validate everything cheap before any model work
    preset_obj = None
    if preset is not None:
        from rayedit.locate.presets import PresetError, load_preset

        try:
            preset_obj = load_preset(preset)
        except PresetError as exc:
            fail(str(exc))
        if method is not None and method != preset_obj.method:
            fail(f"--method {method} differs from the preset's method {preset_obj.method} ({preset})")
        if model is not None and model != preset_obj.model:
            typer.echo(f"warning: the preset was tuned on {preset_obj.model!r}, editing {model!r}", err=True)
        stats_corpus = stats_corpus or preset_obj.stats_corpus
    method = method or (preset_obj.method if preset_obj else "memit")
    model = model or (preset_obj.model if preset_obj else None)
    if model is None:
        fail("--model is required (or --preset)")
    if method not in METHODS:
        fail(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    try:
        req = EditRequest(case_id="cli-0", prompt=prompt, subject=subject, target_new=target_new,
                          target_true=target_true)
    except ValidationError as exc:
        fail("invalid edit request: " + "; ".join(
            f"{'.'.join(str(x) for x in e['loc']) or 'request'}: {e['msg']}" for e in exc.errors()))
    if subject not in req.text:
        fail(f"subject {subject!r} does not occur in the prompt")
    # the preset is a lower layer: the flags below are the user's values and win over it
    overrides: dict[str, Any] = {"preset_values": preset_obj.overrides()} if preset_obj else {}
    try:
        if hparams_file is not None:
            overrides.update(load_overrides(hparams_file))
        overrides.update(_parse_set(set_))
        if layers:
            overrides["layers"] = [int(x) for x in layers.split(",") if x.strip()]
    except ValueError as exc:
        fail(str(exc))
    if compat is not None:
        overrides["compat"] = compat
    local_corpus = (stats_corpus and not stats_corpus.startswith(("hf:", "builtin:", "toyworld:"))
                    and stats_corpus not in ("auto", "wikitext", "enwiki-sample"))
    if local_corpus and not Path(stats_corpus).is_file():
        fail(f"stats corpus file not found: {stats_corpus}")

    import torch

    from rayedit.editing import Editor, resolve_hparams
    from rayedit.editing.hparams import describe_sources
    from rayedit.models import ModelLoadError, UnsupportedArchitectureError, load_model, model_dims

    tiny = model.startswith("tiny:")
    model_type: str | None = None
    if tiny or model.startswith("toyworld:"):
        from rayedit.runtime.spec import model_id, model_path

        hp_name = model_id(model)  # the name presets and tiny models are matched on
        try:
            load_path = None if tiny else model_path(model)  # the toy world's saved model folder
        except ValueError as exc:
            fail(str(exc))
    else:
        hp_name, load_path = model, model
    try:  # config only: a bad name, architecture, layer or hyperparameter fails before weights load
        if tiny:
            from rayedit.runtime.locate import model_shape

            n_layers, d_ff = model_shape(model)
        else:
            model_type, n_layers, d_ff = model_dims(load_path)
        hp = resolve_hparams(method, hp_name, n_layers, overrides, d_ff=d_ff, model_type=model_type)
    except (ModelLoadError, UnsupportedArchitectureError, OSError, ValueError) as exc:
        fail(str(exc))
    torch.manual_seed(0)
    try:
        if tiny:
            from rayedit.models import build_tiny_model

            lm = build_tiny_model(model.split(":", 1)[1])
        else:
            lm = load_model(load_path, dtype=dtype, device=device, attn_implementation=attn_implementation)
    except (ModelLoadError, UnsupportedArchitectureError, OSError) as exc:
        fail(str(exc))
    editor = Editor(lm, method, hp, stats_corpus=stats_corpus, progress=sys.stderr.isatty())
    before = {"p_new": target_probability(lm, req.text, req.target_new)}
    if req.target_true:
        before["p_true"] = target_probability(lm, req.text, req.target_true)
    t0 = time.perf_counter()
    try:
        res = editor.apply([req])
    except Exception as exc:  # an edit failure is reported in one line; the weights were rolled back
        fail(f"edit failed: {exc}", code=1)
    seconds = time.perf_counter() - t0
    after = {"p_new": target_probability(lm, req.text, req.target_new)}
    if req.target_true:
        after["p_true"] = target_probability(lm, req.text, req.target_true)
    if save is not None:
        save.mkdir(parents=True, exist_ok=True)
        lm.model.save_pretrained(save)  # safetensors; handles tied weights
        lm.tokenizer.save_pretrained(save)
    out = {"method": method, "model": model, "layers": res.layers, "before": before, "after": after,
           "seconds": round(seconds, 3), "hparams_provenance": editor.hp.provenance,
           "value_sources": editor.hp.value_sources, "compat": editor.hp.compat,
           "update_norms": {str(r["layer"]): r["update_norm"] for r in res.layer_rows if "layer" in r}}
    if preset_obj is not None:
        out["preset"] = {"file": str(preset), "campaign": preset_obj.provenance.campaign,
                         "objective": preset_obj.provenance.objective, "score": preset_obj.provenance.score}
    if as_json:
        typer.echo(json.dumps(out))
        return
    typer.echo(f"{method} on {model}, layers {res.layers} ({describe_sources(editor.hp)}), {seconds:.2f} s")
    typer.echo(f"  P(new ={req.target_new!r}): {before['p_new']:.6f} -> {after['p_new']:.6f}")
    if req.target_true:
        typer.echo(f"  P(true={req.target_true!r}): {before['p_true']:.6f} -> {after['p_true']:.6f}")
    if save is not None:
        typer.echo(f"  edited model written to {save}")


@models_app.command("tiny")
def tiny_command(
    family: str = typer.Argument(..., help="gpt2 | gptj | llama | mistral | qwen2 | qwen3"),
    out: Path = typer.Option(..., "--out"),
    seed: int = typer.Option(0, "--seed"),
    n_layers: int = typer.Option(4, "--layers"),
) -> None:
    """Write a tiny random model of FAMILY (with tokenizer) that loads like any hub model."""
    from rayedit.models import TINY_FAMILIES, save_tiny_model

    if family not in TINY_FAMILIES:
        fail(f"unknown tiny family {family!r}; choose one of {', '.join(TINY_FAMILIES)}")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    path = save_tiny_model(family, out, seed=seed, n_layers=n_layers)
    typer.echo(f"tiny {family} model ({n_layers} layers) written to {path}")
