"""Contractive operators: ``Lip_z(T) ≤ γ < 1``, with spectral norms of the real linear maps."""

from __future__ import annotations

import pytest
import torch
from torch.autograd.functional import jacobian

from models.operators import SpectralNormalizedMap, jacobian_spectral_norm

KINDS = ("conv", "mlp")
GAMMA = 0.9

# torch.func.jvp (in jacobian_spectral_norm) trips torch's own jit.script deprecation, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")


def _dense_norm(linear_map, shape: tuple[int, ...]) -> float:
    """Largest singular value of the matrix of ``linear_map`` on one sample of ``shape``."""
    n = torch.Size(shape).numel()

    def flat(v):
        return linear_map(v.view(1, *shape)).flatten()

    matrix = jacobian(flat, torch.zeros(n, dtype=torch.float64))  # (n_out, n)
    return torch.linalg.matrix_norm(matrix, ord=2).item()


def _dense_jacobian_norms(T, z, qx) -> torch.Tensor:
    """Per sample: ‖∂T/∂z‖₂ from the dense Jacobian (B,)."""
    norms = []
    for z_i, qx_i in zip(z, qx, strict=True):

        def flat(v, qx_i=qx_i, shape=z_i.shape):
            return T(v.view(1, *shape), qx_i[None]).flatten()

        matrix = jacobian(flat, z_i.flatten())
        norms.append(torch.linalg.matrix_norm(matrix, ord=2))
    return torch.stack(norms)


def _states(model, x, which: str):
    qx = model.inject(x)
    T = model.prepare_operator()
    z = torch.randn_like(qx) if which == "random" else model.predict(x, tol=1e-10, max_iter=500).z
    return T, z, qx


@pytest.mark.parametrize("spatial", [(4, 4), (5, 7)])
def test_conv_spectral_norm_is_the_norm_of_the_convolution_operator(spatial):
    channels = 3
    shape = (channels, *spatial)
    weight = torch.randn(channels, channels, 3, 3, dtype=torch.float64)
    conv = SpectralNormalizedMap(weight, shape, padding=1).double()
    conv.tighten()
    dense = _dense_norm(lambda v: conv.apply_map(v, conv.weight), shape)
    assert conv.sigma().item() == pytest.approx(dense, rel=1e-8)
    normalized = conv.normalized_weight()
    assert _dense_norm(lambda v: conv.apply_map(v, normalized), shape) == pytest.approx(
        1.0, rel=1e-8
    )
    # The reshaped kernel matrix is a different number: the check above would notice a switch to it.
    kernel_norm = torch.linalg.matrix_norm(weight.reshape(channels, -1), ord=2).item()
    assert abs(kernel_norm - dense) > 1e-2 * dense


def test_the_adjoint_is_the_transpose_of_the_map():
    shape = (2, 5, 5)
    conv = SpectralNormalizedMap(torch.randn(2, 2, 3, 3, dtype=torch.float64), shape, padding=1)
    x, y = torch.randn(1, *shape, dtype=torch.float64), torch.randn(1, *shape, dtype=torch.float64)
    lhs = (conv.apply_map(x, conv.weight) * y).sum()
    rhs = (x * conv.apply_adjoint(y, conv.weight)).sum()
    assert lhs.item() == pytest.approx(rhs.item(), rel=1e-12)


def test_dense_spectral_norm_is_the_largest_singular_value():
    weight = torch.randn(7, 7, dtype=torch.float64)
    dense = SpectralNormalizedMap(weight, (7,)).double()
    dense.tighten()
    assert dense.sigma().item() == pytest.approx(torch.linalg.svdvals(weight)[0].item(), rel=1e-8)


