"""Numerical properties of the solvers on synthetic problems (no model needed)."""

import torch

from rayedit.editing.linalg import null_space_energy, null_space_projection, robust_solve
from rayedit.editing.solvers import alphaedit_delta, memit_delta, rome_delta


def _gen(seed: int = 0):
    return torch.Generator().manual_seed(seed)


def test_memit_delta_is_the_least_squares_minimiser():
    g = _gen(1)
    d_in, d_out, u, lam = 24, 10, 6, 3.0
    k0 = torch.randn(d_in, 200, generator=g, dtype=torch.float64)
    cov = k0 @ k0.T / 200
    keys = torch.randn(d_in, u, generator=g, dtype=torch.float64)
    resid = torch.randn(d_out, u, generator=g, dtype=torch.float64)
    delta, rep = memit_delta(keys, resid, cov, lam)
    assert not rep.regularised
    # independent: min ‖Δ K − R‖² + λ tr(Δ Σ Δᵀ) = ‖Δ [K, √λ L] − [R, 0]‖² with Σ = L Lᵀ
    chol = torch.linalg.cholesky(cov)
    a = torch.cat([keys, lam ** 0.5 * chol], 1)
    b = torch.cat([resid, torch.zeros(d_out, d_in, dtype=torch.float64)], 1)
    ref = torch.linalg.lstsq(a.T, b.T).solution.T
    assert torch.linalg.norm(delta - ref) / torch.linalg.norm(ref) < 1e-6


def test_memit_with_cache_minimises_the_extended_objective():
    g = _gen(2)
    d_in, d_out, u = 16, 8, 4
    cov = torch.eye(d_in, dtype=torch.float64) * 0.5
    cache_keys = torch.randn(d_in, 5, generator=g, dtype=torch.float64)
    keys = torch.randn(d_in, u, generator=g, dtype=torch.float64)
    resid = torch.randn(d_out, u, generator=g, dtype=torch.float64)
    delta, _ = memit_delta(keys, resid, cov, 2.0, cache=cache_keys @ cache_keys.T)
    a = torch.cat([keys, cache_keys, 2.0 ** 0.5 * torch.linalg.cholesky(cov)], 1)
    b = torch.cat([resid, torch.zeros(d_out, 5 + d_in, dtype=torch.float64)], 1)
    ref = torch.linalg.lstsq(a.T, b.T).solution.T
    assert torch.linalg.norm(delta - ref) / torch.linalg.norm(ref) < 1e-6


def _rank_deficient_problem(seed: int = 3, d_in: int = 32):
    """Preserved keys K0 span a 20-dim subspace of R^d_in; the null space of K0K0ᵀ has d_in − 20 dims."""
    g = _gen(seed)
    d_out = 12
    basis = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=torch.float64))[0]
    k0 = basis[:, :20] @ torch.randn(20, 500, generator=g, dtype=torch.float64)
    cov = (k0 @ k0.T / 500).float()
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    return g, k0, cov, w, basis


def test_alphaedit_update_lies_in_the_null_space_and_preserves_k0():
    g, k0, cov, w, _ = _rank_deficient_problem()
    ns = null_space_projection(cov, threshold=1e-6)
    assert ns.rank == 12
    p = ns.projection.double()
    assert torch.linalg.norm(p @ p - p) < 1e-5  # a projector
    keys = torch.randn(32, 4, generator=g, dtype=torch.float64)
    values = torch.randn(12, 4, generator=g, dtype=torch.float64)
    resid = values - w @ keys
    delta, _ = alphaedit_delta(keys, resid, ns.projection, None, alpha=1e-3)
    eye = torch.eye(32, dtype=torch.float64)
    assert torch.linalg.norm(delta @ (eye - p)) / torch.linalg.norm(delta) < 1e-4
    assert torch.linalg.norm(delta @ k0) / torch.linalg.norm(w @ k0) <= 1e-6
    # the new keys move towards their values
    assert torch.linalg.norm((w + delta) @ keys - values) < 0.9 * torch.linalg.norm(w @ keys - values)


def test_alphaedit_cache_protects_earlier_edits():
    g, _k0, cov, w, _ = _rank_deficient_problem(4, d_in=64)
    p = null_space_projection(cov, threshold=1e-6).projection
    k1 = torch.randn(64, 6, generator=g, dtype=torch.float64)
    v1 = torch.randn(12, 6, generator=g, dtype=torch.float64)
    d1, _ = alphaedit_delta(k1, v1 - w @ k1, p, None, alpha=1e-2)
    w1 = w + d1
    cache = k1 @ k1.T
    k2 = torch.randn(64, 6, generator=g, dtype=torch.float64)
    v2 = torch.randn(12, 6, generator=g, dtype=torch.float64)
    with_cache, _ = alphaedit_delta(k2, v2 - w1 @ k2, p, cache, alpha=1e-2)
    without, _ = alphaedit_delta(k2, v2 - w1 @ k2, p, None, alpha=1e-2)
    moved_with = torch.linalg.norm(with_cache @ k1)
    moved_without = torch.linalg.norm(without @ k1)
    assert moved_with * 10 <= moved_without


