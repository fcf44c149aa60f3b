"""Command-line interface. Each ``*_cmd`` module registers its commands on ``app``."""

from rayedit.cli.app import app
from rayedit.cli import edit_cmd, eval_cmd, toyworld_cmd, campaign_cmd  # noqa: F401  (registration)

__all__ = ["app"]
