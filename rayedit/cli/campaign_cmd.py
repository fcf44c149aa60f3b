"""Campaign commands: validate, run, resume, status, ls, submit, jobs, logs, stop (on rayedit.cli.app.app)."""

from __future__ import annotations

import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer

from rayedit.cli.app import app


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@contextmanager
def store_errors() -> Iterator[None]:
    """A ``StoreError`` (unsafe campaign id, symlink out of a local store, bad store URI, ...) as one error line,
    exit 2. Also a decorator: every command that reads a store wears it. Store messages never hold credentials
    (the store layer redacts URIs)."""
    from rayedit.store import StoreError

    try:
        yield
    except StoreError as exc:
        _fail(error_line(exc))


def error_line(exc: BaseException) -> str:
    """The first line of an error's message. An error raised inside a Ray actor arrives as a RayTaskError
    (also an instance of the original class) whose text starts with the remote traceback's header
    ("ray::ModelReplica.step() (pid=...)"): its original error (``cause``) says what went wrong."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException) and cause is not exc:
        exc = cause
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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
    ev, au = parsed.evaluation, parsed.audit
    steps = f"{parsed.edits_per_stream} edits per stream in {parsed.steps_per_stream()} steps"
    evals = f", evaluation {parsed.edits_phrase(parsed.eval_steps())} ({', '.join(ev.suites)})" if ev else ""
    if au is not None:
        from rayedit.runtime.audit import audit_steps

        evals += f", audit {parsed.edits_phrase(audit_steps(parsed))} ({', '.join(a.suite for a in au.suites)})"
    typer.echo(f"{spec}: ok — campaign {parsed.campaign_id!r}, {len(streams(parsed))} streams, {steps}{evals}")


@contextmanager
def interruption() -> Iterator[None]:
    """Ctrl-C / SIGTERM of a driver (``rayedit.runtime.campaign.Interrupted``): a few plain lines — what is
    committed per stream and how to continue — and exit 130 (SIGINT) or 143 (SIGTERM), no traceback."""
    from rayedit.runtime.campaign import Interrupted

    try:
        yield
    except Interrupted as exc:
        for line in exc.lines():
            typer.echo(line, err=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:  # outside the campaign's own handling (spec checks, the summary at the end)
        typer.echo("interrupted (SIGINT)", err=True)
        raise typer.Exit(130) from None


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
@store_errors()
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
        with interruption():
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


@app.command("stats")
@store_errors()
def stats_command(
    spec: Path = typer.Argument(..., help="campaign spec (YAML)"),
    store: str | None = typer.Option(None, "--store", help="store URI (default: the spec's `store`)"),
    address: str | None = typer.Option(None, "--address", help="Ray address (default: start a local Ray)"),
) -> None:
    """Compute (and cache in the store) the covariance statistics a campaign needs, and nothing else."""
    from rayedit.runtime.campaign import stats_campaign
    from rayedit.runtime.spec import SpecError

    try:
        with interruption():
            stats_campaign(spec, store, address)
    except SpecError as exc:
        for p in exc.problems:
            typer.echo(p, err=True)
        raise typer.Exit(2) from None
    typer.echo("statistics: every covariance the campaign needs is in the store's cache")


@app.command("resume")
@store_errors()
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
        with interruption():
            resume_campaign(campaign, store, address)
        if report:
            _write_report(store, campaign)
    except SpecError as exc:
        for p in exc.problems:
            typer.echo(p, err=True)
        raise typer.Exit(2) from None


@app.command("status")
@store_errors()
def status_command(campaign: str = typer.Argument(...), store: str = typer.Option(..., "--store")) -> None:
    """Every stream (started or not) with its state and edits/steps done of planned, evaluation parts; whether
    the run is going, done, interrupted or failed."""
    import time

    from rayedit.runtime import health
    from rayedit.runtime.campaign import print_campaign_summary
    from rayedit.runtime.catalog import campaign_stream_ids, campaigns, read_frozen_spec, read_run_state
    from rayedit.runtime.spec import SpecError
    from rayedit.store import open_store

    st = open_store(store, create=False)
    if campaign not in campaigns(st):
        _fail(f"no campaign {campaign!r} in {st.uri}")
    state = read_run_state(st, campaign)
    print_campaign_summary(st, campaign)
    try:
        edits_after = read_frozen_spec(st, campaign).edits_after
    except SpecError:
        edits_after = None
    if state is None:
        typer.echo("run state: unknown (no driver has reported; results above are what is committed)")
    else:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(state.get("updated", 0)))
        what = state.get("state")
        if what == "interrupted" and state.get("signal"):
            what = f"interrupted by {state['signal']}"
        line = f"run state: {what} (driver {state.get('host')}:{state.get('pid')}, last report {when})"
        if state.get("state") == "running" and time.time() - state.get("updated", 0) > 600:
            line += " — no report for over 10 minutes: the driver may be gone; `rayedit resume` continues it"
        elif state.get("state") in ("interrupted", "stopped", "failed"):
            line += f" — `rayedit resume {campaign} --store {store}` continues it"
        typer.echo(line)
        if state.get("error"):
            typer.echo(f"error: {state['error']}")
    for sid in campaign_stream_ids(st, campaign):
        for e in health.stream_events(st, campaign, sid):
            typer.echo(f"health: {e.describe(edits_after)}")


@app.command("ls")
@store_errors()
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
    import time

    deadline = time.monotonic() + 120
    while True:
        try:
            job_id = client.submit_job(
                entrypoint=shlex.join(entry),
                runtime_env={"working_dir": str(wd), "env_vars": env,
                             "excludes": [".venv", ".git", "runs", ".rayedit", "**/__pycache__", "*.egg-info"]},
                metadata={"rayedit_spec": str(rel)},
            )
            break
        except RuntimeError as exc:
            # a head that has just started answers before its job agent is up: wait for it, bounded
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                _fail(f"cannot submit to {address}: {exc}")
            typer.echo("the cluster's job agent is not up yet; retrying", err=True)
            time.sleep(3)
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


def _job_client(address: str):
    import os

    from ray.job_submission import JobSubmissionClient

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # platform-notes §3: clients must match the head
    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # ConnectionError, auth errors: say where and what, not a traceback
        _fail(f"cannot reach the Ray job server at {address}: {type(exc).__name__}: {exc}")


@app.command("jobs")
def jobs_command(address: str = typer.Option(..., "--address", help="Ray dashboard, e.g. http://HEAD:8265")) -> None:
    """List the jobs of a Ray cluster (id, status, spec)."""
    for job in _job_client(address).list_jobs():
        spec = (job.metadata or {}).get("rayedit_spec", "-")
        typer.echo(f"{job.submission_id or job.job_id}\t{job.status}\t{spec}")


@app.command("logs")
def logs_command(
    job_id: str = typer.Argument(..., help="submission id printed by `rayedit submit`"),
    address: str = typer.Option(..., "--address", help="Ray dashboard, e.g. http://HEAD:8265"),
    follow: bool = typer.Option(False, "--follow", "-f", help="keep printing until the job ends"),
) -> None:
    """Print the driver log of a submitted campaign."""
    client = _job_client(address)
    try:
        if not follow:
            typer.echo(client.get_job_logs(job_id), nl=False)
            return
        import asyncio

        async def _tail() -> None:
            async for lines in client.tail_job_logs(job_id):
                typer.echo(lines, nl=False)

        asyncio.run(_tail())
    except RuntimeError as exc:  # the SDK raises RuntimeError for unknown ids
        _fail(f"job {job_id!r} at {address}: {exc}")


@app.command("stop")
def stop_command(
    job_id: str = typer.Argument(..., help="submission id printed by `rayedit submit`"),
    address: str = typer.Option(..., "--address", help="Ray dashboard, e.g. http://HEAD:8265"),
) -> None:
    """Stop a submitted campaign. Committed steps stay valid: `rayedit resume` continues from them."""
    client = _job_client(address)
    try:
        stopped = client.stop_job(job_id)
    except RuntimeError as exc:
        _fail(f"job {job_id!r} at {address}: {exc}")
    typer.echo(f"job {job_id}: {'stop requested' if stopped else 'already finished'}")
