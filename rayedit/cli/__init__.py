"""Command-line interface. Each ``*_cmd`` module registers its commands on ``app``."""

from rayedit.cli import (  # noqa: F401  (registration)
    campaign_cmd,
    doctor_cmd,
    edit_cmd,
    eval_cmd,
    locate_cmd,
    report_cmd,
    toyworld_cmd,
)
from rayedit.cli.app import app

__all__ = ["app"]
