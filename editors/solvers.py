"""Linear algebra of MALMEN's normal equation (Section 4.1, Theorems 1-2).

Conventions (code layout, rows are tokens): keys `K` (n, d) hold the keys u_j as rows, value
differences `D` (n, d') hold d_j as rows. The paper's U = Kᵀ (d, n) and D_paper = Dᵀ (d', n).
The regularised least-squares shift is

    S* = D_paper Uᵀ (U Uᵀ + λ I)⁻¹   i.e.   S*ᵀ = A⁻¹ Kᵀ D,   A = Kᵀ K + λ I   (d x d).

All solves go through `factorise` / `solve_spd`: a Cholesky solve carried out in float64 (keys of real FFNs
make Kᵀ K + λI too ill-conditioned for a float32 factorisation; the d x d system is small next to
the LM), and on failure or ill-conditioning a float64 least-squares fallback with a warning.
No explicit inverse is ever formed.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

# The float64 Cholesky solve is trusted while the (lower-bound) condition estimate stays below
# this fraction of 1/eps (~5e13); beyond it the solution has no correct digits left.
_COND_FRACTION = 1e-2


class NonFiniteInputError(FloatingPointError):
    """NaN or Inf reached a solve; the message names the layer and the operand (the run fails, stored)."""


def require_finite(layer: str, **operands: Tensor | float | None) -> None:
    """Raise NonFiniteInputError naming `layer` and each operand (keyword name) holding NaN or Inf.

    LAPACK/MKL given NaN fails with an opaque error (DGELSD, "INTERNAL ASSERT FAILED") or returns NaN.
    """
    bad = []
    for name, x in operands.items():
        if x is None:
            continue
        t = torch.as_tensor(x).detach()
        n_bad = int((~torch.isfinite(t)).sum())
        if n_bad:
            bad.append(f"{name.rstrip('_').replace('_', ' ')} ({n_bad} of {t.numel()} values NaN/Inf)")
    if bad:
        where = f"layer {layer}" if layer else "a layer"
        raise NonFiniteInputError(f"non-finite input to the solve of {where}: {'; '.join(bad)}")


class SolverFallbackWarning(RuntimeWarning):
    """The Cholesky solve failed or was ill-conditioned; float64 least squares was used."""


@dataclass
class SolveStats:
    """Counts how often the Cholesky path had to fall back (reported in the edit's info)."""

    calls: int = 0
    fallbacks: int = 0


def gram(keys: Tensor, lam: Tensor | float | None) -> Tensor:
    """A = Kᵀ K + λ I (d x d) in float64; `lam=None` means no regularisation term (`reg=none`)."""
    k = keys.double()  # a float32 Gram matrix of n < d keys can come out indefinite by rounding
    a = k.T @ k
    if lam is None:
        return a
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    return a + lam * eye


def _cond_lower_bound(chol: Tensor) -> Tensor:
    """cond(A) >= (max diag L / min diag L)^2 for A = L Lᵀ; cheap and never under-warns badly."""
    diag = chol.diagonal().abs()
    return (diag.max() / diag.min().clamp_min(torch.finfo(diag.dtype).tiny)) ** 2


@dataclass
class SPDFactor:
    """A factorised A for repeated solves: its float64 Cholesky factor, or A itself for the fallback."""

    a64: Tensor
    chol: Tensor | None  # None: Cholesky failed or was ill-conditioned; solves use float64 lstsq
    layer: str = ""  # named in errors

    def solve(self, b: Tensor) -> Tensor:
        """X with A X = B, in B's dtype (differentiable when A or B carry a graph)."""
        b64 = b.double()
        if self.chol is not None:
            return torch.cholesky_solve(b64, self.chol).to(b.dtype)
        require_finite(self.layer, right_hand_side=b64)  # gelsd fails opaquely on NaN
        # gelsd (SVD-based, handles rank deficiency) exists on CPU only; the fallback is rare.
        x = torch.linalg.lstsq(self.a64.cpu(), b64.cpu(), driver="gelsd").solution
        return x.to(device=b.device, dtype=b.dtype)


def factorise(a: Tensor, stats: SolveStats | None = None, layer: str = "") -> SPDFactor:
    """Cholesky-factorise symmetric positive (semi-)definite A once; warn and fall back when it fails.

    MALMEN solves with the same A twice per layer and step (the shift, then Algorithm 2's
    M = ∇W̃ A⁻¹), so the factor is kept and reused rather than computed twice.
    """
    if stats is not None:
        stats.calls += 1
    a64 = a.double()
    require_finite(layer, normal_equation_matrix=a64)
    chol, info = torch.linalg.cholesky_ex(a64)
    if int(info) == 0:
        limit = _COND_FRACTION / torch.finfo(torch.float64).eps
        if bool(torch.isfinite(chol).all()) and float(_cond_lower_bound(chol.detach())) < limit:
            return SPDFactor(a64, chol, layer)
        reason = "ill-conditioned"
    else:
        reason = f"not positive definite (leading minor {int(info)})"
    if stats is not None:
        stats.fallbacks += 1
    warnings.warn(
        f"normal-equation matrix ({a.shape[0]}x{a.shape[0]}) is {reason}; "
        "falling back to float64 least squares", SolverFallbackWarning, stacklevel=3,
    )
    return SPDFactor(a64, None, layer)


def solve_spd(a: Tensor, b: Tensor, stats: SolveStats | None = None, layer: str = "") -> Tensor:
    """X with A X = B for symmetric positive (semi-)definite A: Cholesky, else float64 lstsq + warning.

    Differentiable on both paths (autograd of cholesky_solve / lstsq), so the naive meta-gradient
    can flow through it.
    """
    return factorise(a, stats, layer).solve(b)


def normal_equation_shift(keys: Tensor, diffs: Tensor, lam: Tensor | float | None,
                          stats: SolveStats | None = None, layer: str = "") -> Tensor:
    """S* (d', d) minimising ||S Kᵀ - Dᵀ||² + λ||S||² for keys (n, d) and value differences (n, d')."""
    require_finite(layer, keys=keys, value_differences=diffs, lambda_=lam)
    return solve_spd(gram(keys, lam), keys.double().T @ diffs.double(), stats, layer).T.to(diffs.dtype)


def sum_shift(pseudo_keys: Tensor, pseudo_grads: Tensor, lr: Tensor | float) -> Tensor:
    """MEND's aggregation S* = -η Σ_j ∇̃v_j ũ_jᵀ (Appendix A.2), shape (d', d)."""
    return -lr * (pseudo_grads.T @ pseudo_keys)


def value_diffs(keys: Tensor, pseudo_keys: Tensor, pseudo_grads: Tensor, lr: Tensor | float) -> Tensor:
    """d_j = S_j u_j = -η (ũ_jᵀ u_j) ∇̃v_j without forming S_j (Appendix A.2), shape (n, d')."""
    coef = (pseudo_keys * keys).sum(-1, keepdim=True)
    return -lr * coef * pseudo_grads


def backprop_normal_equation(a: Tensor | SPDFactor, grad_shift: Tensor, shift: Tensor,
                             stats: SolveStats | None = None) -> tuple[Tensor, Tensor]:
    """Algorithm 2's manual step: M = ∇W̃ A⁻¹ (d', d) and dL/dλ = -tr(M S*ᵀ).

    ∇D for a chunk of keys K_c is then K_c Mᵀ (Theorem 1); A is symmetric so Mᵀ = A⁻¹ ∇W̃ᵀ.
    `a` is A or its factor from the forward solve (reused: no second factorisation).
    """
    factor = a if isinstance(a, SPDFactor) else factorise(a, stats)
    m = factor.solve(grad_shift.T).T
    dlam = -(m * shift).sum()
    return m, dlam


@dataclass
class RidgeSolve:
    """S* = Dᵀ K A⁻¹ (A = KᵀK + λI) and what Algorithm 2's backward needs, in primal or dual form.

    The primal form factorises the d x d matrix A, as the official code does. When there are fewer
    tuples than key dimensions (n < d: a meta-step of 16 edits on SmolLM2 caches ~60 tuples against
    d = 1536) the dual form is used instead, exact by the push-through identity
    (KᵀK + λI)⁻¹Kᵀ = Kᵀ(KKᵀ + λI)⁻¹: with P = (KKᵀ + λI)⁻¹ (n x n) and Z = P D,
    S* = Zᵀ K, ∇D = P K ∇W̃ᵀ and dL/dλ = -⟨Z, ∇D⟩. It replaces two d x d solves with d' right-hand
    sides (2.7 GFLOP per layer there) by an n x n factorisation.
    """

    keys: Tensor  # float64 keys (n, d)
    factor: SPDFactor  # of A (primal) or KKᵀ + λI (dual)
    dual: bool
    z: Tensor | None = None  # dual only: P D (n, d')


def ridge_shift(keys: Tensor, diffs: Tensor, lam: Tensor | float | None,
                stats: SolveStats | None = None, form: str = "auto", layer: str = "") -> tuple[Tensor, RidgeSolve]:
    """S* (d', d) in `diffs`' dtype and the solve kept for the backward; dual when n < d and λ > 0.

    `lam=None` (`reg=none`) always takes the primal form, whose singular d x d system the
    float64 least-squares fallback handles (and reports) as before. `form` = "primal" / "dual"
    forces one form (tests compare them). `layer` is named in the error when an operand holds NaN/Inf.
    """
    require_finite(layer, keys=keys, value_differences=diffs, lambda_=lam)
    k = keys.double()
    n, d = k.shape
    if lam is not None and (form == "dual" or (form == "auto" and n < d)):
        g = k @ k.T + lam * torch.eye(n, dtype=k.dtype, device=k.device)
        factor = factorise(g, stats, layer)
        z = factor.solve(diffs.double())
        return (z.T @ k).to(diffs.dtype), RidgeSolve(k, factor, True, z)
    factor = factorise(gram(k, lam), stats, layer)
    return factor.solve(k.T @ diffs.double()).T.to(diffs.dtype), RidgeSolve(k, factor, False)


def ridge_backward(rs: RidgeSolve, grad_shift: Tensor, shift: Tensor) -> tuple[Tensor, Tensor]:
    """(∇D (n, d'), dL/dλ) from ∇W̃ = ∂L/∂S* (d', d) (Theorems 1 and 2)."""
    g64 = grad_shift.double()
    if rs.dual:
        assert rs.z is not None
        grad_d = rs.factor.solve(rs.keys @ g64.T)
        dlam = -(rs.z * grad_d).sum()
    else:
        m = rs.factor.solve(g64.T).T  # M = ∇W̃ A⁻¹
        grad_d = rs.keys @ m.T
        dlam = -(m * shift.double()).sum()
    return grad_d.to(grad_shift.dtype), dlam.to(grad_shift.dtype)
