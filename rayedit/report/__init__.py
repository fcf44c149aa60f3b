"""rayedit.report: HTML reports, paper-style tables and curves from the Parquet of committed steps.

Reads through ``pyarrow.dataset`` over committed steps and committed evaluation parts only (local
folder or S3), never imports Ray, and imports matplotlib only when drawing.
"""

from rayedit.report.build import Report, build_report, default_location, make_report, write_report
from rayedit.report.load import CampaignData, StreamInfo, load_campaign
from rayedit.report.stats import Stat, mean_ci
from rayedit.report.tables import Table

__all__ = [
    "CampaignData", "Report", "Stat", "StreamInfo", "Table", "build_report", "default_location", "load_campaign",
    "make_report", "mean_ci", "write_report",
]
