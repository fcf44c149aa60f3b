"""Loading Hugging Face causal LMs by hub name or local folder, with tokenizer fix-ups for editing."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import gguf
from .adapters import FAMILIES, ModelAdapter, UnsupportedArchitectureError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class ModelLoadError(ValueError):
    """A model name or path that cannot be loaded; the message names it and says why."""


@dataclass
class LoadedModel:
    """A model, its tokenizer and adapter, plus identity used for cache keys."""

    model: nn.Module
    tokenizer: object
    adapter: ModelAdapter
    name: str
    revision: str | None = None
    source: dict | None = None  # provenance of a converted source (GGUF: file, sha256, quantisation, …)
    _fingerprint: str | None = field(default=None, repr=False)

    @property
    def fingerprint(self) -> str:
        """Content hash of the *current* weights (computed once; call ``refresh_fingerprint`` after edits)."""
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self.model)
        return self._fingerprint

    def refresh_fingerprint(self) -> str:
        self._fingerprint = None
        return self.fingerprint


def weights_fingerprint(model: nn.Module) -> str:
    """blake2b over every parameter and buffer (name, dtype, shape, bytes): identifies the weights exactly."""
    h = hashlib.blake2b(digest_size=16)
    h.update(str(getattr(model.config, "model_type", "")).encode())
    seen: set[int] = set()
    for name, t in sorted(model.state_dict().items()):
        if t.data_ptr() in seen:  # tied weights (GPT-2 lm_head ↔ wte) are hashed once
            continue
        seen.add(t.data_ptr())
        h.update(name.encode())
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def prepare_tokenizer(tok: object) -> object:
    """Editing index arithmetic assumes right padding and a pad token (methods.md §2.2)."""
    tok.padding_side = "right"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _gguf_error(exc: Exception) -> ModelLoadError:
    return ModelLoadError(str(exc))


def model_dims(path_or_name: str, revision: str | None = None) -> tuple[str, int, int | None]:
    """(model type, layer count, d_ff) from the config alone: validates a model name before any weights load.
    A GGUF source is checked from its header (truncation, architecture) without converting it."""
    from transformers import AutoConfig

    if gguf.is_gguf_source(path_or_name):
        try:
            folder, path, _origin = gguf.cached_folder(path_or_name)
            if folder is None:
                info = gguf.inspect(path)
                return info.model_type, info.n_layers, info.d_ff
        except gguf.GGUFSourceError as exc:
            raise _gguf_error(exc) from exc
        path_or_name = str(folder)
    _check_model_type(path_or_name, revision)
    cfg = AutoConfig.from_pretrained(path_or_name, revision=revision)
    n_layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    d_model = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    d_ff = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None)
    d_ff = d_ff or (4 * d_model if d_model else None)  # GPT-2/GPT-J default n_inner
    return cfg.model_type, int(n_layers), d_ff


def _check_model_type(path_or_name: str, revision: str | None) -> str:
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(path_or_name, revision=revision)
    except Exception as exc:  # transformers raises OSError/ValueError/HTTP errors depending on cause
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = ""
        if not Path(path_or_name).exists() and os.environ.get("HF_HUB_OFFLINE") == "1":
            hint = " (HF_HUB_OFFLINE=1 and no local folder of that name: download it first or give a path)"
        raise ModelLoadError(f"cannot load model {path_or_name!r}: {first}{hint}") from exc
    if cfg.model_type not in FAMILIES:
        raise UnsupportedArchitectureError(
            f"model {path_or_name!r} has model type {cfg.model_type!r}, which has no rayedit adapter "
            f"(supported: {', '.join(sorted(FAMILIES))}). To add one, register a FamilySpec in "
            "rayedit/models/adapters.py."
        )
    return cfg.model_type


_PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def _check_safetensors(path_or_name: str) -> None:
    """A local folder must hold safetensors weights: pickle checkpoints (pytorch_model.bin) can run code when
    loaded, so they are refused by name here rather than left to torch's unpickler."""
    folder = Path(path_or_name)
    if not folder.is_dir() or any(folder.glob("*.safetensors")) or any(folder.glob("*.safetensors.index.json")):
        return
    pickles = sorted(p.name for pattern in _PICKLE_WEIGHTS for p in folder.glob(pattern))
    found = f" (found {', '.join(pickles)}: pickle checkpoints are never loaded; convert them to safetensors)" \
        if pickles else ""
    raise ModelLoadError(f"cannot load model {path_or_name!r}: no safetensors weights in the folder{found}")


def _quietly(fn, *args, **kwargs):
    """transformers' per-tensor "Loading weights" bar, printed by every replica, says nothing a user needs."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return fn(*args, **kwargs)
    finally:
        if was:
            hf_logging.enable_progress_bar()


def load_model(
    path_or_name: str,
    dtype: str | torch.dtype = "float32",
    device: str | None = None,
    revision: str | None = None,
    device_map: str | dict | None = None,
    attn_implementation: str | None = None,
) -> LoadedModel:
    """Load a causal LM + tokenizer by hub name or folder. The architecture is checked before weights load."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    name, source = path_or_name, None
    if gguf.is_gguf_source(path_or_name):
        try:
            folder, source = gguf.converted(path_or_name, progress=True)
        except gguf.GGUFSourceError as exc:
            raise _gguf_error(exc) from exc
        path_or_name = str(folder)
    _check_model_type(path_or_name, revision)
    _check_safetensors(path_or_name)
    try:
        tok = AutoTokenizer.from_pretrained(path_or_name, revision=revision)
        # safetensors only, for hub names too: transformers would otherwise fall back to pytorch_model.bin
        kwargs: dict = {"revision": revision, "dtype": torch_dtype, "use_safetensors": True}
        if device_map is not None:
            kwargs["device_map"] = device_map
        if attn_implementation is not None:  # eager | sdpa | flash_attention_2 (transformers checks it)
            kwargs["attn_implementation"] = attn_implementation
        model = _quietly(AutoModelForCausalLM.from_pretrained, path_or_name, **kwargs)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "use_safetensors" in first:  # transformers' advice (drop use_safetensors=True) is not ours to give
            first = "no safetensors weights (pickle checkpoints such as pytorch_model.bin are never loaded)"
        raise ModelLoadError(f"cannot load model {path_or_name!r}: {first}") from exc
    if device is not None and device_map is None:
        model.to(device)
    model.eval()
    return LoadedModel(model, prepare_tokenizer(tok), ModelAdapter(model), name=name, revision=revision,
                       source=source)


def wrap_model(model: nn.Module, tokenizer: object, name: str = "in-memory") -> LoadedModel:
    """Wrap an already constructed model (tests, notebooks)."""
    model.eval()
    return LoadedModel(model, prepare_tokenizer(tokenizer), ModelAdapter(model), name=name)
