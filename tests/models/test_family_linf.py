"""The ``linf`` family: ℓ∞-contractive implicit networks with a certified ℓ∞ radius."""

from __future__ import annotations

import json

import pytest
import torch
from model_fixtures import (
    assert_checkpoint_round_trip,
    assert_gradient_matches_finite_differences,
    assert_unique_fixed_point,
    prototypes,
    random_inputs,
    tiny_model,
    train_on_prototypes,
)

from models import get_family
from models.linf import LinfClassifier, average_step_size, inf_norm, matrix_measure

TIGHT = {"tol": 1e-12, "max_iter": 5000}


@pytest.fixture(scope="module")
def robust_model() -> LinfClassifier:
    """A small linf model trained on prototypes with the Lipschitz regulariser (float64)."""
    model = tiny_model("linf", options={"lipschitz_weight": 0.02}, width=24, gamma=0.5)
    before, after, _ = train_on_prototypes(model, steps=120)
    assert after > 0.9, (before, after)
    return model.eval()


def test_the_parametrisation_keeps_the_matrix_measure_below_gamma():
    model = tiny_model("linf", width=32, gamma=0.6)
    g = torch.Generator().manual_seed(0)
    for scale in (0.01, 1.0, 100.0):
        with torch.no_grad():
            model.operator.p.copy_(scale * torch.randn(32, 32, generator=g, dtype=torch.float64))
        A = model.operator.matrix()
        mu = matrix_measure(A)
        rows = A.diagonal() + A.abs().sum(1) - A.diagonal().abs()
        torch.testing.assert_close(mu, rows.max())
        assert mu <= 0.6 + 1e-12
        assert (A.diagonal() < 1).all()


def test_the_average_iteration_contracts_in_linf_at_the_papers_rate():
    model = tiny_model("linf", width=32, gamma=0.6)
    with torch.no_grad():
        model.operator.p.mul_(40)  # strongly negative diagonal: α* well below 1
    A = model.operator.matrix().detach()
    alpha, mu = average_step_size(A), float(matrix_measure(A))
    assert 0 < alpha < 0.5
    assert alpha == pytest.approx(1 / (1 - float(A.diagonal().min())))
    rate = 1 - alpha * (1 - mu)
    x = random_inputs(model, 16)
    qx = model.inject(x)[:, :32]
    g = torch.Generator().manual_seed(1)

    def F(z):
        return (1 - alpha) * z + alpha * torch.relu(z @ A.T + qx)

    for _ in range(20):
        z1 = 3 * torch.randn(16, 32, generator=g, dtype=A.dtype)
        z2 = z1 + torch.randn(16, 32, generator=g, dtype=A.dtype) * torch.rand(1, generator=g)
        ratio = (F(z1) - F(z2)).abs().amax(1) / (z1 - z2).abs().amax(1)
        assert (ratio <= rate + 1e-12).all()
    # ... and the solver uses that step: picard's iterates are the average iteration's.
    out = model.predict(x, solver="picard", tol=1e-9, max_iter=3000, trace=True)
    assert out.stats.converged.all()


def test_the_fixed_point_does_not_depend_on_where_the_solve_starts():
    model = tiny_model("linf", width=24)
    x = random_inputs(model, 5)
    qx = model.inject(x)
    g = torch.Generator().manual_seed(3)
    skip = model.initial_state(x, qx)[:, 24:]
    starts = [
        torch.cat([10 * torch.rand(5, 24, generator=g, dtype=qx.dtype), skip], 1),
        torch.cat([-torch.ones(5, 24, dtype=qx.dtype), skip], 1),
    ]
    assert list(model.solvers()) == ["picard"]  # the average iteration, and nothing unsound
    assert_unique_fixed_point(model, x, starts, solver="picard")


@pytest.mark.parametrize("mode", ["ift", "jfb"])
def test_gradients_match_finite_differences(mode):
    """With the Lipschitz regulariser on and a non-zero output skip D, so every part is checked."""
    model = tiny_model("linf", width=16, options={"lipschitz_weight": 0.01})
    with torch.no_grad():
        model.injection.d.weight.normal_(0, 0.1)
    x = random_inputs(model, 5)
    assert_gradient_matches_finite_differences(model, x, torch.tensor([0, 1, 2, 0, 1]), mode)


def test_checkpoint_round_trip_records_the_bound_in_config_json(tmp_path, robust_model):
    assert_checkpoint_round_trip(robust_model, random_inputs(robust_model, 4), tmp_path / "linf")
    options = json.loads((tmp_path / "linf" / "config.json").read_text())["options"]
    bound = float(robust_model.lipschitz_bound().detach())
    assert options["lipschitz_bound_linf"] == pytest.approx(bound, rel=1e-6)
    assert options["matrix_measure_linf"] < 0.5 + 1e-9
    assert 0 < options["step_size_linf"] <= 1


