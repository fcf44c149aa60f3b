"""Compact editor state in checkpoints: constants once per stream, C_p as keys, exact rebuild on resume."""

from __future__ import annotations

from pathlib import Path

import torch

from rayedit.models import build_tiny_model
from rayedit.runtime.checkpoint import KEYS, StateCodec
from rayedit.runtime.stream import STATE_PREFIX, StreamJob, StreamRunner
from rayedit.store import open_store, read_committed_step
from rayedit.store.layout import DELTA

FAST = {"mom2_n_samples": 200, "v_num_grad_steps": 4}
SUBJECTS = ["Paris", "Rome", "Tokyo", "Berlin", "Madrid", "Oslo"]


def _job(method: str) -> StreamJob:
    reqs = [{"case_id": f"c{i}", "prompt": "The best thing about {}", "subject": s, "target_new": " film"}
            for i, s in enumerate(SUBJECTS)]
    return StreamJob("ck", "s", "tiny:llama", method, method, FAST, "d", 0, "sequential_batches", 2, 1,
                     "builtin:general", reqs)


def test_alphaedit_state_is_stored_once_and_rebuilt_exactly(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "store"))
    runner = StreamRunner(build_tiny_model("llama"), store)
    runner.open(_job("alphaedit"))
    runner.step()
    blobs_after_0 = store.list("campaigns/ck/streams/s/state")
    runner.step()
    state_after_1 = {k: v.clone() for k, v in runner.editor.state_dict()[0].items()}
    assert store.list("campaigns/ck/streams/s/state") == blobs_after_0  # P is not written again
    assert any(k.startswith("projection.") for k in state_after_1)
    assert any(k.startswith("cache_c.") for k in state_after_1)
    tensors, _ = read_committed_step(store, "ck", "s", 1, [DELTA]).tensors(DELTA)
    assert not [k for k in tensors if k.startswith((STATE_PREFIX + "projection.", STATE_PREFIX + "cache_c."))]
    keys, _ = read_committed_step(store, "ck", "s", 1, [KEYS]).tensors(KEYS)
    assert keys and all(k.startswith("1.") for k in keys)  # batch 1's keys, one tensor per edited layer
    # a fresh replica resumes after step 1: the rebuilt state equals the editor's own, bitwise
    fresh = StreamRunner(build_tiny_model("llama"), store)
    assert fresh.open(_job("alphaedit")) == 2
    rebuilt = fresh.editor.state_dict()[0]
    assert rebuilt.keys() == state_after_1.keys()
    for k, v in state_after_1.items():
        assert torch.equal(rebuilt[k], v), k
    # and goes on to the same step 2 as the original runner
    runner.step()
    w_orig = runner.editor.edited_weights()
    store2 = open_store(str(tmp_path / "store2"))
    for s in ("000000", "000001"):  # copy the two committed steps into a second store
        for key in store.list(f"campaigns/ck/streams/s/steps/{s}"):
            store2.put_bytes(key, store.get_bytes(key))
    for key in blobs_after_0 + store.list("cache"):  # the constants and the shared statistics cache
        store2.put_bytes(key, store.get_bytes(key))
    other = StreamRunner(build_tiny_model("llama"), store2)
    assert other.open(_job("alphaedit")) == 2
    other.step()
    for k, v in other.editor.edited_weights().items():
        assert torch.equal(v, w_orig[k]), k


def test_an_unknown_accumulation_is_stored_whole(tmp_path: Path) -> None:
    """If C_p is not Σ K Kᵀ of the reported keys, the codec stores the matrix and the rebuild still matches."""
    store = open_store(str(tmp_path / "store"))
    codec = StateCodec(store, "ck", "s")
    k = torch.randn(8, 3)
    codec.start({})
    odd = {"cache_c.1": (k @ k.T) * 2}  # not what the keys say
    inline, keys, layout = codec.encode(0, odd, [(0, {1: k})])
    assert keys == {} and '"cache_c.1"' in layout and inline == {}
    good = {"cache_c.1": odd["cache_c.1"] + (k.double() @ k.double().T).float()}
    inline, keys, layout = codec.encode(1, good, [(1, {1: k})])
    assert list(keys) == ["1.1"] and '"from_keys": {"cache_c.1"' in layout
    from rayedit.store.formats import encode_tensors
    from rayedit.store.layout import commit_step

    files = {DELTA: encode_tensors({"x": torch.zeros(1)}), KEYS: encode_tensors(keys)}
    commit_step(store, "ck", "s", 1, files)
    state = StateCodec(store, "ck", "s").decode(1, {}, {"rayedit_state_layout": layout})
    assert torch.equal(state["cache_c.1"], good["cache_c.1"])
