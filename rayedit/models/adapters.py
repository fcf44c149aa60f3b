"""Per-architecture adapters: which module is "the MLP down-projection", its orientation, and sizes.

Every solver works in *mathematical* orientation, ``W ∈ R^{d_out × d_in}`` with ``output = W k``.
The adapter converts to and from storage orientation; the decision is made from the module type
(GPT-2's ``Conv1D`` stores ``(d_in, d_out)``), never by comparing shapes, which is ambiguous for
square matrices (methods.md §1, [FIX]).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

ADAPTER_HELP = (
    "To add an architecture, register a FamilySpec in rayedit/models/adapters.py with the module paths of "
    "its decoder layers, MLP down-projection, MLP, final norm and LM head."
)


class UnsupportedArchitectureError(ValueError):
    """Raised for a model type without an adapter."""


@dataclass(frozen=True)
class FamilySpec:
    """Module paths of one architecture family (``{}`` is the layer index)."""

    layers: str  # the ModuleList of decoder blocks
    down_proj: str  # relative to a block
    mlp: str  # relative to a block
    final_norm: str
    lm_head: str = "lm_head"
    conv1d: bool = False  # GPT-2 style transposed weights


FAMILIES: dict[str, FamilySpec] = {
    "gpt2": FamilySpec("transformer.h", "mlp.c_proj", "mlp", "transformer.ln_f", conv1d=True),
    "gptj": FamilySpec("transformer.h", "mlp.fc_out", "mlp", "transformer.ln_f"),
    "gpt_neox": FamilySpec("gpt_neox.layers", "mlp.dense_4h_to_h", "mlp", "gpt_neox.final_layer_norm",
                           lm_head="embed_out"),
    "llama": FamilySpec("model.layers", "mlp.down_proj", "mlp", "model.norm"),
    "mistral": FamilySpec("model.layers", "mlp.down_proj", "mlp", "model.norm"),
    "qwen2": FamilySpec("model.layers", "mlp.down_proj", "mlp", "model.norm"),
    "qwen3": FamilySpec("model.layers", "mlp.down_proj", "mlp", "model.norm"),
}


def _get(root: nn.Module, path: str) -> nn.Module:
    mod = root
    for part in path.split("."):
        mod = getattr(mod, part)
    return mod


class ModelAdapter:
    """Uniform access to the edited modules of a causal LM."""

    def __init__(self, model: nn.Module) -> None:
        model_type = getattr(model.config, "model_type", None)
        if model_type not in FAMILIES:
            raise UnsupportedArchitectureError(
                f"model type {model_type!r} has no rayedit adapter (supported: {', '.join(sorted(FAMILIES))}). "
                + ADAPTER_HELP
            )
        self.model = model
        self.model_type: str = model_type
        self.spec = FAMILIES[model_type]
        cfg = model.config
        self.n_layers: int = int(cfg.num_hidden_layers if hasattr(cfg, "num_hidden_layers") else cfg.n_layer)
        self.d_model: int = int(getattr(cfg, "hidden_size", None) or cfg.n_embd)
        w = self.down_proj(0).weight
        self.d_ff: int = int(w.shape[0] if self.spec.conv1d else w.shape[1])
        n_pos = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None) or 2048
        self.max_positions: int = int(n_pos)

    # -- modules -------------------------------------------------------------------------------
    def block(self, layer: int) -> nn.Module:
        self.check_layer(layer)
        return _get(self.model, self.spec.layers)[layer]

    def down_proj(self, layer: int) -> nn.Module:
        return _get(_get(self.model, self.spec.layers)[layer], self.spec.down_proj)

    def mlp(self, layer: int) -> nn.Module:
        self.check_layer(layer)
        return _get(_get(self.model, self.spec.layers)[layer], self.spec.mlp)

    def final_norm(self) -> nn.Module:
        return _get(self.model, self.spec.final_norm)

    def lm_head(self) -> nn.Module:
        return _get(self.model, self.spec.lm_head)

    def logits_at(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, rows: torch.Tensor,
                  cols: torch.Tensor) -> torch.Tensor:
        """Next-token logits only at positions ``(rows[i], cols[i])``: the base model (final norm included)
        runs on every token, the LM head (d_model × vocab per position, ~20 % of SmolLM2-135M's forward
        and most of the target loop's memory) only where a loss reads it."""
        out = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return self.lm_head()(hidden[rows, cols])

    def weight_name(self, layer: int) -> str:
        """State-dict name of the edited weight of ``layer``."""
        return f"{self.spec.layers}.{layer}.{self.spec.down_proj}.weight"

    def check_layer(self, layer: int) -> None:
        if not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise ValueError(f"layer {layer!r} is out of range: this {self.model_type} model has layers "
                             f"0..{self.n_layers - 1}")

    # -- weights in mathematical orientation ---------------------------------------------------
    def weight_param(self, layer: int) -> nn.Parameter:
        self.check_layer(layer)
        return self.down_proj(layer).weight

    def to_math(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.T if self.spec.conv1d else stored

    def to_storage(self, math: torch.Tensor) -> torch.Tensor:
        return math.T if self.spec.conv1d else math

    def get_weight(self, layer: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``W`` of ``layer`` as ``(d_out, d_in)``, a detached copy in ``dtype``."""
        return self.to_math(self.weight_param(layer).detach()).to(dtype=dtype, copy=True)

    @torch.no_grad()
    def set_weight(self, layer: int, w_math: torch.Tensor) -> None:
        p = self.weight_param(layer)
        p.copy_(self.to_storage(w_math).to(device=p.device, dtype=p.dtype))

    @property
    def device(self) -> torch.device:
        return self.weight_param(0).device if self.n_layers else torch.device("cpu")


def block_hidden(output: object) -> torch.Tensor:
    """The hidden state of a decoder block's output, which is a tensor or a tuple (version dependent)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple | list):
        return output[0]
    hs = getattr(output, "hidden_states", None) or getattr(output, "last_hidden_state", None)
    if isinstance(hs, torch.Tensor):
        return hs
    raise TypeError(f"cannot find the hidden state in a block output of type {type(output).__name__}")