def test_a_short_synthetic_run_learns_and_the_regulariser_shrinks_the_bound(robust_model):
    plain = tiny_model("linf", width=24, gamma=0.5)
    _, accuracy, _ = train_on_prototypes(plain, steps=120)
    assert accuracy > 0.9
    assert robust_model.lipschitz_bound() < 0.5 * plain.lipschitz_bound()
    assert get_family("linf").default_backprop == "jfb"


def jacobian(model: LinfClassifier, x: torch.Tensor) -> torch.Tensor:
    """Exact d logits / d x at the fixed point: (I − Δ A)⁻¹ Δ B through ReLU's pattern Δ.
    (B, classes, inputs)."""
    n = model.width
    out = model.predict(x, **TIGHT)
    A = model.operator.matrix()
    B, D, C = model.injection.b, model.injection.d.weight, model.head.c.weight
    u = ((x - model.input_mean) / model.input_std).flatten(1)
    active = ((out.z[:, :n] @ A.T + B(u)) > 0).to(x.dtype)  # (B, n)
    eye = torch.eye(n, dtype=x.dtype)
    rows = []
    for i in range(x.shape[0]):
        delta = torch.diag(active[i])
        dz = torch.linalg.solve(eye - delta @ A, delta @ B.weight)  # (n, inputs)
        rows.append((C @ dz + D) / model.input_std)
    return torch.stack(rows)


def test_empirical_lipschitz_estimates_never_exceed_the_bound(robust_model):
    model = robust_model
    bound = float(model.lipschitz_bound())
    x, _ = prototypes(64, model.config.input.shape, 3, seed=1)
    with torch.no_grad():
        J = jacobian(model, x)
        # gradient norms: the ℓ∞ → ℓ∞ norm of the Jacobian is its largest absolute row sum
        local = J.abs().sum(2).amax(1)
        assert (local <= bound).all(), (float(local.max()), bound)
        assert local.max() > 0.05 * bound  # the bound is not vacuous
        # the Jacobian is the derivative (central differences along a random direction)
        v = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=x.dtype)
        plus = model.predict(x + 1e-6 * v, **TIGHT).logits
        minus = model.predict(x - 1e-6 * v, **TIGHT).logits
        torch.testing.assert_close(
            (plus - minus) / 2e-6, torch.einsum("bki,bi->bk", J, v.flatten(1)), rtol=1e-4, atol=1e-6
        )
        # random pairs, near and far, and steepest-ascent (sign-of-gradient) pairs
        g = torch.Generator().manual_seed(1)
        y = model.predict(x, **TIGHT).logits
        for eps in (1e-3, 1e-1, 1.0):
            for signed in (False, True):
                d = torch.rand(x.shape, generator=g, dtype=x.dtype) * 2 - 1
                d = d.sign() if signed else d
                other = model.predict(x + eps * d, **TIGHT).logits
                ratio = (other - y).abs().amax(1) / (eps * d).flatten(1).abs().amax(1)
                assert (ratio <= bound * (1 + 1e-9)).all(), (float(ratio.max()), bound)
        for k in range(3):
            d = J[:, k].sign().reshape(x.shape)
            other = model.predict(x + 1e-3 * d, **TIGHT).logits
            ratio = (other - y).abs().amax(1) / 1e-3
            assert (ratio <= bound * (1 + 1e-9)).all()


def test_no_perturbation_inside_the_certified_radius_changes_a_label(robust_model):
    model = robust_model
    x, _ = prototypes(64, model.config.input.shape, 3, seed=1)
    out = model.predict(x, **TIGHT)
    radius = out.extras["certified_radius_linf"]
    assert radius.shape == (64,) and (radius >= 0).all()
    assert set(out.extras) == {"certified_radius_linf"}
    top = out.logits.topk(2, dim=1).values
    torch.testing.assert_close(radius, (top[:, 0] - top[:, 1]) / (2 * model.lipschitz_bound()))
    assert radius.median() > 1e-3, "the test needs non-trivial radii to mean anything"
    labels = out.logits.argmax(1)
    g = torch.Generator().manual_seed(2)
    for trial in range(30):
        d = torch.rand(x.shape, generator=g, dtype=x.dtype) * 2 - 1
        if trial % 2:
            d = d.sign()  # corners of the ℓ∞ ball
        if trial % 3 == 0 and trial:
            J = jacobian(model, x)  # towards the runner-up: the most damaging direction
            runner_up = out.logits.topk(2, dim=1).indices[:, 1]
            rows = torch.arange(64)
            d = (J[rows, runner_up] - J[rows, labels]).sign().reshape(x.shape)
        perturbed = x + 0.999 * radius.view(-1, *[1] * (x.ndim - 1)) * d
        assert torch.equal(model.predict(perturbed, **TIGHT).logits.argmax(1), labels)


