"""Datasets, schema validation and the toy world (plain Python/torch; no Ray, no boto3)."""

from rayedit.data.requests import EditRequest

__all__ = ["EditRequest"]
