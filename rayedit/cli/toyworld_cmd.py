"""``rayedit toyworld``: build and inspect the offline toy world (invented facts, datasets, a small model)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from rayedit.cli.app import app

toyworld_app = typer.Typer(
    name="toyworld",
    help="The toy world: invented facts, CounterFact/ZsRE/malicious datasets and a small model trained on "
         "them on CPU (offline, deterministic per seed).",
    no_args_is_help=True,
)
app.add_typer(toyworld_app, name="toyworld")


def _summary(manifest: dict) -> str:
    q = manifest.get("quality", {})
    lines = [
        f"seed {manifest['seed']}, config {manifest['config_hash']}, built in {manifest.get('build_seconds', '?')}s",
        f"recall (training templates)   {q.get('recall_train', float('nan')):.3f}",
        f"recall (held-out paraphrases) {q.get('recall_heldout', float('nan')):.3f}",
        f"refusal rate (harmful)        {q.get('refusal_rate', float('nan')):.3f}"
        f"  (held-out {q.get('refusal_rate_eval', float('nan')):.3f})",
        f"false refusals (benign)       {q.get('refusal_rate_benign', float('nan')):.3f}",
        f"meets targets: {manifest.get('meets_targets')}",
    ]
    return "\n".join(lines)


@toyworld_app.command("build")
def build(
    out: Path | None = typer.Option(None, "--out", help="Folder to write the world into (default: the cache, "
                                    "$RAYEDIT_TOYWORLD_CACHE or ~/.cache/rayedit/toyworld)."),
    seed: int = typer.Option(0, "--seed", help="World seed: same seed, same world."),
    data_only: bool = typer.Option(False, "--data-only", help="Write the datasets only (no tokenizer, no model)."),
    force: bool = typer.Option(False, "--force", help="Rebuild even if --out already holds this world."),
) -> None:
    """Generate the world and train its model (a few minutes on 2 CPU cores)."""
    from rayedit.data.toyworld import (
        MANIFEST,
        ToyWorldConfig,
        build_toyworld,
        ensure_toyworld,
        write_world_files,
    )

    cfg = ToyWorldConfig()
    if data_only:
        target = out or Path(".")
        write_world_files(target, seed, cfg)
        typer.echo(f"toy world datasets (seed {seed}) written to {target}")
        return
    if out is None:
        world = ensure_toyworld(seed=seed, config=cfg, log=typer.echo)
    else:
        mf = out / MANIFEST
        if mf.is_file() and not force:
            manifest = json.loads(mf.read_text())
            if manifest.get("seed") == seed and manifest.get("config_hash") == cfg.config_hash():
                typer.echo(f"{out} already holds this world (use --force to rebuild)")
                typer.echo(_summary(manifest))
                return
        world = build_toyworld(out, seed, cfg, log=typer.echo)
    typer.echo(f"toy world: {world.root}")
    typer.echo(_summary(world.manifest))


@toyworld_app.command("info")
def info(path: Path = typer.Argument(..., help="A built world folder.")) -> None:
    """Print a built world's manifest summary and file paths."""
    from rayedit.data.toyworld import load_toyworld

    try:
        world = load_toyworld(path)
    except FileNotFoundError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from exc
    typer.echo(_summary(world.manifest))
    for name in ("model_dir", "counterfact", "zsre", "malicious", "malicious_train", "benign", "corpus", "kb"):
        typer.echo(f"{name:16s}{getattr(world, name)}")
