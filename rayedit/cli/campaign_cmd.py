"""Campaign commands: validate, run, resume, status, ls, submit (registered on rayedit.cli.app.app)."""

from __future__ import annotations

import shlex
from pathlib import Path

import typer

from rayedit.cli.app import app


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@app.command("validate")
def validate_command(spec: Path = typer.Argument(..., help="campaign spec (YAML)")) -> None:
    """Check a campaign spec: keys, values, hyperparameters, data files. Exit 2 on any problem."""
    from rayedit.runtime.spec import streams, validate_spec_file

    notes: list[str] = []
    parsed, problems = validate_spec_file(spec, notes)
    for n in notes:  # skipped checks are said out loud: "ok" must not hide what was not checked
        typer.echo(f"note: {n}")
    if problems:
        for p in problems:
            typer.echo(p, err=True)
        raise typer.Exit(2)
    assert parsed is not None
    ev = parsed.evaluation
    evals = f", evaluation after steps {parsed.eval_steps()} ({', '.join(ev.suites)})" if ev else ""
    typer.echo(f"{spec}: ok — campaign {parsed.campaign_id!r}, {len(streams(parsed))} streams{evals}")


def _write_report(store_uri: str, cid: str) -> None:
    """The campaign's report at the end of run/resume; a report failure never fails the campaign."""
    import time

    from rayedit.cli.report_cmd import print_report_summary
    from rayedit.report import make_report

    t0 = time.perf_counter()
    try:
        rep, where = make_report(store_uri, [cid])
    except Exception as exc:  # the results are committed; only the report is missing
        typer.echo(f"warning: report not written ({type(exc).__name__}: {exc}); run `rayedit report {cid}`", err=True)
        return
    print_report_summary(rep, where, time.perf_counter() - t0)


@app.command("run")
def run_command(
    spec: Path = typer.Argument(..., help="campaign spec (YAML)"),
    store: str | None = typer.Option(None, "--store", help="store URI (default: the spec's `store`)"),
    address: str | None = typer.Option(None, "--address", help="Ray address (default: start a local Ray)"),
    max_steps: int | None = typer.Option(None, "--max-steps", help="stop each stream after this many steps"),
    report: bool = typer.Option(True, "--report/--no-report", help="write the HTML report at the end"),
) -> None:
    """Run (or continue) a campaign on Ray."""
    from rayedit.runtime.campaign import run_campaign
    from rayedit.runtime.catalog import SpecMismatch
    from rayedit.runtime.spec import SpecError, load_spec

    try:
        run_campaign(spec, store, address, max_steps=max_steps)
        if report:
            parsed = load_spec(spec)
            _write_report(store or parsed.store, parsed.campaign_id)
    except SpecError as exc:
        for p in exc.problems:
            typer.echo(p, err=True)
        raise typer.Exit(2) from None
    except SpecMismatch as exc:
        _fail(str(exc))


@app.command("resume")
def resume_command(
    campaign: str = typer.Argument(..., help="campaign id"),
    store: str = typer.Option(..., "--store", help="store URI"),
    address: str | None = typer.Option(None, "--address"),
    report: bool = typer.Option(True, "--report/--no-report", help="write the HTML report at the end"),
) -> None:
    """Continue a campaign from its last committed steps, with the spec frozen in the store."""
    from rayedit.runtime.campaign import resume_campaign
    from rayedit.runtime.spec import SpecError

    try:
        resume_campaign(campaign, store, address)
        if report:
            _write_report(store, campaign)
    except SpecError as exc:
        for p in exc.problems:
            typer.echo(p, err=True)
        raise typer.Exit(2) from None


@app.command("status")
def status_command(campaign: str = typer.Argument(...), store: str = typer.Option(..., "--store")) -> None:
    """Per stream: committed steps, last step, edits."""
    from rayedit.runtime.campaign import print_summary
    from rayedit.runtime.catalog import campaign_summaries, campaigns
    from rayedit.store import open_store

    st = open_store(store, create=False)
    if campaign not in campaigns(st):
        _fail(f"no campaign {campaign!r} in {st.uri}")
    print_summary(campaign, campaign_summaries(st, campaign))


@app.command("ls")
def ls_command(store: str = typer.Option(..., "--store")) -> None:
    """List the campaigns of a store."""
    from rayedit.runtime.catalog import campaigns
    from rayedit.store import open_store

    for cid in campaigns(open_store(store, create=False)):
        typer.echo(cid)


@app.command("submit")
def submit_command(
    spec: Path = typer.Argument(..., help="campaign spec (YAML), inside the project folder"),
    address: str = typer.Option(..., "--address", help="Ray dashboard, e.g. http://HEAD:8265"),
    store: str | None = typer.Option(None, "--store"),
    working_dir: Path = typer.Option(Path("."), "--working-dir", help="project folder shipped to the cluster"),
    wait: bool = typer.Option(False, "--wait/--no-wait", help="follow the job's logs until it ends"),
) -> None:
    """Submit the campaign as a Ray job (Job Submission API); the job runs `python -m rayedit run`."""
    import os

    from ray.job_submission import JobStatus, JobSubmissionClient

    from rayedit.runtime.spec import validate_spec_file

    _parsed, problems = validate_spec_file(spec)
    if problems:
        for p in problems:
            typer.echo(p, err=True)
        raise typer.Exit(2)
    wd = working_dir.resolve()
    try:
        rel = spec.resolve().relative_to(wd)
    except ValueError:
        _fail(f"{spec} is not inside the working dir {wd} (it must be shipped with the job)")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    entry = ["python", "-m", "rayedit", "run", str(rel)] + (["--store", store] if store else [])
    client = JobSubmissionClient(address)
    # Only non-secret settings travel in env_vars; cloud credentials come from the cluster's own config.
    env = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "OMP_NUM_THREADS", "AWS_ENDPOINT_URL", "AWS_REGION")
           if k in os.environ}
    job_id = client.submit_job(
        entrypoint=shlex.join(entry),
        runtime_env={"working_dir": str(wd), "env_vars": env,
                     "excludes": [".venv", ".git", "runs", "**/__pycache__"]},
        metadata={"rayedit_spec": str(rel)},
    )
    typer.echo(f"submitted {job_id} to {address}")
    if wait:
        import asyncio

        async def _tail() -> None:
            async for lines in client.tail_job_logs(job_id):
                typer.echo(lines, nl=False)

        asyncio.run(_tail())
        status = client.get_job_status(job_id)
        typer.echo(f"job {job_id}: {status}")
        if status != JobStatus.SUCCEEDED:
            raise typer.Exit(1)
