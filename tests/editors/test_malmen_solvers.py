"""The normal equation of MALMEN (Section 4.1, Theorems 1-2) and its limits, checked numerically."""

from __future__ import annotations

import pytest
import torch

from bench.evaluation.metrics import relative_residual
from editors.solvers import (
    SolverFallbackWarning,
    SolveStats,
    backprop_normal_equation,
    gram,
    normal_equation_shift,
    solve_spd,
    sum_shift,
    value_diffs,
)


def rand(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,d", [(50, 20), (8, 20)])  # more and fewer keys than dimensions
def test_shift_satisfies_normal_equation(dtype, n, d):
    keys, diffs, lam = rand(n, d, dtype=dtype), rand(n, 7, seed=1, dtype=dtype), 0.3
    s = normal_equation_shift(keys, diffs, lam)
    assert s.shape == (7, d) and s.dtype == dtype
    # S (UUᵀ + λI) = D Uᵀ, i.e. in rows-as-tokens layout S (KᵀK + λI) = Dᵀ K
    lhs, rhs = s.double() @ gram(keys.double(), lam), diffs.double().T @ keys.double()
    assert float((lhs - rhs).norm() / rhs.norm()) < 1e-5


def test_shift_minimises_the_regularised_least_squares():
    keys, diffs, lam = rand(30, 10), rand(30, 4, seed=1), 0.7
    s = normal_equation_shift(keys, diffs, lam)

    def objective(x):
        return float(((keys @ x.T - diffs) ** 2).sum() + lam * (x**2).sum())

    best = objective(s)
    for k in range(5):
        assert objective(s + 1e-3 * rand(*s.shape, seed=10 + k)) > best


def orthonormal_keys(n, d, seed=0):
    q, _ = torch.linalg.qr(rand(d, n, seed=seed))  # d x n, orthonormal columns
    return q.T.contiguous()  # n rows u_j with u_iᵀ u_j = δ_ij


def test_orthonormal_keys_small_lambda_reproduce_each_value_difference():
    """UᵀU = I: S* = D Uᵀ / (1 + λ), so S* u_j = d_j / (1 + λ) -> d_j as λ -> 0 (residual λ/(1+λ))."""
    keys, diffs = orthonormal_keys(6, 16), rand(6, 5, seed=2)
    for lam in (1e-2, 1e-6, 1e-10):
        s = normal_equation_shift(keys, diffs, lam)
        assert relative_residual(s, keys, diffs) == pytest.approx(lam / (1 + lam), rel=1e-6, abs=1e-12)
    assert relative_residual(normal_equation_shift(keys, diffs, 1e-12), keys, diffs) < 1e-10


def test_orthonormal_keys_normal_equation_is_the_scaled_sum_of_shifts():
    """With ũ_j = u_j orthonormal, d_j = -η ∇̃v_j and Σ_j S_j = Σ_j d_j u_jᵀ = (1 + λ) S*."""
    keys, pgrads, eta, lam = orthonormal_keys(6, 16), rand(6, 5, seed=3), 0.4, 0.25
    diffs = value_diffs(keys, keys, pgrads, eta)
    assert torch.allclose(diffs, -eta * pgrads)
    s_normal = normal_equation_shift(keys, diffs, lam)
    s_sum = sum_shift(keys, pgrads, eta)
    assert torch.allclose((1 + lam) * s_normal, s_sum, atol=1e-12)
    assert relative_residual(s_sum, keys, diffs) < 1e-12  # no cancellation between orthogonal keys


def test_correlated_keys_sum_of_shifts_cancels_but_normal_equation_does_not():
    """The cancellation effect (Figure 8): near-parallel keys make the summed shift miss each d_j."""
    base = rand(1, 32, seed=4)
    keys = base + 0.05 * rand(20, 32, seed=5)
    pgrads, eta = rand(20, 8, seed=6), 1.0
    pkeys = keys
    diffs = value_diffs(keys, pkeys, pgrads, eta)
    r_sum = relative_residual(sum_shift(pkeys, pgrads, eta), keys, diffs)
    r_ne = relative_residual(normal_equation_shift(keys, diffs, 1e-6), keys, diffs)
    assert r_sum > 1.0 and r_ne < 1e-3


def test_large_lambda_limit_is_the_sum_of_key_value_outer_products():
    """λ S*(λ) -> D Uᵀ = Σ_j d_j u_jᵀ as λ -> ∞ (error O(||UUᵀ|| / λ))."""
    keys, diffs = rand(12, 9, seed=7), rand(12, 3, seed=8)
    target = diffs.T @ keys
    for lam in (1e4, 1e6):
        err = float((lam * normal_equation_shift(keys, diffs, lam) - target).norm() / target.norm())
        assert err < 100 * float(torch.linalg.matrix_norm(keys.T @ keys, 2)) / lam


def test_value_diffs_and_sum_shift_match_explicit_rank_one_shifts():
    keys, pkeys, pgrads, eta = rand(5, 6, seed=9), rand(5, 6, seed=10), rand(5, 4, seed=11), 0.3
    shifts = [-eta * torch.outer(pgrads[j], pkeys[j]) for j in range(5)]  # S_j = -η ∇̃v_j ũ_jᵀ
    d = torch.stack([shifts[j] @ keys[j] for j in range(5)])
    assert torch.allclose(value_diffs(keys, pkeys, pgrads, eta), d)
    assert torch.allclose(sum_shift(pkeys, pgrads, eta), sum(shifts))


def test_manual_backward_matches_autograd_theorems_1_and_2():
    """∇_D = M U and dL/dλ = -tr(M S*ᵀ) with M = ∇W̃ (UUᵀ + λI)⁻¹, against autograd on the solve."""
    keys = rand(9, 6, seed=12)
    diffs = rand(9, 4, seed=13).requires_grad_(True)
    lam = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    probe = rand(4, 6, seed=14)  # L(S) = tr(probeᵀ S), so ∇W̃ = probe
    s = solve_spd(gram(keys, lam), keys.T @ diffs).T
    (s * probe).sum().backward()
    m, dlam = backprop_normal_equation(gram(keys, lam.detach()), probe, s.detach())
    assert torch.allclose(keys @ m.T, diffs.grad, rtol=1e-10, atol=1e-12)
    assert float(dlam) == pytest.approx(float(lam.grad), rel=1e-10)


def test_singular_system_falls_back_to_float64_least_squares():
    """reg=none with fewer keys than dimensions: U Uᵀ is singular; we warn and stay finite."""
    keys, diffs = rand(5, 12, seed=15, dtype=torch.float32), rand(5, 3, seed=16, dtype=torch.float32)
    stats = SolveStats()
    with pytest.warns(SolverFallbackWarning, match="least squares"):
        s = normal_equation_shift(keys, diffs, None, stats)
    assert stats.fallbacks == 1 and stats.calls == 1
    assert s.dtype == torch.float32 and torch.isfinite(s).all()
    # the minimum-norm least-squares solution still maps every key onto its value difference
    assert relative_residual(s.double(), keys.double(), diffs.double()) < 1e-4


def test_ill_conditioned_system_falls_back_too():
    a = torch.diag(torch.tensor([1.0, 1e-15], dtype=torch.float64))
    b = torch.ones(2, 1, dtype=torch.float64)
    with pytest.warns(SolverFallbackWarning, match="ill-conditioned"):
        x = solve_spd(a, b)
    assert torch.isfinite(x).all()


def test_well_conditioned_system_does_not_warn(recwarn):
    solve_spd(gram(rand(40, 8), 1.0), rand(8, 3))
    assert not [w for w in recwarn if issubclass(w.category, SolverFallbackWarning)]


@pytest.mark.parametrize("n, d", [(7, 20), (30, 12)])
def test_dual_and_primal_ridge_solves_agree_forward_and_backward(n, d):
    """The push-through form (n x n) gives the same S*, ∇D and dL/dλ as the d x d normal equation."""
    from editors.solvers import ridge_backward, ridge_shift

    g = torch.Generator().manual_seed(n)
    keys = torch.randn(n, d, generator=g, dtype=torch.float64)
    diffs = torch.randn(n, 5, generator=g, dtype=torch.float64)
    grad_w = torch.randn(5, d, generator=g, dtype=torch.float64)
    out = {}
    for form in ("primal", "dual"):
        shift, rs = ridge_shift(keys, diffs, 0.3, form=form)
        assert rs.dual == (form == "dual")
        out[form] = (shift, *ridge_backward(rs, grad_w, shift))
    for a, b in zip(out["primal"], out["dual"], strict=True):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-11)
    # and against autograd through the explicit primal solution
    lam = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    dd = diffs.clone().requires_grad_(True)
    s = torch.linalg.solve(keys.T @ keys + lam * torch.eye(d, dtype=torch.float64), keys.T @ dd).T
    gd, gl = torch.autograd.grad((s * grad_w).sum(), [dd, lam])
    assert torch.allclose(out["dual"][1], gd, rtol=1e-8) and torch.allclose(out["dual"][2], gl, rtol=1e-8)
    auto = ridge_shift(keys, diffs, 0.3)[1]
    assert auto.dual == (n < d)