def test_rome_delta_writes_v_star_exactly():
    g = _gen(5)
    w = torch.randn(8, 20, generator=g, dtype=torch.float64)
    bias = torch.randn(8, generator=g, dtype=torch.float64)
    k = torch.randn(20, generator=g, dtype=torch.float64)
    left = torch.randn(20, generator=g, dtype=torch.float64)
    v = torch.randn(8, generator=g, dtype=torch.float64)
    delta = rome_delta(w, bias, k, left, v)
    assert torch.linalg.matrix_rank(delta) == 1
    assert torch.allclose((w + delta) @ k + bias, v, atol=1e-10)


def test_robust_solve_regularises_singular_systems_and_says_so():
    a = torch.zeros(5, 5, dtype=torch.float64)
    a[0, 0] = 1.0
    b = torch.ones(5, 2, dtype=torch.float64)
    x, rep = robust_solve(a, b, "test")
    assert rep.regularised and rep.ridge > 0
    assert torch.isfinite(x).all()
    x2, rep2 = robust_solve(torch.eye(5, dtype=torch.float64) * 2, b, "ok")
    assert not rep2.regularised and torch.allclose(x2, b / 2)


def test_null_space_key_energy_share():
    """tr(PΣ)/tr(Σ) is the kept eigenvalues' share of the trace; for an energy-mode projection it is ≤ ρ, and the
    keys' mean squared norm inside the null space equals it (the share of preserved-key energy left unprotected)."""
    g = torch.Generator().manual_seed(3)
    scale = torch.logspace(0, -2, 64, dtype=torch.float64)[:, None]  # a spread spectrum, like real keys
    keys = torch.randn(64, 4000, generator=g, dtype=torch.float64) * scale
    cov = keys @ keys.T / keys.shape[1]
    evals = torch.linalg.eigvalsh(cov)
    for ns, bound in ((null_space_projection(cov, threshold=float(evals[20])), None),
                      (null_space_projection(cov, mode="energy", energy=0.05), 0.05)):
        share = null_space_energy(ns.projection, cov)
        kept = ns.eigenvalues[ns.eigenvalues < float(evals[20])] if bound is None else None
        if kept is not None:
            assert abs(share - float(kept.sum() / evals.sum())) < 1e-6  # fp32 P: rounding only
        else:
            assert 0 < share <= bound + 1e-6
        inside = float((ns.projection.double() @ keys).pow(2).sum() / keys.pow(2).sum())
        assert abs(share - inside) < 1e-6


def test_null_space_energy_and_auto_modes():
    _, _, cov, _, _ = _rank_deficient_problem(6)
    ns = null_space_projection(cov, mode="energy", energy=1e-6)
    assert ns.rank == 12  # the (numerically) zero eigenvalues carry no energy
    auto = null_space_projection(cov * 1e-6, mode="auto", threshold=2e-2, energy=1e-6)
    assert auto.mode == "energy" and auto.rank == 12
    try:
        null_space_projection(cov * 1e-6, mode="threshold", threshold=2e-2)
    except ValueError as exc:
        assert "every direction" in str(exc)
    else:
        raise AssertionError("an all-null projection must be refused")


def test_rule_defaults_rome_depth_oft_radius_and_toyworld_preset(tmp_path):
    import json

    from rayedit.editing.hparams import is_toyworld, resolve_hparams

    # ROME at ~15 % depth: the Llama-3-8B preset's layer 5 of 32, layer 1 of a 4-layer model
    assert resolve_hparams("rome", "some-model", 32, d_ff=14336).layers == [5]
    assert resolve_hparams("rome", "some-model", 4, d_ff=512).layers == [1]
    # mose_oft keeps the released models' absolute generator radius 1e-5·b²/√r (b = d_ff/r) on any d_ff
    for d_ff in (512, 14336):
        hp = resolve_hparams("mose_oft", "some-model", 4, d_ff=d_ff)
        b = d_ff // hp.blocks
        assert abs(hp.radius_factor * b ** 2 / hp.blocks ** 0.5 - 1e-5 * 3584 ** 2 / 2) < 1e-6
    # the toy world preset: by name, or by the manifest beside a model folder built anywhere
    world = tmp_path / "anywhere"
    (world / "model").mkdir(parents=True)
    assert not is_toyworld(str(world / "model"))
    (world / "manifest.json").write_text(json.dumps({"kind": "rayedit-toyworld", "seed": 0}))
    for name in ("toyworld:0", str(world / "model")):
        hp = resolve_hparams("alphaedit", name, 4, d_ff=512)
        assert hp.provenance == "preset:toyworld" and hp.layers == [1] and hp.clamp_norm_factor == 1.5
    assert resolve_hparams("alphaedit", "toyworld:0", 4, {"layers": [2]}, d_ff=512).layers == [2]  # overrides win
    assert resolve_hparams("alphaedit", "tiny-llama", 4, d_ff=512).provenance == "rule"