def test_the_family_is_dense_and_takes_known_options():
    with pytest.raises(ValueError, match="arch kind 'mlp'"):
        tiny_model("linf", "conv")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['lipschitz'\]"):
        tiny_model("linf", options={"lipschitz": 1.0})
    model = tiny_model("linf", width=8)
    assert float(model.lipschitz_bound()) == pytest.approx(
        float(
            (inf_norm(model.head.c.weight) * inf_norm(model.injection.b.weight))
            / (1 - model.operator.measure())
            / model.input_std
        )
    )  # D starts at zero


# --- certified-margin training and the interval certificate -------------------------------------


def _robust_tiny(robust_loss: str, eps: float = 0.0) -> LinfClassifier:
    options = {"robust_loss": robust_loss, "robust_eps": eps, "robust_ramp": 0.0}
    model = tiny_model("linf", options=options, width=24, gamma=0.5)
    before, after, _ = train_on_prototypes(model, steps=150)
    assert after > 0.9, (robust_loss, before, after)
    return model.eval()


@pytest.fixture(scope="module")
def interval_model() -> LinfClassifier:
    """Trained with the interval (worst-case logits) loss at ε = 0.15."""
    return _robust_tiny("interval", eps=0.15)


def test_interval_bounds_hold_every_fixed_point_of_the_box(interval_model):
    """Lower bounds of y_i − y_j from the embedded solve are below the exact fixed point's
    differences at random points and corners of the (clipped) ε-box; at ε = 0 they are tight."""
    model, eps = interval_model, 0.08
    x, _ = prototypes(32, model.config.input.shape, 3, seed=1)
    with torch.no_grad():
        out = model.predict(x, **TIGHT)
        lower = model._margin_lower(x, out, eps, "interval", differentiable=False)
        g = torch.Generator().manual_seed(4)
        for trial in range(40):
            d = torch.rand(x.shape, generator=g, dtype=x.dtype) * 2 - 1
            d = d.sign() if trial % 2 else d
            y = model.predict((x + eps * d).clamp(0, 1), **TIGHT).logits
            diff = y[:, :, None] - y[:, None, :]
            assert (diff >= lower - 1e-9).all(), float((lower - diff).max())
        exact = out.logits[:, :, None] - out.logits[:, None, :]
        at_zero = model._margin_lower(x, out, 0.0, "interval", differentiable=False)
        torch.testing.assert_close(at_zero, exact, atol=1e-6, rtol=0)


def test_the_interval_certificate_is_at_least_as_strong_as_the_lipschitz_one(interval_model):
    model = interval_model
    x, labels = prototypes(128, model.config.input.shape, 3, seed=1)
    for eps in (0.005, 0.02, 0.05):
        verdict = model.certify(x, labels, eps)
        assert set(verdict) == set(model.certificates) == {"lipschitz", "interval"}
        assert not (verdict["lipschitz"] & ~verdict["interval"]).any(), eps
    assert model.certify(x, labels, 0.05)["interval"].double().mean() > 0.5


def test_certified_margin_training_certifies_more_than_plain_training(interval_model):
    x, labels = prototypes(256, interval_model.config.input.shape, 3, seed=1)
    plain = _robust_tiny("none")
    lipschitz = _robust_tiny("lipschitz", eps=0.05)

    def certified(model, eps, method):
        return float(model.certify(x, labels, eps)[method].double().mean())

    # (measured: interval 0.75 vs 0.16 at 0.15; Lipschitz 0.91 vs 0.02 at 0.05)
    assert certified(interval_model, 0.15, "interval") > certified(plain, 0.15, "interval") + 0.3
    assert certified(lipschitz, 0.05, "lipschitz") > certified(plain, 0.05, "lipschitz") + 0.5


def test_the_robust_loss_ramps_and_rejects_nonsense():
    model = tiny_model(
        "linf", options={"robust_loss": "interval", "robust_eps": 0.1, "robust_ramp": 0.5}
    )
    model.set_training_progress(0.0)
    assert model._robust_schedule() == (0.0, 0.0)
    model.set_training_progress(0.25)
    assert model._robust_schedule() == pytest.approx((0.05, 0.25))
    model.set_training_progress(0.9)
    assert model._robust_schedule() == pytest.approx((0.1, 0.5))
    model.train()
    x, y = random_inputs(model, 6), torch.tensor([0, 1, 2, 0, 1, 2])
    out = model(x)
    assert out.extras["margin_lower"].shape == (6, 3, 3)
    model.training_loss(out, y).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with pytest.raises(ValueError, match="unknown robust_loss 'ibp'"):
        tiny_model("linf", options={"robust_loss": "ibp"})
    with pytest.raises(ValueError, match="robust_weight"):
        tiny_model("linf", options={"robust_weight": 2.0})


def test_families_without_a_bound_refuse_to_certify():
    model = tiny_model("fpn")
    assert model.certificates == ()
    with pytest.raises(ValueError, match="no certified bound"):
        model.certify(random_inputs(model, 2), torch.tensor([0, 1]), 0.1)
