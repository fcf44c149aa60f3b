"""``rayedit doctor``: is this machine (and its Ray cluster and store) ready for a campaign?"""

from __future__ import annotations

import json

import typer

from rayedit.cli.app import app


@app.command("doctor")
def doctor_command(
    address: str | None = typer.Option(None, "--address", help="Ray cluster (HOST:PORT, auto) or job server "
                                       "(http://HOST:8265); default: check that a local Ray starts"),
    store: str | None = typer.Option(None, "--store", help="store URI to probe (local folder or s3://bucket/prefix); "
                                     "S3 settings and credentials come from the environment"),
    ray: bool = typer.Option(True, "--ray/--no-ray", help="check Ray (starting a local Ray takes ~10 s)"),
    require_gpu: bool = typer.Option(False, "--require-gpu", help="fail when no GPU is visible"),
    timeout: float = typer.Option(90.0, "--timeout", help="seconds for the Ray check"),
    as_json: bool = typer.Option(False, "--json", help="print the checks as JSON"),
) -> None:
    """Check versions, threads, GPUs, Ray and a store; say what is wrong in plain words (exit 1 if anything is)."""
    from rayedit.runtime.doctor import FAIL, as_dicts, run_checks

    checks = run_checks(address=address, store=store, ray=ray, require_gpu=require_gpu, timeout=timeout)
    failed = [c for c in checks if c.status == FAIL]
    if as_json:
        typer.echo(json.dumps({"ok": not failed, "checks": as_dicts(checks)}, indent=2))
    else:
        for c in checks:
            typer.echo(c.line(), err=c.status == FAIL)
        typer.echo(f"{len(failed)} problem(s) found" if failed else "all checks passed")
    if failed:
        raise typer.Exit(1)
