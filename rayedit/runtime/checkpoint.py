"""Compact editor state in checkpoints: constants stored once per stream, ``C_p`` stored as keys.

AlphaEdit, SAME and MEMIT-with-cache carry d_ff × d_ff matrices per edited layer: the projection ``P``
(fixed for the whole stream) and the accumulated ``C_p = Σ K Kᵀ`` (grows each batch). Written whole at
every step they dominate the checkpoint (4 GB per step for Llama-3-8B at 5 layers). Instead:

- a large state tensor goes into a content-addressed blob ``<stream>/state/<sha256>.safetensors``
  (written before the step's marker; an unchanged tensor — ``P``, SAME's subspaces — is written once);
- ``cache_c.<layer>`` is stored as the batch's keys ``K`` (d_ff × batch) in the step's
  ``keys.safetensors``; a resume rebuilds ``C_p`` from its last full value (stream start, or a blob) plus
  every later step's keys, with the same products in the same order. At save time the rebuild is
  checked bitwise against the editor's own ``C_p``; if it differs (another accumulation rule), the full
  matrix is stored instead, so correctness never depends on this optimisation.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from rayedit.store import Store, read_committed_step
from rayedit.store.formats import decode_tensors, encode_tensors
from rayedit.store.layout import stream_prefix

KEYS = "keys.safetensors"
LAYOUT_META = "rayedit_state_layout"
BLOB_MIN_BYTES = 1 << 16  # smaller tensors stay inline in delta.safetensors
CACHE_PREFIX = "cache_c."


def _accumulate(c: torch.Tensor | None, k: torch.Tensor) -> torch.Tensor:
    """``C ← C + K Kᵀ`` exactly as the solvers accumulate it (fp64 product, fp32 sum)."""
    kk = (k.double() @ k.double().T).float()
    return kk if c is None else c + kk


class StateCodec:
    """Per stream: splits the editor state of each step into inline tensors, blobs and keys, and back."""

    def __init__(self, store: Store, cid: str, sid: str, use_keys: bool = True) -> None:
        self.store, self.cid, self.sid, self.use_keys = store, cid, sid, use_keys
        self.known: set[str] = set()  # blob hashes known to exist
        self.shadow: dict[str, torch.Tensor | None] = {}  # C_p as reconstructable from what is stored
        self.base: dict[str, tuple[str | None, int]] = {}  # C_p name → (blob of its last full value, its step)

    # -- blobs ---------------------------------------------------------------------------------------
    def _blob_key(self, sha: str) -> str:
        return f"{stream_prefix(self.cid, self.sid)}/state/{sha}.safetensors"

    def put_blob(self, tensor: torch.Tensor) -> str:
        data = encode_tensors({"t": tensor})
        sha = hashlib.sha256(data).hexdigest()
        if sha not in self.known:
            self.store.put_if_absent(self._blob_key(sha), data)  # same content, same key: first writer wins
            self.known.add(sha)
        return sha

    def get_blob(self, sha: str) -> torch.Tensor:
        key = self._blob_key(sha)
        data = self.store.get_bytes(key)
        if hashlib.sha256(data).hexdigest() != sha:
            from rayedit.store.errors import CorruptStepError

            raise CorruptStepError(f"{self.store.uri}: state blob {key!r} does not match its hash")
        self.known.add(sha)
        return decode_tensors(data, key=key)[0]["t"]

    # -- save ----------------------------------------------------------------------------------------
    def start(self, state: dict[str, torch.Tensor]) -> None:
        """Before a stream's first batch (after ``prepare``): ``C_p`` as it starts (SAME seeds it)."""
        for name, t in state.items():
            if name.startswith(CACHE_PREFIX):
                self.base[name] = (self.put_blob(t), -1)
                self.shadow[name] = t

    def encode(self, step: int, state: dict[str, torch.Tensor],
               batch_keys: list[tuple[int, dict[int, torch.Tensor]]]) -> tuple[dict[str, torch.Tensor],
                                                                                dict[str, torch.Tensor], str]:
        """(inline state tensors, keys to store with the step, layout JSON for the delta's metadata)."""
        inline: dict[str, torch.Tensor] = {}
        keys: dict[str, torch.Tensor] = {}
        layout: dict[str, Any] = {"version": 1, "blobs": {}, "from_keys": {}}
        for name, t in sorted(state.items()):
            if self.use_keys and name.startswith(CACHE_PREFIX) and name.split(".", 1)[1].isdigit():
                layer = int(name.split(".", 1)[1])
                # a C_p that did not exist before this step starts from nothing after the previous step
                self.base.setdefault(name, (None, step - 1))
                cand = self.shadow.get(name)
                for _b, ck in batch_keys:
                    if layer in ck:
                        cand = _accumulate(cand, ck[layer])
                if cand is not None and cand.shape == t.shape and torch.equal(cand, t):
                    for b, ck in batch_keys:
                        if layer in ck:
                            keys[f"{b}.{layer}"] = ck[layer].contiguous()
                    sha, since = self.base[name]
                    layout["from_keys"][name] = {"base": sha, "base_step": since}
                    self.shadow[name] = t
                    continue
                # not reconstructable from keys: store it whole; later steps continue from this value
                self.base[name] = (self.put_blob(t), step)
                self.shadow[name] = t
                layout["blobs"][name] = self.base[name][0]
                continue
            if t.numel() * t.element_size() >= BLOB_MIN_BYTES:
                layout["blobs"][name] = self.put_blob(t)
            else:
                inline[name] = t
        return inline, keys, json.dumps(layout, sort_keys=True)

    # -- load ----------------------------------------------------------------------------------------
    def decode(self, step: int, inline: dict[str, torch.Tensor], meta: dict[str, str]) -> dict[str, torch.Tensor]:
        """The full editor state of committed ``step`` (and this codec primed to continue after it)."""
        state = dict(inline)
        layout = json.loads(meta.get(LAYOUT_META, "{}") or "{}")
        for name, sha in layout.get("blobs", {}).items():
            state[name] = self.get_blob(sha)
            if name.startswith(CACHE_PREFIX):
                self.base[name] = (sha, step)
                self.shadow[name] = state[name]
        rebuild = layout.get("from_keys", {})
        if rebuild:
            first = min(int(v["base_step"]) for v in rebuild.values()) + 1
            per_step = {s: read_committed_step(self.store, self.cid, self.sid, s, [KEYS]).tensors(KEYS)[0]
                        for s in range(first, step + 1)}
            for name, ref in rebuild.items():
                layer = name.split(".", 1)[1]
                c = None if ref["base"] is None else self.get_blob(ref["base"])
                for s in range(int(ref["base_step"]) + 1, step + 1):
                    batch_keys = sorted((int(k.split(".")[0]), v) for k, v in per_step[s].items()
                                        if k.split(".", 1)[1] == layer)
                    for _b, k in batch_keys:
                        c = _accumulate(c, k)
                assert c is not None, f"{name}: no base and no keys"
                state[name] = c
                self.base[name] = (ref["base"], int(ref["base_step"]))
                self.shadow[name] = c
        return state
