"""The typer application object; command modules register onto it (one module per area, see __init__)."""

import typer

app = typer.Typer(
    name="rayedit",
    help="Knowledge-editing campaigns (ROME, MEMIT, AlphaEdit, MOSE, SAME, FT) on Ray.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
