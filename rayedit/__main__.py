"""`python -m rayedit` = the `rayedit` console script."""

from rayedit.cli import app

app()
