"""The editing pipeline on tiny models of every supported family."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rayedit.editing import Editor, EditRejected, EditRequest, LocalBlobCache
from rayedit.editing.covariance import CovarianceStats, StatsError, StatsSettings
from rayedit.editing.keys import read_at_fact_tokens, template_items
from rayedit.editing.tokens import encode, target_ids
from rayedit.models import TINY_FAMILIES, UnsupportedArchitectureError, build_tiny_model, wrap_model

SUBJECTS = ["Alice Smith", "Bob Jones", "Carol White", "Dan Brown", "Eve Black", "Frank Green", "Gina Gray",
            "Hank Hill"]
# single-token targets of the tiny tokenizer; the subject ends the prompt, so its last token is where a
# random (untrained) model can be steered at all
PAIRS = [("film", "war"), ("movie", "city"), ("time", "years"), ("people", "work"), ("world", "first"),
         ("work", "film"), ("years", "movie"), ("city", "time")]
FAST = {"mom2_n_samples": 1000}


def requests(n: int = 8, offset: int = 0) -> list[EditRequest]:
    return [EditRequest(case_id=str(offset + i), prompt="The best thing about {}", subject=s, target_new=a,
                        target_true=b)
            for i, (s, (a, b)) in enumerate(zip(SUBJECTS[:n], PAIRS[:n], strict=True))]


def log_prob(lm, text: str, target: str) -> float:
    ids = encode(lm.tokenizer, text)
    t = target_ids(lm.tokenizer, text, target)
    with torch.no_grad():
        lp = torch.log_softmax(lm.model(input_ids=torch.tensor([ids + t[:-1]])).logits[0].float(), -1)
    return float(sum(lp[len(ids) - 1 + j, tok] for j, tok in enumerate(t)))


@pytest.fixture(scope="module")
def stats_cache(tmp_path_factory):
    return LocalBlobCache(tmp_path_factory.mktemp("stats"))


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_adapter_orientation_matches_the_module(family):
    lm = build_tiny_model(family)
    ad = lm.adapter
    mod = ad.down_proj(1)
    k = torch.randn(3, ad.d_ff)
    w = ad.get_weight(1)
    assert w.shape == (ad.d_model, ad.d_ff)
    bias = getattr(mod, "bias", None)
    expect = k @ w.T + (bias.detach() if bias is not None else 0)
    assert torch.allclose(mod(k), expect, atol=1e-5)
    ad.set_weight(1, w * 2)
    assert torch.allclose(ad.get_weight(1), w * 2)


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_batch_of_eight_edits_takes(family, method, stats_cache):
    lm = build_tiny_model(family)
    reqs = requests()
    # a random tiny model routes little signal, so MEMIT's trust region λ is loosened here
    hp = {**FAST, "mom2_update_weight": 100.0} if method == "memit" else FAST
    Editor(lm, method, hp, stats_corpus="builtin:general", stats_cache=stats_cache).apply(reqs)
    flipped = [log_prob(lm, r.text, r.target_new) > log_prob(lm, r.text, r.target_true) for r in reqs]
    assert all(flipped), flipped


def test_rome_writes_v_star_at_k_star(stats_cache):
    lm = build_tiny_model("llama")  # no bias: W′k* = v* exactly
    ed = Editor(lm, "rome", FAST, stats_corpus="builtin:general", stats_cache=stats_cache)
    res = ed.apply(requests(1))
    layer = res.layers[0]
    groups = ed.state.templates["rome"]
    flat, _ = read_at_fact_tokens(lm, template_items(requests(1), groups), [layer], [])
    k_star = flat[layer].mean(0).double()  # inputs of layer `layer` are unchanged by its own edit
    w_new = lm.adapter.get_weight(layer, torch.float64)
    v_star = res.targets.z[:, 0].double()
    assert torch.linalg.norm(w_new @ k_star - v_star) / torch.linalg.norm(v_star) < 1e-5


@pytest.mark.parametrize("method", ["memit", "alphaedit", "rome", "ft"])
def test_same_inputs_give_bitwise_identical_deltas(method, stats_cache):
    deltas = []
    for _ in range(2):
        lm = build_tiny_model("gpt2", seed=3)
        res = Editor(lm, method, FAST if method != "ft" else None, stats_corpus="builtin:general",
                     stats_cache=stats_cache).apply(requests(4))
        deltas.append(res.deltas)
    assert deltas[0].keys() == deltas[1].keys()
    for name in deltas[0]:
        assert torch.equal(deltas[0][name], deltas[1][name])


RESUME_SCRIPT = r"""
import sys, torch
from safetensors.torch import load_file
sys.path.insert(0, sys.argv[1])
from test_editing_models import requests, FAST
from rayedit.editing import Editor, LocalBlobCache, apply_weights
from rayedit.models import build_tiny_model
torch.set_num_threads(1)
out = sys.argv[2]
lm = build_tiny_model("qwen2", seed=1)
apply_weights(lm, load_file(out + "/weights.safetensors"))
ed = Editor(lm, "alphaedit", FAST, stats_corpus="builtin:general", stats_cache=LocalBlobCache(sys.argv[3]))
ed.load_state(out + "/state.safetensors")
reqs = requests(8)
for b in range(3, 5):
    ed.apply(reqs[b * 2 - 2: b * 2] if b < 4 else reqs[6:8])
