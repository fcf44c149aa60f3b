"""Command-line interface. Each ``*_cmd`` module registers its commands on ``app``."""

from rayedit.cli import campaign_cmd, edit_cmd, eval_cmd, locate_cmd, report_cmd, toyworld_cmd  # noqa: F401  (registration)
from rayedit.cli.app import app

__all__ = ["app"]
