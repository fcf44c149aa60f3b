"""Pure-torch editing core: requests → keys → targets → solver → weight delta (no Ray, no boto3)."""

from ..data.requests import EditRequest
from .covariance import BlobCache, CovarianceStats, LocalBlobCache, StatsError, StatsSettings
from .editor import BatchResult, Editor, EditorState, EditRejected, apply_weights, edit
from .hparams import HPARAMS, load_overrides, resolve_hparams
from .solvers import SOLVERS

METHODS = tuple(sorted(SOLVERS))

__all__ = [
    "EditRequest", "BlobCache", "CovarianceStats", "LocalBlobCache", "StatsError", "StatsSettings", "BatchResult",
    "EditorState", "EditRejected", "Editor", "apply_weights", "edit", "HPARAMS", "load_overrides",
    "resolve_hparams", "SOLVERS", "METHODS",
]