from safetensors.torch import save_file
save_file(ed.edited_weights(), out + "/final.safetensors")
"""


def test_sequential_resume_in_a_new_process_is_bitwise_equal(tmp_path, stats_cache):
    reqs = requests(8)
    batches = [reqs[0:2], reqs[2:4], reqs[4:6], reqs[4:6], reqs[6:8]]
    batches = [reqs[0:2], reqs[2:4], reqs[4:6], [r.model_copy(update={"case_id": r.case_id + "b"})
                                                 for r in reqs[4:6]], reqs[6:8]]
    # uninterrupted: 5 batches
    lm = build_tiny_model("qwen2", seed=1)
    ed = Editor(lm, "alphaedit", FAST, stats_corpus="builtin:general", stats_cache=stats_cache)
    for b in batches:
        ed.apply(b)
    full = ed.edited_weights()
    # interrupted: 3 batches, save weights + editor state, then 2 more in a fresh process
    lm2 = build_tiny_model("qwen2", seed=1)
    ed2 = Editor(lm2, "alphaedit", FAST, stats_corpus="builtin:general", stats_cache=stats_cache)
    for b in batches[:3]:
        ed2.apply(b)
    from safetensors.torch import load_file, save_file

    save_file(ed2.edited_weights(), str(tmp_path / "weights.safetensors"))
    ed2.save_state(tmp_path / "state.safetensors")
    script = RESUME_SCRIPT.replace("reqs[b * 2 - 2: b * 2] if b < 4 else reqs[6:8]",
                                   "[r.model_copy(update={'case_id': r.case_id + 'b'}) for r in reqs[4:6]] "
                                   "if b == 3 else reqs[6:8]")
    subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent), str(tmp_path),
                    str(stats_cache.root)], check=True, timeout=300,
                   env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    resumed = load_file(str(tmp_path / "final.safetensors"))
    assert full.keys() == resumed.keys()
    for name in full:
        assert torch.equal(full[name], resumed[name]), name


def test_covariance_cache_second_call_runs_no_forward(tmp_path):
    lm = build_tiny_model("llama")
    cache = LocalBlobCache(tmp_path)
    settings = StatsSettings(n_samples=300)
    first = CovarianceStats(lm, "builtin:general", settings, cache=cache)
    cov = first.covariance(1)
    assert first.forward_passes > 0
    second = CovarianceStats(lm, "builtin:general", settings, cache=cache)
    assert torch.equal(second.covariance(1), cov)
    assert second.forward_passes == 0
    # statistics of another model (different weights) are never reused silently
    other = build_tiny_model("llama", seed=9)
    third = CovarianceStats(other, "builtin:general", settings, cache=cache)
    third.covariance(1)
    assert third.forward_passes > 0
    # a cache entry whose provenance does not match is a loud error
    key_dir = next(p for p in Path(tmp_path).rglob("cov.safetensors") if lm.fingerprint in str(p))
    foreign = next(p for p in Path(tmp_path).rglob("cov.safetensors") if other.fingerprint in str(p))
    key_dir.write_bytes(foreign.read_bytes())
    with pytest.raises(StatsError, match="provenance does not match"):
        CovarianceStats(lm, "builtin:general", settings, cache=cache).covariance(1)


def test_non_finite_update_is_rolled_back(monkeypatch, stats_cache):
    lm = build_tiny_model("gpt2")
    ed = Editor(lm, "memit", FAST, stats_corpus="builtin:general", stats_cache=stats_cache)
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    from rayedit.editing import solvers

    real = solvers.memit_delta
    calls = {"n": 0}

    def poisoned(*a, **k):
        delta, rep = real(*a, **k)
        calls["n"] += 1
        if calls["n"] == 2:  # the first layer was already written when the second fails
            delta = delta.clone()
            delta[0, 0] = float("nan")
        return delta, rep

    monkeypatch.setattr(solvers, "memit_delta", poisoned)
    with pytest.raises(EditRejected, match="NaN"):
        ed.apply(requests(2))
    for n, p in lm.model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n
    assert ed.state.n_batches == 0


def test_ft_norm_constraint_bounds_every_weight():
    lm = build_tiny_model("gptj")
    w0 = lm.adapter.get_weight(3)
    res = Editor(lm, "ft", {"layers": [3], "norm_constraint": 1e-3, "lr": 1e-2}).apply(requests(2))
    diff = (lm.adapter.get_weight(3) - w0).abs().max()
    assert 0 < float(diff) <= 1e-3 + 1e-7
    assert res.layers == [3]


def test_bf16_model_keeps_an_fp32_master(stats_cache):
    lm = build_tiny_model("llama")
    lm.model.to(torch.bfloat16)
    ed = Editor(lm, "memit", FAST, stats_corpus="builtin:general", stats_cache=stats_cache)
    ed.apply(requests(2))
    for layer in ed.hp.layers:
        master = ed.state.tensors[f"master.{layer}"]
        assert master.dtype == torch.float32
        assert torch.equal(master.to(torch.bfloat16), lm.adapter.get_weight(layer, torch.bfloat16))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prompt": "no slot here"}, "exactly one"),
        ({"prompt": "{} and {}"}, "exactly one"),
        ({"target_new": "  "}, "must not be empty"),
        ({"subject": ""}, "must not be empty"),
    ],
)
def test_bad_requests_are_rejected(kwargs, match):
    base = {"case_id": "1", "prompt": "{} plays", "subject": "A", "target_new": "x"}
    with pytest.raises(ValueError, match=match):
        EditRequest(**{**base, **kwargs})


def test_bad_layers_and_architectures_are_clear_errors():
    lm = build_tiny_model("gpt2")
    with pytest.raises(ValueError, match="out of range"):
        Editor(lm, "memit", {"layers": [1, 9]})
    with pytest.raises(ValueError, match="unknown method"):
        Editor(lm, "nope")
    with pytest.raises(ValueError, match="mom2_update_weigth|Extra inputs"):
        Editor(lm, "memit", {"mom2_update_weigth": 1.0})
    from transformers import BloomConfig, BloomForCausalLM

    bloom = BloomForCausalLM(BloomConfig(vocab_size=50, hidden_size=16, n_layer=1, n_head=2))
    with pytest.raises(UnsupportedArchitectureError, match="bloom.*adapter"):
        wrap_model(bloom, lm.tokenizer)


def test_cli_edit_json_on_a_saved_tiny_model(tmp_path):
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    model_dir = tmp_path / "tiny"
    subprocess.run([sys.executable, "-m", "rayedit", "models", "tiny", "llama", "--out", str(model_dir)], check=True,
                   env=env, timeout=300, capture_output=True)
    for method in ["memit", "alphaedit", "rome", "ft"]:
        proc = subprocess.run(
            [sys.executable, "-m", "rayedit", "edit", "--model", str(model_dir), "--method", method, "--prompt",
             "The best thing about {}", "--subject", "Alice Smith", "--target-new", " film", "--target-true", " war",
             "--stats-corpus", "builtin:general", "--set", "mom2_n_samples=1000", "--json"],
            env=env, timeout=300, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        assert out["method"] == method and out["layers"]
        assert out["after"]["p_new"] > out["before"]["p_new"]
        assert out["after"]["p_new"] > out["after"]["p_true"]
    bad = subprocess.run([sys.executable, "-m", "rayedit", "edit", "--model", str(model_dir), "--prompt",
                          "no slot", "--subject", "A", "--target-new", "x"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "exactly one" in bad.stderr and "Traceback" not in bad.stderr


def test_sharded_statistics_equal_the_single_pass(tmp_path):
    lm = build_tiny_model("gpt2")
    settings = StatsSettings(n_samples=200)
    single = CovarianceStats(lm, "builtin:general", settings, cache=LocalBlobCache(tmp_path / "a"))
    sharded = CovarianceStats(lm, "builtin:general", settings, cache=LocalBlobCache(tmp_path / "b"))
    n = sharded.document_count()
    assert sharded.missing_layers([1, 2]) == [1, 2]
    shards = [sharded.compute_shard([1, 2], a, min(n, a + 70)) for a in range(0, n, 70)]
    sharded.store_reduced([1, 2], shards)
    assert sharded.missing_layers([1, 2]) == []
    for layer in (1, 2):
        a, b = single.second_moments([layer])[layer], sharded.second_moments([layer])[layer]
        assert a.count == b.count
        # fp32 products per batch: the batch composition changes only rounding
        assert torch.linalg.norm(a.sum - b.sum) / torch.linalg.norm(a.sum) < 1e-5
