"""rayedit.runtime: campaigns on Ray (the only layer that imports ray, and only inside functions)."""

from rayedit.runtime.campaign import execute, resume_campaign, run_campaign
from rayedit.runtime.catalog import SpecMismatch, campaign_summaries, freeze_spec, read_frozen_spec
from rayedit.runtime.spec import CampaignSpec, SpecError, load_spec, streams, validate_spec_file

__all__ = [
    "CampaignSpec", "SpecError", "SpecMismatch", "campaign_summaries", "execute", "freeze_spec", "load_spec",
    "read_frozen_spec", "resume_campaign", "run_campaign", "streams", "validate_spec_file",
]
