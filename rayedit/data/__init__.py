"""Datasets, schema validation and the toy world (plain Python/torch; no Ray, no boto3)."""

from .loaders import (
    KINDS,
    load_counterfact,
    load_dataset_records,
    load_known,
    load_malicious,
    load_requests,
    load_zsre,
)
from .requests import EditRequest
from .schema import (
    CounterFactRecord,
    DatasetError,
    DatasetSourceError,
    DatasetValidationError,
    KnownFact,
    LoadedRecords,
    MaliciousQuery,
    Problem,
    ZsreRecord,
)
from .toyworld import ToyWorld, ToyWorldConfig, build_toyworld, ensure_toyworld, load_toyworld

__all__ = [
    "EditRequest", "CounterFactRecord", "ZsreRecord", "KnownFact", "MaliciousQuery", "Problem", "LoadedRecords",
    "DatasetError", "DatasetSourceError", "DatasetValidationError", "KINDS", "load_counterfact", "load_zsre",
    "load_malicious", "load_known", "load_requests", "load_dataset_records", "ToyWorld", "ToyWorldConfig",
    "build_toyworld", "ensure_toyworld", "load_toyworld",
]
