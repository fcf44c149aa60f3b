"""Numerically careful linear algebra for the solvers (methods.md §9): fp64 solves, no explicit inverses."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

SOLVE_DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass
class SolveReport:
    label: str
    regularised: bool = False
    ridge: float = 0.0
    residual: float = 0.0


def robust_solve(a: torch.Tensor, b: torch.Tensor, label: str, dtype: str = "float64",
                 rtol: float = 1e-6) -> tuple[torch.Tensor, SolveReport]:
    """Solve ``a x = b`` in ``dtype``. A singular or ill-conditioned system (LU failure, non-finite result or
    a relative residual above ``rtol``) is retried with a ridge ``ε·tr(a)/n·I`` and reported."""
    dt = SOLVE_DTYPES[dtype]
    a64, b64 = a.to(dt), b.to(dt)
    report = SolveReport(label)
    x, info = torch.linalg.solve_ex(a64, b64)
    ok = int(info.max()) == 0 and bool(torch.isfinite(x).all())
    cols = slice(None) if b64.ndim == 1 else slice(0, b64.shape[1], max(1, b64.shape[1] // 32))
    if ok:  # residual on a few columns: as cheap as a matvec, catches ill-conditioning
        report.residual = float((a64 @ x[..., cols] - b64[..., cols]).norm()
                                / b64[..., cols].norm().clamp_min(1e-300))
        ok = report.residual <= rtol
    ridge = 0.0
    scale = float(a64.diagonal().abs().mean().clamp_min(1e-12))
    eps = 1e-10 if dt == torch.float64 else 1e-5
    while not ok:
        ridge = scale * eps
        eye = torch.eye(a64.shape[0], dtype=dt, device=a64.device)
        x, info = torch.linalg.solve_ex(a64 + ridge * eye, b64)
        ok = int(info.max()) == 0 and bool(torch.isfinite(x).all())
        report.residual = float(((a64 + ridge * eye) @ x[..., cols] - b64[..., cols]).norm()
                                / b64[..., cols].norm().clamp_min(1e-300))
        ok = ok and report.residual <= max(rtol, 1e-4)
        eps *= 100
        if eps > 1.0 and not ok:
            raise FloatingPointError(f"{label}: linear system is singular even with a ridge of {ridge:.3g}")
    if ridge:
        report.regularised, report.ridge = True, ridge
        log.warning("%s: singular or ill-conditioned system; solved with ridge %.3g·I (residual %.2g)",
                    label, ridge, report.residual)
    return x, report


@dataclass
class NullSpace:
    """Projector ``P = Û Ûᵀ`` onto the span of low-eigenvalue directions of a (normalised) covariance."""

    projection: torch.Tensor  # (d, d) fp32
    rank: int
    eigenvalues: torch.Tensor  # ascending, fp64, for diagnostics (§6.5)
    mode: str
    threshold: float
    basis: torch.Tensor | None = None  # Û (d, rank) fp32, orthonormal


def null_space_energy(projection: torch.Tensor, cov: torch.Tensor) -> float:
    """``tr(P Σ) / tr(Σ)``: the share of the statistics' key energy inside the null space, i.e. the part of the
    preserved keys whose outputs an update projected on ``P`` may still change (0: fully protected)."""
    p, c = projection.double(), cov.double()
    return float((p * c).sum() / c.diagonal().sum())  # tr(PΣ) for symmetric P, Σ, without the d³ product


def null_space_projection(cov: torch.Tensor, mode: str = "threshold", threshold: float = 2e-2,
                          energy: float = 1e-3, label: str = "", decomposition: str = "eigh",
                          dtype: str = "float64") -> NullSpace:
    """AlphaEdit's projection (§3.3): eigenvectors with eigenvalue < ``threshold`` (absolute, on the
    normalised Σ), or ``mode="energy"``: the smallest directions whose eigenvalues sum to ≤ ρ·trace.

    ``decomposition="eigh"`` in float64 is ours; ``"svd"`` in float32 is what the reference does (for a
    symmetric PSD matrix both give the same subspace up to rounding)."""
    if decomposition == "eigh":
        evals, evecs = torch.linalg.eigh(cov.to(SOLVE_DTYPES[dtype]))
    elif decomposition == "svd":  # singular values descending: reverse to the ascending order of eigh
        u, s, _vh = torch.linalg.svd(cov.to(SOLVE_DTYPES[dtype]), full_matrices=False)
        evals, evecs = s.flip(0), u.flip(1)
    else:
        raise ValueError(f"unknown nullspace_decomposition {decomposition!r}; choose 'eigh' or 'svd'")
    evals, evecs = evals.to(torch.float64), evecs.to(torch.float64)
    if mode == "auto":  # threshold as [REF]; energy when the absolute threshold selects none/all (§4.3)
        n_below = int((evals < threshold).sum())
        mode = "threshold" if 0 < n_below < cov.shape[0] else "energy"
        if mode == "energy":
            log.warning("%snull-space threshold %.3g selects %d of %d directions; using energy mode rho=%.3g",
                        label, threshold, n_below, cov.shape[0], energy)
    if mode == "threshold":
        keep = evals < threshold
    elif mode == "energy":
        csum = torch.cumsum(evals.clamp_min(0), 0)
        keep = csum <= energy * evals.clamp_min(0).sum()
    else:
        raise ValueError(f"unknown nullspace_mode {mode!r}; choose 'threshold' or 'energy'")
    rank = int(keep.sum())
    d = cov.shape[0]
    if rank == 0 or rank == d:
        what = "no direction" if rank == 0 else "every direction"
        raise ValueError(
            f"{label}null space selects {what} (rank {rank} of {d}; eigenvalues {float(evals[0]):.3g}..."
            f"{float(evals[-1]):.3g}, {mode} {threshold if mode == 'threshold' else energy}): choose another "
            "nullspace_threshold or nullspace_mode: energy (methods.md §10.7)")
    u = evecs[:, keep]
    return NullSpace((u @ u.T).float(), rank, evals, mode, threshold if mode == "threshold" else energy, u.float())
