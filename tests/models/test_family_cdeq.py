"""The ``cdeq`` family: the fixed point as the steady state of ``dz/dt = T(z) − z``."""

from __future__ import annotations

import pytest
import torch
from model_fixtures import (
    assert_checkpoint_round_trip,
    assert_unique_fixed_point,
    random_inputs,
    tiny_model,
)

from models import get_family
from models.cdeq import ODE_METHODS, TABLEAUS, _rk_step, ode_solve
from models.solvers import anderson_solve

torchdiffeq = pytest.importorskip("torchdiffeq")


@pytest.mark.parametrize("method", ODE_METHODS)
def test_the_tableaux_are_torchdiffeqs(method):
    from torchdiffeq._impl.odeint import SOLVERS  # the reference's internals: test-only

    reference = SOLVERS[method].tableau
    ours = TABLEAUS[method]
    torch.testing.assert_close(reference.alpha, torch.tensor(ours.alpha, dtype=torch.float64))
    for a, b in zip(reference.beta, ours.beta, strict=True):
        torch.testing.assert_close(a, torch.tensor(b, dtype=torch.float64))
    torch.testing.assert_close(reference.c_sol, torch.tensor(ours.c_sol, dtype=torch.float64))
    torch.testing.assert_close(reference.c_error, torch.tensor(ours.c_error, dtype=torch.float64))


