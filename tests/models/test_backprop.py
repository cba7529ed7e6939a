"""Backward modes through the fixed point: each one's gradient is the one its definition gives.

The MLP model is ``T(z) = relu(Qx + γ·W z / ‖W u‖)``, ``Qx = W_q x̃ + b_q``, logits ``H z + c``.
Exact comparisons run in float64 and in eval mode (the spectral estimate ``u`` stays fixed, so
the loss is a deterministic function of the parameters).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from models import FAMILIES, SOLVERS, BackpropConfig, SolverConfig, cross_entropy
from models.backprop import BACKPROP_MODES, differentiable_fixed_point

KINDS = ("conv", "mlp")
GAMMA = 0.6
TIGHT = {"tol": 1e-13, "max_iter": 3000}


@pytest.fixture
def mlp(make_model):
    """A float64 MLP FPN (eval mode), tight adjoint solves, its inputs and targets."""
    model = make_model(
        "fpn",
        "mlp",
        gamma=GAMMA,
        width=6,
        input_shape=(5,),
        backprop=BackpropConfig(tol=1e-12, max_iter=3000),
    )
    generator = torch.Generator().manual_seed(3)
    x = torch.rand(4, 5, generator=generator, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1])
    return model, x, y


def _grads(model, x, y, mode: str, **knobs) -> list[torch.Tensor]:
    out = model(x, backprop=mode, **(knobs or TIGHT))
    params = list(model.parameters())
    return list(torch.autograd.grad(cross_entropy(out, y), params))


def _relative_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = sum(((p - q) ** 2).sum() for p, q in zip(a, b, strict=True)) ** 0.5
    den = sum((q**2).sum() for q in b) ** 0.5
    return (num / den).item()


def _normalized_weight(model):
    """The operator's matrix γ·W / ‖W u‖, rebuilt from the parameters by hand."""
    w = model.operator.w
    return model.config.arch.gamma * w.weight / (w.weight @ w.u.flatten()).norm()


def _hand_injection(model, x):
    x_tilde = ((x - model.input_mean) / model.input_std).flatten(1)
    linear = model.injection[1]
    return x_tilde, x_tilde @ linear.weight.T + linear.bias


# --- every mode works for every family -------------------------------------------------------


@pytest.mark.parametrize("mode", BACKPROP_MODES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_mode_gives_a_finite_gradient_to_every_parameter(
    make_model, make_inputs, family, kind, mode
):
    model = make_model(family, kind, dtype=torch.float32, train=True)
    x, y = make_inputs(model, 4), torch.tensor([0, 1, 2, 0])
    out = model(x, backprop=mode, tol=1e-4, max_iter=30)
    cross_entropy(out, y).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} received no gradient under {mode}"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient under {mode}"
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


def test_unknown_backprop_mode_lists_the_available_ones(mlp):
    model, x, _ = mlp
    T = model.prepare_operator()
    qx = model.inject(x)
    with pytest.raises(ValueError, match=r"unknown backprop mode 'adjoint'; available: \["):
        differentiable_fixed_point(
            "adjoint", T, qx, qx, backprop=model.config.backprop, solver=model.config.solver
        )


def test_modes_change_the_gradient_not_the_forward_value(mlp):
    model, x, _ = mlp
    logits = {mode: model(x, backprop=mode, **TIGHT).logits.detach() for mode in BACKPROP_MODES}
    for mode in ("ift", "neumann"):
        assert torch.equal(logits[mode], logits["jfb"])
    torch.testing.assert_close(logits["unrolled"], logits["jfb"], rtol=1e-10, atol=1e-12)


# --- JFB ---------------------------------------------------------------------------------------


def test_jfb_gradient_equals_the_hand_derived_one(mlp):
    model, x, y = mlp
    with torch.no_grad():
        x_tilde, qx = _hand_injection(model, x)
        Wn = _normalized_weight(model)
        z_star = torch.zeros_like(qx)
        for _ in range(500):  # rate ≤ 0.6: float64 precision long before 500 steps
            z_star = F.relu(qx + z_star @ Wn.T)
        # JFB: z = T(z*) with z* a constant, so dℓ/dθ = (∂T/∂θ)ᵀ ∂ℓ/∂z.
        pre = qx + z_star @ Wn.T  # (B, D)
        z = F.relu(pre)
        H = model.head.weight
        logits = z @ H.T + model.head.bias
        delta = (logits.softmax(1) - F.one_hot(y, 3)) / len(y)  # ∂ℓ/∂logits for mean CE, (B, K)
        h = (delta @ H) * (pre > 0)  # ∂ℓ/∂pre, (B, D)
        d_Wn = h.T @ z_star  # ∂ℓ/∂(γW/σ)
        W, u = model.operator.w.weight, model.operator.w.u.flatten()
        sigma = (W @ u).norm()
        d_W = GAMMA / sigma * d_Wn - GAMMA * (d_Wn * W).sum() / sigma**3 * torch.outer(W @ u, u)
        expected = {
            "head.weight": delta.T @ z,
            "head.bias": delta.sum(0),
            "injection.1.weight": h.T @ x_tilde,
            "injection.1.bias": h.sum(0),
            "operator.w.weight": d_W,
        }
    names = [name for name, _ in model.named_parameters()]
    assert sorted(names) == sorted(expected)
    for name, grad in zip(names, _grads(model, x, y, "jfb"), strict=True):
        torch.testing.assert_close(grad, expected[name], rtol=1e-9, atol=1e-13, msg=name)


