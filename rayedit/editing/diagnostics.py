"""Matrix-stability diagnostics of edited weights (methods.md §8).

The condition number uses the singular values of ``W`` from the eigenvalues of its smaller Gram matrix
(``W Wᵀ`` or ``Wᵀ W``) in float64: exact up to rounding, and ``O(d_out² d_in)`` — no full SVD of the
large side. Singular values below ``max(d_out, d_in)·ε_fp32·σ_max`` count as zero (pseudo-inverse
convention of MOSE eq. 3).
"""

from __future__ import annotations

import torch

COND_METHOD = "gram-eigvalsh-fp64"


def matrix_stability(w: torch.Tensor) -> dict[str, float]:
    """Frobenius norm, σ_max, smallest non-zero σ and κ₂ = σ_max / σ_min⁺ of a weight (math orientation)."""
    w64 = w.detach().to(torch.float64)
    gram = w64 @ w64.T if w64.shape[0] <= w64.shape[1] else w64.T @ w64
    sv = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt()
    smax = float(sv[-1])
    tol = max(w.shape) * torch.finfo(torch.float32).eps * smax
    nz = sv[sv > tol]
    smin = float(nz[0]) if nz.numel() else 0.0
    return {"weight_fro": float(w64.norm()), "weight_sigma_max": smax, "weight_sigma_min": smin,
            "weight_cond": smax / smin if smin > 0 else float("inf"), "weight_rank": int(nz.numel())}


def singular_values(w: torch.Tensor) -> torch.Tensor:
    w64 = w.detach().to(torch.float64)
    return torch.linalg.svdvals(w64)
