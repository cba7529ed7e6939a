"""The ``opteq`` family: the equilibrium is the minimiser of an explicit convex objective."""

from __future__ import annotations

import pytest
import torch
from model_fixtures import random_inputs, tiny_model

from models.operators import jacobian_spectral_norm


def dense_W(model) -> torch.Tensor:
    """The matrix of ``z ↦ W z`` on the flattened state, by applying it to the identity."""
    W = model.operator.linear()
    state = model.inject(random_inputs(model, 1)).shape[1:]
    n = state.numel()
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *state)
    return W(basis).reshape(n, n).T


@pytest.mark.parametrize("kind", ["conv", "mlp"])
def test_W_is_symmetric_with_norm_at_most_gamma(kind):
    model = tiny_model("opteq", kind, gamma=0.8)
    W = dense_W(model)
    torch.testing.assert_close(W, W.T, rtol=0, atol=1e-12)
    eigenvalues = torch.linalg.eigvalsh(W)
    assert eigenvalues.abs().max() <= 0.8 * (1 + 1e-6)  # up to the power iteration's precision
    assert eigenvalues.min() < 0 < eigenvalues.max()  # not merely PSD: the symmetric part of K
    x = random_inputs(model, 3)  # T is then a contraction, as the solvers and JFB need
    qx = model.inject(x)
    sigma = jacobian_spectral_norm(model.prepare_operator(), torch.rand_like(qx), qx)
    assert (sigma <= 0.8 + 1e-6).all()


@pytest.mark.parametrize("kind", ["conv", "mlp"])
def test_the_objective_decreases_along_the_iteration(kind):
    """Picard iterates from any feasible start decrease E by at least (1 − γ)/2 ‖Δ‖² per step."""
    gamma = 0.8
    model = tiny_model("opteq", kind, gamma=gamma)
    x = random_inputs(model, 4)
    qx, T = model.inject(x), model.prepare_operator()
    z = 2 * torch.rand(qx.shape, generator=torch.Generator().manual_seed(5), dtype=qx.dtype)
    energy = model.objective(z, qx)
    decreases = 0
    for _ in range(40):
        z_next = T(z, qx)
        energy_next = model.objective(z_next, qx)
        step = (z_next - z).flatten(1).pow(2).sum(1)
        assert (energy_next <= energy - (1 - gamma) / 2 * step + 1e-12).all()
        decreases += int((energy_next < energy).sum())
        z, energy = z_next, energy_next
    assert decreases > 0


@pytest.mark.parametrize("kind", ["conv", "mlp"])
def test_the_fixed_point_is_the_minimiser(kind):
    model = tiny_model("opteq", kind, gamma=0.8)
    x = random_inputs(model, 4)
    qx = model.inject(x)
    z_star = model.predict(x, tol=1e-13, max_iter=1000).z
    best = model.objective(z_star, qx)

    # KKT for min ½zᵀ(I − W)z − ⟨q, z⟩ s.t. z ≥ 0: the gradient vanishes on the support and is
    # non-negative where z = 0.
    W = model.operator.linear()
    grad = (z_star - W(z_star) - qx).flatten(1)
    support = z_star.flatten(1) > 0
    assert grad[support].abs().max() < 1e-9
    assert (grad[~support] > -1e-9).all()

    # An independent minimiser (projected gradient descent, a different step) finds it too.
    z = torch.zeros_like(qx)
    for _ in range(3000):
        z = (z - 0.5 * (z - W(z) - qx)).clamp_min(0)
    torch.testing.assert_close(z, z_star, rtol=0, atol=1e-8)

    # And no feasible point nearby or far away does better.
    g = torch.Generator().manual_seed(0)
    for scale in (1e-4, 1e-2, 1.0):
        noise = scale * torch.randn(z_star.shape, generator=g, dtype=z.dtype)
        other = (z_star + noise).clamp_min(0)
        assert (model.objective(other, qx) >= best - 1e-12).all()
    infeasible = z_star.clone()
    infeasible.view(4, -1)[:, 0] = -1.0
    assert torch.isinf(model.objective(infeasible, qx)).all()