@pytest.mark.parametrize("which", ["random", "solved"])
@pytest.mark.parametrize("kind", KINDS)
def test_T_is_gamma_lipschitz_at_random_and_solved_states(make_model, make_inputs, kind, which):
    model = make_model("fpn", kind, gamma=GAMMA)
    T, z, qx = _states(model, make_inputs(model, 4), which)
    sigma = jacobian_spectral_norm(T, z, qx, steps=200)
    assert sigma.shape == (4,)
    assert (sigma <= GAMMA + 1e-3).all() and (sigma < 1).all(), sigma
    # The power iteration measures what the dense Jacobian says.
    torch.testing.assert_close(sigma, _dense_jacobian_norms(T, z, qx), rtol=1e-4, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_the_bound_is_attained_where_every_relu_is_active(make_model, make_inputs, kind):
    # With Qx ≫ 0 the outer relu is the identity. mlp: ∂T/∂z = γ W / ‖W‖₂, of norm exactly γ.
    # conv: with kernels 3·identity (normalised to the identity) and z ≥ 0 the inner relu is the
    # identity too, and ∂T/∂z = γ I. Any slack in the normalisation would show here.
    model = make_model("fpn", kind, gamma=GAMMA)
    if kind == "conv":
        for m in model.contraction_maps():
            identity = torch.zeros_like(m.weight)
            identity[:, :, 1, 1] = 3 * torch.eye(m.weight.shape[0])
            m.weight.data.copy_(identity)
        model.tighten_lipschitz()
    qx = model.inject(make_inputs(model, 3)) + 100.0
    T = model.prepare_operator()
    sigma = jacobian_spectral_norm(T, torch.rand_like(qx), qx, steps=300)
    torch.testing.assert_close(sigma, torch.full_like(sigma, GAMMA), rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_T_contracts_distances_by_gamma(make_model, make_inputs, kind):
    model = make_model("fpn", kind, gamma=GAMMA)
    qx = model.inject(make_inputs(model, 16))
    T = model.prepare_operator()
    z1, z2 = torch.randn_like(qx), torch.randn_like(qx)
    before = (z1 - z2).flatten(1).norm(dim=1)
    after = (T(z1, qx) - T(z2, qx)).flatten(1).norm(dim=1)
    assert (after <= GAMMA * before * (1 + 1e-6)).all()


@pytest.mark.parametrize("kind", KINDS)
def test_eval_mode_never_moves_the_spectral_estimate(make_model, kind):
    model = make_model("fpn", kind)
    before = [m.u.clone() for m in model.contraction_maps()]
    model.prepare_operator()
    model.prepare_operator()
    assert all(torch.equal(m.u, u) for m, u in zip(model.contraction_maps(), before, strict=True))


@pytest.mark.parametrize("kind", KINDS)
def test_training_runs_one_power_iteration_step_per_pass(make_model, kind):
    model = make_model("fpn", kind, train=True)
    maps = model.contraction_maps()
    for m in maps:  # start from a random vector, so a step visibly moves it
        m.u.copy_(torch.randn_like(m.u) / m.u.numel() ** 0.5)
    before = [m.u.clone() for m in maps]
    expected = []
    for m, u in zip(maps, before, strict=True):
        v = m.apply_adjoint(m.apply_map(u, m.weight), m.weight)
        expected.append(v / v.norm())
    model.prepare_operator()
    for m, u_next in zip(maps, expected, strict=True):
        torch.testing.assert_close(m.u, u_next)


def test_preparing_the_operator_twice_in_one_training_pass_keeps_the_graph_valid():
    """Power iteration updates ``u`` in place; an earlier ``T`` of the same pass must still
    back-propagate (Skip Reg. prepares ``T`` for its start and for the solve)."""
    from models import ModelConfig, create_model

    model = create_model(ModelConfig()).train()
    first, second = model.prepare_operator(), model.prepare_operator()
    qx = model.inject(torch.rand(2, 1, 28, 28))
    z0 = torch.zeros_like(qx)
    (first(z0, qx).sum() + second(z0, qx).sum()).backward()
    assert all(p.grad is not None for p in model.operator.parameters())
