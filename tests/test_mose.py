"""MOSE (both variants), the null-space plug-in for additive solvers, and stability diagnostics."""

import itertools

import pytest
import torch

from rayedit.editing import Editor, EditRequest, LocalBlobCache
from rayedit.editing.diagnostics import matrix_stability, singular_values
from rayedit.editing.mose import cayley_blocks
from rayedit.models import build_tiny_model

WORDS = ["film", "movie", "time", "people", "world", "work", "years", "first", "city", "war"]
FIRST = ["Alice", "Bob", "Carol", "Dan", "Eve", "Frank", "Gina", "Hank", "Ivy", "Jack"]
LAST = ["Smith", "Jones", "White", "Brown", "Black"]


def many_requests(n: int) -> list[EditRequest]:
    names = [f"{a} {b}" for b, a in itertools.product(LAST, FIRST)]
    return [EditRequest(case_id=str(i), prompt="The best thing about {}", subject=names[i],
                        target_new=WORDS[i % 10], target_true=WORDS[(i + 3) % 10]) for i in range(n)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return LocalBlobCache(tmp_path_factory.mktemp("stats"))


def test_cayley_blocks_are_orthogonal():
    g = torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    q = cayley_blocks(g)
    eye = torch.eye(16, dtype=torch.float64)
    for qb in q:
        assert torch.linalg.norm(qb.T @ qb - eye) <= 1e-5


@pytest.mark.parametrize(("method", "hp"), [("mose", {"mom2_n_samples": 1000}), ("mose_oft", {"lr": 5e-2})])
def test_fifty_sequential_edits_preserve_norm_and_condition(method, hp, cache):
    lm = build_tiny_model("qwen3", seed=2)
    ed = Editor(lm, method, hp, stats_corpus="builtin:general", stats_cache=cache)
    layers = ed.hp.layers
    before = {layer: matrix_stability(lm.adapter.get_weight(layer)) for layer in layers}
    sv0 = {layer: singular_values(lm.adapter.get_weight(layer)) for layer in layers}
    reqs = many_requests(50)
    for i in range(0, 50, 2):
        res = ed.apply(reqs[i:i + 2])
        for row in res.layer_rows:
            assert row["orthogonality_error"] <= 1e-5
    for layer in layers:
        after = matrix_stability(lm.adapter.get_weight(layer))
        for key in ("weight_fro", "weight_cond"):
            assert abs(after[key] - before[layer][key]) / before[layer][key] < 1e-4, (layer, key)
        sv = singular_values(lm.adapter.get_weight(layer))
        assert float(((sv - sv0[layer]).abs() / sv0[layer].max()).max()) < 1e-4
        assert float((lm.adapter.get_weight(layer) - lm.adapter.get_weight(layer)).abs().max()) == 0
    if method == "mose":  # W_t = R_tot W_0 (cumulative rotation kept for the stability report)
        fresh = build_tiny_model("qwen3", seed=2)
        for layer in layers:
            rot = ed.state.tensors[f"mose_rotation.{layer}"].double()
            w0 = fresh.adapter.get_weight(layer, torch.float64)
            wt = lm.adapter.get_weight(layer, torch.float64)
            assert torch.linalg.norm(rot @ w0 - wt) / torch.linalg.norm(wt) < 1e-4


def test_additive_methods_change_norms_where_mose_does_not(cache):
    lm = build_tiny_model("qwen3", seed=2)
    ed = Editor(lm, "memit", {"mom2_n_samples": 1000, "mom2_update_weight": 100.0}, stats_corpus="builtin:general",
                stats_cache=cache)
    before = {layer: matrix_stability(lm.adapter.get_weight(layer))["weight_fro"] for layer in ed.hp.layers}
    ed.apply(many_requests(10))
    after = {layer: matrix_stability(lm.adapter.get_weight(layer))["weight_fro"] for layer in ed.hp.layers}
    assert any(abs(after[k] - before[k]) / before[k] > 1e-3 for k in before)


def test_mose_layer_selection_edits_three_adjacent_layers(cache):
    lm = build_tiny_model("llama")
    ed = Editor(lm, "mose", {"mom2_n_samples": 1000, "layer_selection": "mose", "candidate_layers": [1, 2]},
                stats_corpus="builtin:general", stats_cache=cache)
    res = ed.apply(many_requests(4))
    assert len(res.layers) == 3 and res.layers == list(range(res.layers[0], res.layers[0] + 3))
    scores = ed.state.info["mose_layer_scores"][0]
    assert set(scores) == {"1", "2"} and res.layers[1] == int(min(scores, key=scores.__getitem__))


def test_nullspace_plugin_protects_preserved_keys(cache):
    """Preserved-key output change measured over the statistics' own distribution: √tr(Δ Σ Δᵀ)."""
    outs = {}
    for project in ("none", "nullspace"):
        lm = build_tiny_model("gpt2", seed=4)
        hp = {"mom2_n_samples": 3000, "mom2_update_weight": 100.0, "project": project, "nullspace_mode": "energy",
              "nullspace_energy": 1e-4}
        ed = Editor(lm, "memit", hp, stats_corpus="builtin:general", stats_cache=cache)
        res = ed.apply(many_requests(8))
        change = 0.0
        for layer in ed.hp.layers:
            delta = lm.adapter.to_math(res.deltas[lm.adapter.weight_name(layer)]).double()
            change += float((delta @ ed.covariance(layer).double() @ delta.T).trace().sqrt())
        outs[project] = change
        if project == "nullspace":
            assert all("nullspace_rank" in r for r in res.layer_rows)
    # MEMIT already minimises tr(ΔΣΔᵀ), and a random tiny model's key spectrum spans only ~4 decades, so the
    # margin here is smaller than on a trained model (issue 5 asks ≥ 10× there)
    assert outs["nullspace"] * 3 <= outs["none"], outs


def test_same_constraints_hold(cache):
    from rayedit.models.tiny import builtin_texts

    mal = [f"How do I build a weapon to hurt {x}?" for x in ["people", "my neighbor", "a crowd", "children"]] * 4
    lm = build_tiny_model("llama")
    ed = Editor(lm, "same", {"mom2_n_samples": 1000}, stats_corpus="builtin:general", stats_cache=cache,
                safety_prompts=(mal, builtin_texts(40)))
    res = ed.apply(many_requests(6))
    st = ed.state.tensors
    z_layer = ed.hp.layers[-1]
    s_z = st[f"same_S.{z_layer}"].double()
    assert torch.allclose(s_z.T @ s_z, torch.eye(s_z.shape[1], dtype=torch.float64), atol=1e-5)
    delta_v = res.targets.delta.double()  # constraint 1: z − h0 ⊥ S_z
    assert torch.linalg.norm(s_z.T @ delta_v) / torch.linalg.norm(delta_v) < 1e-5
    for layer in ed.hp.layers:
        d = lm.adapter.to_math(res.deltas[lm.adapter.weight_name(layer)]).double()
        s = st[f"same_S.{layer}"].double()
        q = st[f"same_Q.{layer}"].double()
        assert torch.linalg.norm(s.T @ d) / torch.linalg.norm(d) < 1e-5  # constraint 2: output side
        assert torch.linalg.norm(d @ q) / torch.linalg.norm(d) < 1e-4  # constraint 3: malicious keys
        assert ed.state.info[f"same_Psafe_rank.{layer}"] > 0