@pytest.mark.parametrize("method", ODE_METHODS)
def test_one_step_matches_torchdiffeq(method):
    """Per-sample step sizes: row i advanced by h_i is torchdiffeq's single step of size h_i."""
    model = tiny_model("cdeq", "mlp")
    x = random_inputs(model, 3)
    qx, T = model.inject(x), model.prepare_operator()
    z = torch.rand(qx.shape, generator=torch.Generator().manual_seed(2), dtype=qx.dtype)
    h = torch.tensor([0.3, 0.9, 1.7], dtype=qx.dtype)
    with torch.no_grad():
        ours, f_ours, _ = _rk_step(T, TABLEAUS[method], z, T(z, qx), h[:, None], (qx,))
        for i in range(3):

            def field(t, y, i=i):
                return T(y, qx[i : i + 1]) - y

            t = torch.tensor([0.0, float(h[i])], dtype=qx.dtype)
            reference = torchdiffeq.odeint(
                field, z[i : i + 1], t, method=method, rtol=1e9, atol=1e9,
                options={"first_step": float(h[i])},
            )[-1]  # fmt: skip
            torch.testing.assert_close(ours[i : i + 1], reference, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(f_ours[i : i + 1], T(reference, qx[i : i + 1]))


@pytest.mark.parametrize("kind", ["conv", "mlp"])
def test_the_steady_state_does_not_depend_on_the_start_and_is_the_fixed_point(kind):
    model = tiny_model("cdeq", kind)
    x = random_inputs(model, 4)
    qx = model.inject(x)
    g = torch.Generator().manual_seed(3)
    starts = [3 * torch.rand(qx.shape, generator=g, dtype=qx.dtype), -torch.ones_like(qx)]
    z = assert_unique_fixed_point(model, x, starts, solver="bosh3", tol=1e-10, atol=1e-7)
    for method in ODE_METHODS:
        z_method, _ = model.solve_fixed_point(
            model.prepare_operator(), torch.zeros_like(qx), qx, tol=1e-10, max_iter=3000,
            solver=method,
        )  # fmt: skip
        torch.testing.assert_close(z_method, z, rtol=0, atol=1e-7)
    # ... and it is the discrete solvers' fixed point.
    z_anderson, stats = anderson_solve(
        model.prepare_operator(), torch.zeros_like(qx), context=(qx,), tol=1e-12, max_iter=500
    )
    assert stats.converged.all()
    torch.testing.assert_close(z, z_anderson, rtol=0, atol=1e-7)


def test_iterations_count_evaluations_of_T():
    model = tiny_model("cdeq", "mlp")
    x = random_inputs(model, 1)
    qx, T = model.inject(x), model.prepare_operator()
    calls = []

    def counted(z, q):
        calls.append(z.shape[0])
        return T(z, q)

    for method in ODE_METHODS:
        calls.clear()
        _, stats = ode_solve(counted, torch.zeros_like(qx), context=(qx,), tol=1e-8, method=method)
        assert stats.converged.all()
        assert stats.iterations.item() == len(calls) > TABLEAUS[method].evaluations


def test_each_sample_stops_at_its_own_tolerance_and_the_batch_shrinks():
    model = tiny_model("cdeq", "mlp", gamma=0.9)
    x = random_inputs(model, 1).expand(3, -1)
    qx, T = model.inject(x), model.prepare_operator()
    rows = []

    def counted(z, q):
        rows.append(z.shape[0])
        return T(z, q)

    tol = torch.tensor([1e-2, 1e-5, 1e-9])
    _, stats = ode_solve(counted, torch.zeros_like(qx), context=(qx,), tol=tol, max_iter=1000)
    assert stats.converged.all()
    assert (stats.residual <= tol.double()).all()
    assert stats.iterations[0] < stats.iterations[1] < stats.iterations[2]
    assert rows[0] == 3 and rows[-1] == 1  # converged samples left the batch


@pytest.mark.parametrize("max_iter", [1, 2, 5, 17, 40])
def test_iterations_never_exceed_max_iter(max_iter):
    model = tiny_model("cdeq", "mlp", gamma=0.9)
    x = random_inputs(model, 4)
    out = model.predict(x, tol=1e-14, max_iter=max_iter)
    assert (out.stats.iterations <= max_iter).all()
    assert not out.stats.converged.any()
    assert torch.isfinite(out.z).all()


def test_a_non_finite_sample_stops_alone():
    model = tiny_model("cdeq", "mlp")
    x = random_inputs(model, 3)
    qx, T = model.inject(x), model.prepare_operator()

    def poisoned(z, q):  # row with q[:, 0] == 123 blows up
        out = T(z, q)
        return torch.where((q[:, :1] == 123.0), torch.full_like(out, float("inf")), out)

    q_bad = qx.clone()
    q_bad[1, 0] = 123.0
    z, stats = ode_solve(poisoned, torch.zeros_like(qx), context=(q_bad,), tol=1e-9)
    assert stats.converged.tolist() == [True, False, True]
    assert stats.iterations[1] == 1
    assert torch.isfinite(z).all()
    alone, _ = ode_solve(T, torch.zeros_like(qx[:1]), context=(qx[:1],), tol=1e-9)
    torch.testing.assert_close(z[:1], alone, rtol=1e-12, atol=1e-14)  # BLAS: batch-size ulps


def test_checkpoint_round_trip(tmp_path):
    model = tiny_model("cdeq", "conv", options={"ode_method": "dopri5"})
    assert_checkpoint_round_trip(model, random_inputs(model, 4), tmp_path / "cdeq")


def test_solver_names_pick_the_integrator():
    model = tiny_model("cdeq", "mlp", options={"ode_method": "dopri5"})
    x = random_inputs(model, 2)
    assert sorted(model.solvers()) == ["bosh3", "dopri5"]  # what it really runs, and nothing else
    default = model.predict(x, tol=1e-6)  # the configured ode_method
    torch.testing.assert_close(default.logits, model.predict(x, tol=1e-6, solver="dopri5").logits)
    with pytest.raises(ValueError, match=r"unknown solver 'anderson'.*\['bosh3', 'dopri5'\]"):
        model.predict(x, solver="anderson")
    other = model.predict(x, tol=1e-6, solver="bosh3")
    assert not torch.equal(default.stats.iterations, other.stats.iterations)
    with pytest.raises(ValueError, match="unknown solver 'rk4'"):
        model.predict(x, solver="rk4")
    with pytest.raises(ValueError, match="unknown ode_method"):
        tiny_model("cdeq", "mlp", options={"ode_method": "euler"})
    assert get_family("cdeq").default_backprop == "jfb"
