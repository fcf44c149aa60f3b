"""Forward hooks: read edited-module inputs / block outputs at given positions, add a vector, stop early."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..models.adapters import block_hidden


class StopForward(Exception):
    """Raised by a hook once everything needed was captured, so upper layers are never computed."""


def replace_hidden(output: object, hidden: torch.Tensor) -> object:
    """Return ``output`` (tensor or tuple) with its hidden state replaced."""
    if isinstance(output, torch.Tensor):
        return hidden
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    if isinstance(output, list):
        return [hidden, *output[1:]]
    raise TypeError(f"cannot replace the hidden state in an output of type {type(output).__name__}")


@contextmanager
def hooks(handles_factory: list[Callable[[], torch.utils.hooks.RemovableHandle]]) -> Iterator[None]:
    handles = [f() for f in handles_factory]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def capture_input(module: nn.Module, sink: dict, key: object, stop: bool = False):
    """Register a pre-hook storing the module's positional input 0 (the key ``k`` for a down-projection)."""

    def pre_hook(_mod: nn.Module, args: tuple, kwargs: dict | None = None):
        x = args[0] if args else next(iter(kwargs.values()))
        sink[key] = x
        if stop:
            raise StopForward

    return lambda: module.register_forward_pre_hook(pre_hook)


def capture_output(module: nn.Module, sink: dict, key: object, stop: bool = False):
    """Register a hook storing the module's output hidden state (tensor or tuple[0])."""

    def hook(_mod: nn.Module, _args: tuple, output: object):
        sink[key] = block_hidden(output)
        if stop:
            raise StopForward

    return lambda: module.register_forward_hook(hook)


def add_at_positions(module: nn.Module, rows: torch.Tensor, positions: torch.Tensor,
                     vectors: Callable[[], torch.Tensor], sink: dict | None = None, key: object = None):
    """Register a hook adding ``vectors()[j]`` to the output hidden state at ``(rows[j], positions[j])``.

    The addition is out of place so autograd sees a clean graph; ``sink[key]`` gets the unmodified hidden.
    """

    def hook(_mod: nn.Module, _args: tuple, output: object):
        h = block_hidden(output)
        if sink is not None:
            sink[key] = h
        v = vectors().to(h.dtype)
        add = torch.zeros_like(h).index_put((rows, positions), v)
        return replace_hidden(output, h + add)

    return lambda: module.register_forward_hook(hook)


def run_forward(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kw) -> object | None:
    """Forward that treats :class:`StopForward` as a normal early exit (returns None then)."""
    try:
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kw)
    except StopForward:
        return None