def test_jfb_is_not_the_implicit_gradient(mlp):
    # Guards the comparison above: with J ≠ 0 the two must differ, or the test could not fail.
    model, x, y = mlp
    assert _relative_error(_grads(model, x, y, "jfb"), _grads(model, x, y, "ift")) > 1e-2


# --- IFT -----------------------------------------------------------------------------------------


def _loss_at(model, x, y, vector: torch.Tensor) -> float:
    saved = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(saved + vector, model.parameters())
        loss = F.cross_entropy(model.predict(x, **TIGHT).logits, y).item()
        torch.nn.utils.vector_to_parameters(saved, model.parameters())
    return loss


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_ift_gradient_matches_finite_differences(mlp, solver):
    model, x, y = mlp
    model.config = model.config.replace(solver=SolverConfig(method=solver))
    grad = torch.cat([g.flatten() for g in _grads(model, x, y, "ift")])
    generator = torch.Generator().manual_seed(7)
    h = 1e-6
    for _ in range(3):
        direction = torch.randn(grad.shape, generator=generator, dtype=torch.float64)
        direction /= direction.norm()
        numeric = (_loss_at(model, x, y, h * direction) - _loss_at(model, x, y, -h * direction)) / (
            2 * h
        )
        analytic = (grad @ direction).item()
        assert analytic == pytest.approx(numeric, rel=1e-3, abs=1e-7)


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_ift_gradient_matches_unrolling_to_convergence(mlp, solver):
    model, x, y = mlp
    model.config = model.config.replace(solver=SolverConfig(method=solver))
    out = model(x, backprop="unrolled", **TIGHT)
    assert out.stats.converged.all()
    assert _relative_error(_grads(model, x, y, "ift"), _grads(model, x, y, "unrolled")) <= 1e-3


# --- Neumann ------------------------------------------------------------------------------------


def test_neumann_approaches_ift_as_terms_grow(mlp):
    model, x, y = mlp
    ift = _grads(model, x, y, "ift")
    errors = []
    for terms in (1, 2, 5, 20, 80):
        model.config = model.config.replace(backprop=BackpropConfig(neumann_terms=terms))
        errors.append(_relative_error(_grads(model, x, y, "neumann"), ift))
    assert all(a > b for a, b in itertools.pairwise(errors[:-1])), errors
    assert errors[-1] <= 1e-9, errors


def test_neumann_with_one_term_is_jfb(mlp):
    model, x, y = mlp
    model.config = model.config.replace(backprop=BackpropConfig(neumann_terms=1))
    for a, b in zip(_grads(model, x, y, "neumann"), _grads(model, x, y, "jfb"), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


# --- unrolled ------------------------------------------------------------------------------------


def test_unrolled_gradient_equals_autograd_through_explicit_picard_steps(mlp):
    model, x, y = mlp
    tol = 1e-4
    out = model(x, backprop="unrolled", tol=tol, max_iter=100)
    steps = int(out.stats.iterations[0])
    assert (out.stats.iterations == steps).all() and steps > 2
    model_grads = torch.autograd.grad(cross_entropy(out, y), list(model.parameters()))

    _, qx = _hand_injection(model, x)
    Wn = _normalized_weight(model)
    z = torch.zeros_like(qx)
    residuals = []
    for _ in range(steps):
        z_next = F.relu(qx + z @ Wn.T)
        residuals.append(((z_next - z).norm(dim=1) / z_next.norm(dim=1)).max().item())
        z = z_next
    # It stopped at the first step where every sample met tol.
    assert residuals[-1] <= tol < residuals[-2]
    logits = z @ model.head.weight.T + model.head.bias
    hand_grads = torch.autograd.grad(F.cross_entropy(logits, y), list(model.parameters()))
    for a, b in zip(model_grads, hand_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
