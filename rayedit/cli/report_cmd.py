"""``rayedit report``: HTML report, paper-style tables (CSV, Markdown) and curves of one or more campaigns."""

from __future__ import annotations

import time

import typer

from rayedit.cli.app import app
from rayedit.cli.campaign_cmd import store_errors


def print_report_summary(rep, where: str | None = None, seconds: float | None = None) -> None:
    """Progress and summary tables in the terminal (rich); what ``run``/``resume`` can print at the end."""
    import sys

    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 200)
    for t in rep.progress:
        console.print(t.to_rich(drop=("stream",)))
        if t.note:
            console.print(f"[dim]{t.note}[/dim]")
    for t in rep.summary:
        console.print(t.to_rich())
    if where:
        took = f" in {seconds:.1f} s" if seconds is not None else ""
        console.print(f"report written to [bold]{where}[/bold]/report.html{took}")


@app.command("report")
@store_errors()
def report_command(
    campaigns: list[str] = typer.Argument(..., help="campaign id(s); several are compared side by side"),
    store: str = typer.Option("runs/store", "--store", help="store URI (local folder or s3://bucket/prefix)"),
    out: str | None = typer.Option(None, "--out", help="output folder (default: campaigns/<cid>/report/ "
                                                         "in the store; a URI writes to that store)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="do not print the tables"),
) -> None:
    """Write report.html (plots embedded), tables/*.csv and tables/*.md from the committed results."""
    from rayedit.report import make_report
    from rayedit.store import StoreError, open_store
    from rayedit.store.layout import list_campaigns
    from rayedit.store.uri import redact_uri

    t0 = time.perf_counter()
    try:
        st = open_store(store, create=False)
    except (StoreError, OSError, ValueError) as exc:
        typer.echo(f"error: cannot open store {redact_uri(store)!r}: {exc}", err=True)  # never echo credentials
        raise typer.Exit(2) from None
    known = set(list_campaigns(st))
    missing = [c for c in campaigns if c not in known]
    if missing:
        typer.echo(f"error: no campaign {', '.join(map(repr, missing))} in {st.uri} "
                   f"(known: {', '.join(sorted(known)) or 'none'})", err=True)
        raise typer.Exit(2)
    rep, where = make_report(st, list(dict.fromkeys(campaigns)), out)
    if not quiet:
        print_report_summary(rep, where, time.perf_counter() - t0)
    else:
        typer.echo(f"{where}/report.html")
