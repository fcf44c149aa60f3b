"""Model loading and per-architecture adapters (plain torch/transformers; no Ray, no boto3)."""

from .adapters import FAMILIES, ModelAdapter, UnsupportedArchitectureError, block_hidden
from .loading import (
    LoadedModel,
    ModelLoadError,
    load_model,
    model_dims,
    weights_fingerprint,
    wrap_model,
)
from .tiny import TINY_FAMILIES, build_tiny_model, save_tiny_model, tiny_tokenizer

__all__ = [
    "FAMILIES", "ModelAdapter", "UnsupportedArchitectureError", "block_hidden", "LoadedModel", "ModelLoadError",
    "load_model", "model_dims", "weights_fingerprint", "wrap_model", "TINY_FAMILIES", "build_tiny_model",
    "save_tiny_model", "tiny_tokenizer",
]
