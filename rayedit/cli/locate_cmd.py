"""Locating and tuning: `rayedit trace`, `rayedit scan`, `rayedit presets suggest|rank|show`."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import typer

from rayedit.cli.app import app

presets_app = typer.Typer(help="Tuned hyperparameter presets: suggest one for a model, rank a campaign's "
                               "sweep, show a preset file.", no_args_is_help=True)
app.add_typer(presets_app, name="presets")

DATASET_HELP = ("CounterFact-format file, or toyworld-counterfact[:SEED] (default for toyworld:<seed> models); "
                "--dataset-kind for other kinds")


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _dataset(value: str | None, kind: str, model: str, known: bool = False):
    from pydantic import ValidationError

    from rayedit.runtime.locate import default_dataset
    from rayedit.runtime.spec import DatasetSpec

    if value is None:
        d = default_dataset(model)
        if d is None:
            _fail(f"--dataset is required for model {model!r} ({DATASET_HELP})")
        return d
    try:
        if value.startswith("toyworld-"):
            name, _, seed = value.partition(":")
            return DatasetSpec(kind=name, toyworld_seed=int(seed or 0), known=known)  # type: ignore[arg-type]
        return DatasetSpec(kind=kind, path=value, known=known)  # type: ignore[arg-type]
    except (ValidationError, ValueError) as exc:
        _fail(f"bad --dataset {value!r}: {exc}")


def _store(uri: str, create: bool = True):
    from rayedit.store import StoreError, open_store
    from rayedit.store.uri import redact_uri

    try:
        return open_store(uri, create=create)
    except (StoreError, OSError, ValueError) as exc:
        _fail(f"cannot open store {redact_uri(uri)!r}: {exc}")  # never echo credentials


def _model_check(model: str) -> tuple[int, int | None]:
    from rayedit.models import ModelLoadError, UnsupportedArchitectureError
    from rayedit.runtime.locate import model_shape

    try:
        return model_shape(model)
    except (ModelLoadError, UnsupportedArchitectureError, OSError, ValueError) as exc:
        _fail(str(exc))
    raise AssertionError


def _overrides(hparams_file: Path | None, set_: list[str]) -> dict[str, Any]:
    from rayedit.cli.edit_cmd import _parse_set
    from rayedit.editing import load_overrides

    out: dict[str, Any] = {}
    try:
        if hparams_file is not None:
            out.update(load_overrides(hparams_file))
        out.update(_parse_set(set_))
    except ValueError as exc:
        _fail(str(exc))
    return out


def _fmt(x: Any, digits: int = 3) -> str:
    if isinstance(x, float):
        return "–" if math.isnan(x) else f"{x:.{digits}f}"
    return "–" if x is None else str(x)


def _print_trace(res) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"causal trace {res.cid}: mean indirect effect per layer ({res.n_facts} facts)",
              title_justify="left")
    t.add_column("kind @ token")
    for i in range(res.n_layers):
        t.add_column(f"L{i}", justify="right")
    for key, vals in res.effects.items():
        t.add_row(key, *(_fmt(v) for v in vals))
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(t)
    sug = res.suggestion
    console.print(f"noise: {res.noise:.4g} ({res.noise_rule})")
    console.print(f"suggested edit layers: [bold]{sug['layers']}[/bold] (mean effect {sug['score']:.4f})")
    console.print(f"rule: {sug['rule']}")


def _print_scan(res) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"layer scan {res.cid}: {res.n_records} held-out facts per candidate", title_justify="left")
    for col in ("rank", "layers", "Eff. %", "Gen. %", "Spe. %", "objective", "target NLL", "‖ΔW‖_F", "status"):
        t.add_column(col, justify="left" if col in ("layers", "status") else "right")
    for r in res.ranking:
        t.add_row(str(r["rank"]), r["candidate"], _fmt(100 * r["efficacy_success"], 1),
                  _fmt(100 * r["paraphrase_success"], 1), _fmt(100 * r["neighborhood_success"], 1),
                  _fmt(r["objective_value"], 4), _fmt(r["target_nll"]), _fmt(r["update_fro_mean"], 2), r["status"])
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(t)
    console.print(f"objective: {res.statement}")


def _kinds(value: str) -> tuple[str, ...]:
    return tuple(k.strip() for k in value.split(",") if k.strip())


@app.command("trace")
def trace_command(
    model: str = typer.Option(
        ..., "--model", help="hub name, local folder, .gguf, smollm2-135m, tiny:<family> or toyworld:<seed>"),
    dataset: str | None = typer.Option(None, "--dataset", help=DATASET_HELP),
    dataset_kind: str = typer.Option("counterfact", "--dataset-kind",
                                     help="counterfact | zsre | requests | known (ROME's known_1000)"),
    limit: int = typer.Option(32, "--limit", min=1, help="facts to trace (a seeded sample)"),
    store: str = typer.Option("runs/store", "--store", help="store URI (local folder or s3://bucket/prefix)"),
    address: str | None = typer.Option(None, "--address", help="Ray address (default: start a local Ray)"),
    name: str | None = typer.Option(None, "--name", help="campaign id (default: trace--<model>--<dataset>)"),
    seed: int = typer.Option(0, "--seed", help="sample and noise seed"),
    samples: int = typer.Option(10, "--samples", min=1, help="noise draws per fact (ROME: 10)"),
    kinds: str = typer.Option("hidden,mlp,attn", "--kinds", help="states to restore: hidden,mlp,attn"),
    roles: str | None = typer.Option(None, "--roles", help="restore only tokens of these roles, e.g. "
                                                           "subject_last,last (default: every token, as ROME)"),
    known_only: bool = typer.Option(False, "--known-only", help="restore nothing for facts the clean model does "
                                                                "not predict (top-1 ≠ the object's first token)"),
    noise_multiplier: float = typer.Option(3.0, "--noise-multiplier", help="ν = this × σ(subject embeddings)"),
    noise: float | None = typer.Option(None, "--noise", help="absolute ν (overrides the multiplier rule)"),
    window: int = typer.Option(1, "--window", min=1, help="layers restored around each traced layer"),
    width: int | None = typer.Option(None, "--width", help="suggested window width (default: depth rule)"),
    replicas: int = typer.Option(2, "--replicas", min=1),
    shard_size: int = typer.Option(8, "--shard-size", min=1, help="facts per shard"),
    dtype: str = typer.Option("float32", "--dtype"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as one JSON object"),
) -> None:
    """Causal tracing (ROME): corrupt the subject, restore one state at a time, suggest edit layers."""
    from rayedit.locate.parts import LocateMismatch
    from rayedit.locate.trace import TraceSettings
    from rayedit.runtime.locate import run_trace
    from rayedit.runtime.spec import SpecError

    try:
        settings = TraceSettings(kinds=_kinds(kinds), roles=_kinds(roles) if roles else None, known_only=known_only,
                                 noise_multiplier=noise_multiplier, noise=noise,
                                 samples=samples, window=window, seed=seed)
    except ValueError as exc:
        _fail(str(exc))
    d = _dataset(dataset, dataset_kind, model)
    _model_check(model)
    st = _store(store)
    try:
        res = run_trace(model, d, st, cid=name, limit=limit, seed=seed, settings=settings, width=width,
                        replicas=replicas, shard_size=shard_size, dtype=dtype, address=address,
                        progress=not as_json)
    except SpecError as exc:
        _fail("; ".join(exc.problems))
    except (LocateMismatch, ValueError) as exc:
        _fail(str(exc))
    if as_json:
        from dataclasses import asdict

        from rayedit.locate.parts import json_safe

        typer.echo(json.dumps(json_safe(asdict(res))))
        return
    _print_trace(res)
    typer.echo(f"rows in {st.uri.rstrip('/')}/campaigns/{res.cid}/trace/ ({res.seconds:.1f} s); "
               f"`rayedit report {res.cid} --store {store}` draws it")


@app.command("scan")
def scan_command(
    model: str = typer.Option(
        ..., "--model", help="hub name, local folder, .gguf, smollm2-135m, tiny:<family> or toyworld:<seed>"),
    dataset: str | None = typer.Option(None, "--dataset", help=DATASET_HELP),
    method: str = typer.Option("memit", "--method"),
    windows: list[str] = typer.Option([], "--window", help="candidate layers, repeatable: '1-2', '3', '1,3' "
                                                           "(default: every window of the depth-rule width "
                                                           "below the last layer, and the last layer alone)"),
    limit: int = typer.Option(16, "--limit", min=1, help="facts edited per candidate"),
    offset: int = typer.Option(0, "--offset", min=0, help="skip this many facts of the seeded order (e.g. a "
                                                          "trace's --limit, to scan held-out facts)"),
    seed: int = typer.Option(0, "--seed"),
    hparams_file: Path | None = typer.Option(None, "--hparams", help="YAML file of hyperparameter overrides"),
    set_: list[str] = typer.Option([], "--set", help="override one hyperparameter: KEY=VALUE (JSON value)"),
    batch_size: int | None = typer.Option(None, "--batch-size", help="edits per batch (default: all at once)"),
    known: bool = typer.Option(False, "--known", help="edit only facts the unedited model knows (p(true) > "
                                                      "p(new); cached per model)"),
    objective: str = typer.Option("efficacy_x_neighborhood", "--objective"),
    stats_corpus: str | None = typer.Option(None, "--stats-corpus", help="default: the toy world's corpus for "
                                                                         "toyworld models, else builtin:general"),
    store: str = typer.Option("runs/store", "--store"),
    address: str | None = typer.Option(None, "--address"),
    name: str | None = typer.Option(None, "--name", help="campaign id (default: scan--<model>--<dataset>)"),
    replicas: int = typer.Option(2, "--replicas", min=1),
    dtype: str = typer.Option("float32", "--dtype"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Edit the same held-out facts at each candidate layer window; rank the windows by an objective."""
    from rayedit.editing import METHODS
    from rayedit.locate.parts import LocateMismatch
    from rayedit.locate.scan import Candidate
    from rayedit.runtime.locate import run_scan
    from rayedit.runtime.spec import SpecError

    if method not in METHODS:
        _fail(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    try:
        cands = [list(Candidate.parse(w).layers) for w in windows] or None
    except ValueError as exc:
        _fail(str(exc))
    overrides = _overrides(hparams_file, set_)
    overrides.pop("layers", None)  # the candidates decide the layers
    d = _dataset(dataset, "counterfact", model, known=known)
    _model_check(model)
    st = _store(store)
    try:
        res = run_scan(model, d, st, method=method, hparams=overrides, candidates=cands, cid=name, limit=limit,
                       offset=offset, seed=seed, objective=objective, batch_size=batch_size,
                       stats_corpus=stats_corpus, replicas=replicas, dtype=dtype, address=address,
                       progress=not as_json)
    except SpecError as exc:
        _fail("; ".join(exc.problems))
    except (LocateMismatch, ValueError) as exc:
        _fail(str(exc))
    if as_json:
        from dataclasses import asdict

        from rayedit.locate.parts import json_safe

        typer.echo(json.dumps(json_safe(asdict(res))))
        return
    _print_scan(res)


def _floats(value: str, what: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(x) for x in value.split(",") if x.strip())
    except ValueError:
        _fail(f"{what} must be comma-separated numbers, got {value!r}")
    if not vals or any(v <= 0 for v in vals):
        _fail(f"{what} must be positive numbers, got {value!r}")
    return vals


@presets_app.command("suggest")
def suggest_command(
    model: str = typer.Argument(
        ..., help="hub name, local folder, .gguf, smollm2-135m, tiny:<family> or toyworld:<seed>"),
    out: Path = typer.Option(..., "--out", help="preset file to write (YAML)"),
    dataset: str | None = typer.Option(None, "--dataset", help=DATASET_HELP),
    method: str = typer.Option("memit", "--method"),
    store: str = typer.Option("runs/store", "--store"),
    address: str | None = typer.Option(None, "--address"),
    name: str | None = typer.Option(None, "--name", help="campaign id (default: suggest--<model>--<method>)"),
    trace_dataset: str | None = typer.Option(
        None, "--trace-dataset", help="trace these facts instead of --dataset's (e.g. ROME's known_1000.json)"),
    trace_dataset_kind: str = typer.Option("known", "--trace-dataset-kind",
                                           help="kind of --trace-dataset: known | counterfact | zsre | requests"),
    known: bool = typer.Option(False, "--known", help="scan and sweep only facts the unedited model knows "
                                                      "(p(true) > p(new); cached per model)"),
    trace_facts: int = typer.Option(32, "--trace-facts", min=1),
    trace_samples: int = typer.Option(10, "--trace-samples", min=1, help="noise draws per traced fact"),
    trace_kinds: str = typer.Option("hidden,mlp,attn", "--trace-kinds"),
    trace_roles: str | None = typer.Option(None, "--trace-roles",
                                           help="restore only tokens of these roles (default: every token)"),
    trace_known_only: bool = typer.Option(False, "--trace-known-only",
                                          help="restore nothing for traced facts the clean model does not predict"),
    scan_facts: int = typer.Option(16, "--scan-facts", min=1, help="held-out facts edited per scan candidate"),
    last_layer: bool = typer.Option(True, "--last-layer/--no-last-layer",
                                    help="scan the last layer alone as a baseline (its statistics need a "
                                         "forward through the whole model)"),
    sweep_edits: int = typer.Option(16, "--sweep-edits", min=1, help="sequential edits per sweep stream"),
    sweep_batch: int = typer.Option(4, "--sweep-batch", min=1, help="edits per batch in the sweep"),
    lrs: str = typer.Option("0.5,0.1", "--lr", help="v_lr values of the sweep"),
    clamps: str = typer.Option("0.75,4", "--clamp", help="clamp_norm_factor values of the sweep"),
    hparams_file: Path | None = typer.Option(None, "--hparams", help="YAML file of base overrides"),
    set_: list[str] = typer.Option([], "--set", help="base override KEY=VALUE (JSON value)"),
    stats_corpus: str | None = typer.Option(None, "--stats-corpus"),
    stats_samples: int | None = typer.Option(None, "--stats-samples", help="mom2_n_samples (documents)"),
    objective: str = typer.Option("efficacy_x_neighborhood", "--objective"),
    seed: int = typer.Option(0, "--seed"),
    replicas: int = typer.Option(2, "--replicas", min=1),
    dtype: str = typer.Option("float32", "--dtype"),
) -> None:
    """Trace + layer scan + a 2 × 2 sweep (v_lr × clamp_norm_factor) on MODEL; write the winner as a preset."""
    from rayedit.editing import METHODS
    from rayedit.locate.objectives import get_objective
    from rayedit.locate.parts import LocateMismatch
    from rayedit.locate.presets import PresetError, dump_preset
    from rayedit.locate.trace import TraceSettings
    from rayedit.runtime.catalog import SpecMismatch
    from rayedit.runtime.locate import suggest
    from rayedit.runtime.spec import SpecError

    if method not in METHODS:
        _fail(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    try:
        get_objective(objective)
        settings = TraceSettings(kinds=_kinds(trace_kinds), roles=_kinds(trace_roles) if trace_roles else None,
                                 known_only=trace_known_only, samples=trace_samples, seed=seed)
    except ValueError as exc:
        _fail(str(exc))
    overrides = _overrides(hparams_file, set_)
    overrides.pop("layers", None)
    d = _dataset(dataset, "counterfact", model, known=known)
    td = _dataset(trace_dataset, trace_dataset_kind, model) if trace_dataset else None
    _model_check(model)
    st = _store(store)
    t0 = time.perf_counter()
    try:
        res = suggest(model, st, dataset=d, trace_dataset=td, method=method, cid=name, n_trace=trace_facts,
                      n_scan=scan_facts,
                      sweep_edits=sweep_edits, sweep_batch=sweep_batch, lrs=_floats(lrs, "--lr"),
                      clamps=_floats(clamps, "--clamp"), hparams=overrides, trace_settings=settings,
                      objective=objective, seed=seed, stats_corpus=stats_corpus, stats_samples=stats_samples,
                      replicas=replicas, dtype=dtype, address=address, out=out, last_layer=last_layer)
    except SpecError as exc:
        _fail("; ".join(exc.problems))
    except (LocateMismatch, SpecMismatch, PresetError, ValueError) as exc:
        _fail(str(exc))
    total = time.perf_counter() - t0
    _print_trace(res.trace)
    _print_scan(res.scan)
    if res.report:
        typer.echo(f"report: {res.report}/report.html")
    typer.echo(dump_preset(res.preset))
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in res.seconds.items())
    typer.echo(f"preset written to {out} — campaign {res.cid}; {stages}; total {total:.1f} s")


@presets_app.command("rank")
def rank_command(
    campaign: str = typer.Argument(..., help="campaign id (a finished campaign whose spec has a grid)"),
    out: Path | None = typer.Option(None, "--out", help="write the winner as a preset file (YAML)"),
    store: str = typer.Option("runs/store", "--store"),
    objective: str = typer.Option("efficacy_x_neighborhood", "--objective"),
    model: str | None = typer.Option(None, "--model", help="which model's winner (campaigns with several)"),
    edits: int | None = typer.Option(None, "--edits", help="rank after this many edits (default: each "
                                                           "stream's last evaluated step)"),
) -> None:
    """Rank a campaign's configurations by an objective; with --out write the winner as a preset."""
    from rich.console import Console
    from rich.table import Table as RichTable

    from rayedit.locate.objectives import get_objective
    from rayedit.locate.presets import PresetError, make_preset, resolved_hparams, save_preset
    from rayedit.locate.sweep import preset_dict, rank_campaign, ranking_table_rows
    from rayedit.report.load import load_campaign
    from rayedit.store.layout import list_campaigns

    try:
        get_objective(objective)
    except ValueError as exc:
        _fail(str(exc))
    st = _store(store, create=False)
    if campaign not in list_campaigns(st):
        _fail(f"no campaign {campaign!r} in {st.uri}")
    camp = load_campaign(st, campaign)
    ranking = rank_campaign(camp, objective, edits=edits)
    headers, rows = ranking_table_rows(ranking)
    t = RichTable(title=f"{campaign}: configurations ranked ({ranking.objective.name})", title_justify="left")
    for h in headers:
        t.add_column(h)
    for r in rows:
        t.add_row(*(_fmt(c, 4) if isinstance(c, float) else str(c) for c in r))
    console = Console(width=None if sys.stdout.isatty() else 200)
    console.print(t)
    console.print(ranking.rule)
    for n in ranking.notes:
        console.print(f"note: {n}")
    if out is None:
        return
    try:
        data = preset_dict(ranking, model, stats_corpus=(camp.spec or {}).get("stats_corpus"), store=st.uri)
        n_layers, d_ff = _model_check(data["model"])
        from rayedit.runtime.spec import model_id

        data["hparams"] = resolved_hparams(data["method"], model_id(data["model"]), n_layers, data["hparams"], d_ff)
        preset = make_preset(data, n_layers=n_layers, d_ff=d_ff, origin=f"campaign {campaign}")
    except (PresetError, ValueError) as exc:
        _fail(str(exc))
    save_preset(preset, out)
    p = preset.provenance
    typer.echo(f"preset written to {out}: {preset.method} {p.config} on {preset.model}, "
               f"{p.objective} = {p.score:.4f}")


@presets_app.command("show")
def show_command(path: Path = typer.Argument(..., help="preset file")) -> None:
    """Validate a preset file and print it."""
    from rayedit.locate.presets import PresetError, dump_preset, load_preset

    try:
        preset = load_preset(path)
    except PresetError as exc:
        _fail(str(exc))
    typer.echo(dump_preset(preset), nl=False)
