"""Solver semantics (SPEC §5): known answers, per-sample stopping, failures that stay per-sample."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

from models import SOLVERS, get_solver, load_checkpoint
from models.solvers import relative_residual

REPO_ROOT = Path(__file__).resolve().parents[2]
BUNDLED = REPO_ROOT / "checkpoints" / "mnist-fpn"

# (solver, options): every solver, with several of its knobs.
SETTINGS = [
    ("picard", {}),
    ("picard", {"damping": 0.5}),
    ("picard", {"damping": 0.8}),
    ("anderson", {}),
    ("anderson", {"memory": 1}),
    ("anderson", {"memory": 2, "mixing": 0.5}),
    ("anderson", {"memory": 8, "regularization": 1e-2}),
    ("anderson", {"regularization": 0.0}),
]
TOLS = [1e-3, 1e-6, 1e-10]


def _id(setting: tuple[str, dict]) -> str:
    name, options = setting
    return "-".join([name, *(f"{k}={v}" for k, v in options.items())])


def test_registry_holds_picard_and_anderson():
    assert set(SOLVERS) == {"picard", "anderson"}
    for name, solve in SOLVERS.items():
        assert get_solver(name) is solve


def test_unknown_solver_name_lists_the_available_ones():
    with pytest.raises(
        ValueError, match=r"unknown solver 'newton'; available: \['anderson', 'picard'\]"
    ):
        get_solver("newton")


@pytest.mark.parametrize("tol", TOLS)
@pytest.mark.parametrize("setting", SETTINGS, ids=_id)
def test_finds_the_closed_form_fixed_point_of_a_linear_contraction(contraction, setting, tol):
    name, options = setting
    z, stats = get_solver(name)(
        contraction, contraction.z0, context=contraction.context, tol=tol, max_iter=3000, **options
    )
    assert z.shape == contraction.b.shape
    assert stats.iterations.shape == stats.residual.shape == stats.converged.shape == (4,)
    assert stats.iterations.dtype == torch.int64 and stats.converged.dtype == torch.bool
    assert stats.converged.all() and (stats.residual <= tol).all()
    # Rate L contraction: ‖f(z) − z*‖ ≤ L/(1 − L) · ‖f(z) − z‖ = L/(1 − L) · residual · ‖f(z)‖.
    rate = contraction.rate.squeeze(1)
    error = (z - contraction.solution()).norm(dim=1)
    bound = rate / (1 - rate) * stats.residual * z.norm(dim=1)
    assert (error <= bound * (1 + 1e-6) + 1e-13).all(), (error, bound)


@pytest.mark.parametrize("tol", [1e-4, 1e-5])
@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_solves_in_float32(make_contraction, name, tol):
    c = make_contraction(rates=(0.5, 0.8))
    b, rate = c.b.float(), c.rate.float()
    A = c.A.float()
    z, stats = get_solver(name)(
        lambda z, b, r: r * (z @ A.T) + b,
        torch.zeros_like(b),
        context=(b, rate),
        tol=tol,
        max_iter=500,
    )
    assert z.dtype == stats.residual.dtype == torch.float32
    assert stats.converged.all()
    rate = c.rate.squeeze(1)
    error = (z.double() - c.solution()).norm(dim=1)
    bound = (rate / (1 - rate) * stats.residual.double() + 1e-6) * z.double().norm(dim=1)
    assert (error <= bound).all(), (error, bound)


@pytest.mark.parametrize("setting", SETTINGS, ids=_id)
def test_half_cos_reaches_its_known_fixed_point(half_cos, setting):
    f, fixed_point = half_cos
    name, options = setting
    z, stats = get_solver(name)(
        f, torch.zeros(3, 1, dtype=torch.float64), tol=1e-12, max_iter=500, **options
    )
    assert stats.converged.all()
    torch.testing.assert_close(z, torch.full_like(z, fixed_point), rtol=0, atol=1e-11)


@pytest.mark.parametrize("damping", [1.0, 0.5])
def test_damped_picard_is_the_krasnoselskii_mann_iteration(contraction, damping):
    f, context = contraction, contraction.context
    z = contraction.z0 + 0.1
    expected = z
    for _ in range(2):
        expected = (1 - damping) * expected + damping * f(expected, *context)
    expected = f(expected, *context)  # the returned state is the last f(z)
    out, stats = get_solver("picard")(f, z, context=context, tol=0.0, max_iter=3, damping=damping)
    assert stats.iterations.tolist() == [3] * 4
    torch.testing.assert_close(out, expected, rtol=1e-14, atol=0)


@pytest.mark.parametrize("mixing", [1.0, 0.5])
def test_an_anderson_step_is_the_textbook_extrapolation(contraction, mixing):
    f, context = contraction, contraction.context
    x0 = contraction.z0 + 0.1
    x1 = f(x0, *context)  # the first step is plain Picard
    g0, g1 = x1 - x0, f(x1, *context) - x1
    # min ‖α₀ g₀ + α₁ g₁‖ subject to α₀ + α₁ = 1 (λ = 0), per sample.
    a1 = ((g0 * (g0 - g1)).sum(1) / ((g0 - g1) ** 2).sum(1))[:, None]
    a0 = 1 - a1
    x2 = a0 * x0 + a1 * x1 + mixing * (a0 * g0 + a1 * g1)
    out, stats = get_solver("anderson")(
        f, x0, context=context, tol=0.0, max_iter=3, memory=2, mixing=mixing, regularization=0.0
    )
    assert stats.iterations.tolist() == [3] * 4
    torch.testing.assert_close(out, f(x2, *context), rtol=1e-10, atol=1e-12)


def _anderson_by_the_book(f, x, context, *, steps, memory, mixing, regularization):
    """Anderson recomputing every residual and the whole Gram matrix at each step (float64)."""
    xs, fxs = [], []
    for _ in range(steps - 1):
        xs, fxs = [*xs, x][-memory:], [*fxs, f(x, *context)][-memory:]
        if len(xs) == 1:
            x = fxs[0]
            continue
        G = torch.stack([fx - xi for fx, xi in zip(fxs, xs, strict=True)], 1)  # (B, m, n)
        gram = G @ G.transpose(1, 2)
        scale = gram.diagonal(dim1=1, dim2=2).amin(1)
        gram = gram + regularization * scale[:, None, None] * torch.eye(len(xs), dtype=x.dtype)
        w = torch.linalg.solve(gram, torch.ones(gram.shape[0], len(xs), 1, dtype=x.dtype))
        alpha = w / w.sum(1, keepdim=True)  # (B, m, 1)
        mixed_x = (alpha * torch.stack(xs, 1)).sum(1)
        mixed_f = (alpha * torch.stack(fxs, 1)).sum(1)
        x = (1 - mixing) * mixed_x + mixing * mixed_f
    return f(x, *context)


@pytest.mark.parametrize("memory, mixing", [(3, 1.0), (3, 0.6), (5, 1.0)])
def test_anderson_history_wraps_around_like_the_textbook_method(contraction, memory, mixing):
    # Eleven steps: the ring buffers and the incrementally updated Gram matrix wrap around
    # several times; the result must be the method recomputed from scratch at every step.
    f, context, x0 = contraction, contraction.context, contraction.z0 + 0.1
    options = dict(memory=memory, mixing=mixing, regularization=1e-4)
    out, stats = get_solver("anderson")(f, x0, context=context, tol=0.0, max_iter=11, **options)
    expected = _anderson_by_the_book(f, x0, context, steps=11, **options)
    assert stats.iterations.tolist() == [11] * 4
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_mixed_tolerances_give_each_sample_its_own_depth(make_contraction, name):
    c = make_contraction(rates=(0.9,) * 4)
    tol = torch.tensor([1e-2, 1e-4, 1e-6, 1e-8])
    solve = get_solver(name)
    z, stats = solve(c, c.z0, context=c.context, tol=tol, max_iter=500)
    assert (stats.iterations.diff() > 0).all(), "a tighter tol must need more iterations"
    assert (stats.residual <= tol).all()
    for i in range(4):
        alone = c.row(i)
        z_i, stats_i = solve(
            alone, alone.z0, context=alone.context, tol=float(tol[i]), max_iter=500
        )
        assert stats.iterations[i] == stats_i.iterations[0]
        assert stats.converged[i] == stats_i.converged[0]
        torch.testing.assert_close(z[i], z_i[0], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(stats.residual[i], stats_i.residual[0], rtol=0, atol=1e-14)


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_mixed_max_iter_give_each_sample_its_own_limit(make_contraction, name):
    c = make_contraction(rates=(0.9,) * 4)
    max_iter = torch.tensor([1, 2, 5, 500])
    solve = get_solver(name)
    z, stats = solve(c, c.z0, context=c.context, tol=1e-10, max_iter=max_iter)
    assert stats.iterations[:3].tolist() == [1, 2, 5]
    assert stats.converged.tolist() == [False, False, False, True]
    assert stats.iterations[3] < 500
    for i in range(4):
        alone = c.row(i)
        z_i, stats_i = solve(
            alone, alone.z0, context=alone.context, tol=1e-10, max_iter=int(max_iter[i])
        )
        assert stats.iterations[i] == stats_i.iterations[0]
        torch.testing.assert_close(z[i], z_i[0], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_max_iter_one_applies_the_map_once_and_does_not_converge(contraction, name):
    z, stats = get_solver(name)(
        contraction, contraction.z0, context=contraction.context, max_iter=1
    )
    assert stats.iterations.tolist() == [1, 1, 1, 1]
    assert not stats.converged.any()
    torch.testing.assert_close(z, contraction.b)  # one application from zero: f(0) = b


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_converged_samples_leave_the_active_set(contraction, recorder, name):
    f = recorder(contraction)
    tol = torch.tensor([1e-3, 1e-5, 1e-7, 1e-9])
    _, stats = get_solver(name)(
        f, contraction.z0, context=contraction.context, tol=tol, max_iter=1000
    )
    rows = f.rows
    assert rows[0] == 4 and rows[-1] == 1
    assert all(a >= b for a, b in itertools.pairwise(rows)), rows
    # The work done is exactly the iterations reported: no row is evaluated after it stopped.
    assert sum(rows) == int(stats.iterations.sum())
    assert len(rows) == int(stats.iterations.max())


def _exp_or_half_cos(z, diverges):
    """exp has no real fixed point (e^z > z): Picard overflows, Anderson wanders."""
    return torch.where(diverges, torch.exp(z), 0.5 * torch.cos(z))


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_a_diverging_sample_stops_unconverged_and_leaves_the_others_alone(name):
    solve = get_solver(name)
    diverges = torch.tensor([[False], [True], [False]])
    z0 = torch.tensor([[0.0], [0.0], [2.0]], dtype=torch.float64)
    z, stats = solve(_exp_or_half_cos, z0, context=(diverges,), tol=1e-10, max_iter=100)
    assert stats.converged.tolist() == [True, False, True]
    assert torch.isfinite(z).all()
    for i in (0, 2):
        z_i, stats_i = solve(
            _exp_or_half_cos, z0[i : i + 1], context=(diverges[i : i + 1],), tol=1e-10, max_iter=100
        )
        assert stats.iterations[i] == stats_i.iterations[0]
        torch.testing.assert_close(z[i], z_i[0], rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_overflowing_float32_iterates_do_not_count_as_converged(name):
    # 2z + 1: Picard doubles z until ‖f(z)‖² overflows one step before ‖f(z) − z‖² does; that
    # step must not read as residual ‖f(z) − z‖ / inf = 0, i.e. "converged".
    f = lambda z: 2 * z + 1  # noqa: E731
    if name == "anderson":  # Anderson solves affine maps; give it one with no fixed point
        f = lambda z: z * z + 1  # noqa: E731
    z, stats = get_solver(name)(f, torch.zeros(1, 3), tol=1e-6, max_iter=200)
    assert not stats.converged.any()
    assert torch.isfinite(z).all()


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
@pytest.mark.parametrize("at_call", [1, 4])
@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_a_non_finite_sample_returns_its_last_finite_iterate(
    recorder, half_cos, name, at_call, poison
):
    g, _ = half_cos
    calls = []

    def f(z, index):  # poisons sample 1 on the at_call-th application of f
        calls.append(None)
        out = g(z)
        if len(calls) == at_call:
            out = torch.where(index == 1, poison, out)
        return out

    f_rec = recorder(f)
    index = torch.arange(3)[:, None]
    z0 = torch.full((3, 2), 0.25, dtype=torch.float64)
    z, stats = get_solver(name)(f_rec, z0, context=(index,), tol=1e-12, max_iter=100)
    assert stats.converged.tolist() == [True, False, True]
    assert stats.iterations[1] == at_call
    assert not torch.isfinite(stats.residual[1])
    # The last finite iterate is the state the poisoned call was given (z0 when it was the first).
    last_input = f_rec.inputs[at_call - 1]
    assert last_input.shape[0] == 3, "all samples were still active at the poisoned call"
    torch.testing.assert_close(z[1], last_input[1], rtol=0, atol=0)
    assert torch.isfinite(z).all()
    clean, _ = get_solver(name)(lambda z, i: g(z), z0, context=(index,), tol=1e-12, max_iter=100)
    torch.testing.assert_close(z[[0, 2]], clean[[0, 2]], rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_a_singular_anderson_system_for_one_sample_fails_nobody(name):
    # z + 1 repeats the same residual forever: with λ = 0 Anderson's system is exactly singular.
    def f(z, shift):
        return torch.where(shift, z + 1, 0.5 * torch.cos(z))

    shift = torch.tensor([[True], [False]])
    options = {"regularization": 0.0} if name == "anderson" else {}
    z, stats = get_solver(name)(
        f,
        torch.zeros(2, 1, dtype=torch.float64),
        context=(shift,),
        tol=1e-10,
        max_iter=50,
        **options,
    )
    assert stats.converged.tolist() == [False, True]
    assert torch.isfinite(z).all()
    assert z[1].item() == pytest.approx(0.45018361129487355, abs=1e-9)


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_trace_records_each_samples_residuals_consistently_with_stats(contraction, name):
    tol = torch.tensor([1e-2, 1e-4, 1e-6, 1e-8])
    solve = get_solver(name)
    z, stats = solve(
        contraction, contraction.z0, context=contraction.context, tol=tol, max_iter=300, trace=True
    )
    trace = stats.trace
    assert trace is not None and trace.ndim == 2 and trace.shape[1] == 4
    assert trace.shape[0] >= int(stats.iterations.max())
    for i, k in enumerate(stats.iterations.tolist()):
        assert torch.isfinite(trace[:k, i]).all()
        assert torch.isnan(trace[k:, i]).all(), "a stopped sample has no more residuals"
        assert trace[k - 1, i] == stats.residual[i]
        assert (trace[: k - 1, i] > tol[i]).all(), "a sample stops at the first residual ≤ tol"
    z_plain, stats_plain = solve(
        contraction, contraction.z0, context=contraction.context, tol=tol, max_iter=300
    )
    assert stats_plain.trace is None
    assert torch.equal(z, z_plain) and torch.equal(stats.iterations, stats_plain.iterations)


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_solvers_are_scale_invariant(contraction, name):
    """Residuals are relative, so solving ``s·f(z/s)`` from ``s·z0`` takes the same steps."""
    solve = get_solver(name)
    results = []
    for s in (1e-6, 1.0, 1e6):
        z, stats = solve(
            lambda z, b, r, s=s: s * contraction(z / s, b, r),
            contraction.z0,
            context=contraction.context,
            tol=1e-10,
            max_iter=1000,
        )
        results.append((z / s, stats.iterations))
    for z, iterations in results[1:]:
        assert torch.equal(iterations, results[0][1])
        torch.testing.assert_close(z, results[0][0], rtol=1e-8, atol=1e-12)


def test_relative_residual_matches_the_spec_formula():
    fz = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    z = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    # ‖f(z) − z‖ / max(‖f(z)‖, 1e-12)
    assert relative_residual(fz, z).tolist() == [1.0, 1e12, 0.0]


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_an_empty_batch_is_an_empty_result(name):
    z, stats = get_solver(name)(lambda z: z, torch.zeros(0, 3), tol=1e-4, max_iter=5)
    assert z.shape == (0, 3) and stats.iterations.shape == (0,)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("picard", {"damping": 0.0}, "damping"),
        ("picard", {"damping": 1.5}, "damping"),
        ("anderson", {"memory": 0}, "memory"),
        ("picard", {"max_iter": 0}, "max_iter"),
        ("anderson", {"max_iter": torch.tensor([3, 0])}, "max_iter"),
        ("picard", {"tol": torch.tensor([1e-3, 1e-3, 1e-3])}, "per-sample"),
    ],
)
def test_nonsense_knobs_are_rejected(name, options, message):
    with pytest.raises(ValueError, match=message):
        get_solver(name)(lambda z: 0.5 * z, torch.ones(2, 3), **options)


# --- Anderson earns its keep ------------------------------------------------------------------


def _mean_iterations(model, x, solver: str, tol: float, max_iter: int) -> tuple[float, float]:
    out = model.predict(x, solver=solver, tol=tol, max_iter=max_iter)
    return out.stats.iterations.double().mean().item(), out.stats.converged.double().mean().item()


def test_anderson_needs_fewer_iterations_than_picard_on_a_fresh_conv_model(make_model, make_inputs):
    model = make_model("fpn", "conv", gamma=0.99, channels=8, input_shape=(1, 16, 16))
    # A random init is so contractive (spectral radius of ∂T/∂z ≈ 0.1) that Picard needs ~8 steps
    # and there is nothing to accelerate. Tying W₂ to W₁'s adjoint makes W₂·relu·W₁ symmetric-like,
    # so ∂T/∂z has an eigenvalue near γ: the slow case that Anderson exists for.
    w1, w2 = model.operator.w1, model.operator.w2
    with torch.no_grad():
        w2.weight.copy_(w1.weight.transpose(0, 1).flip(2, 3))
    model.tighten_lipschitz()
    x = make_inputs(model, 16)
    picard, picard_converged = _mean_iterations(model, x, "picard", 1e-6, 300)
    anderson, anderson_converged = _mean_iterations(model, x, "anderson", 1e-6, 300)
    assert picard_converged == anderson_converged == 1.0
    assert anderson < 0.8 * picard, (anderson, picard)


@pytest.mark.skipif(
    not (BUNDLED / "model.safetensors").is_file(), reason="bundled checkpoint not built yet"
)
def test_anderson_needs_fewer_iterations_than_picard_on_the_bundled_model(mnist_test_images):
    model = load_checkpoint(BUNDLED).model
    x = mnist_test_images[:128]
    tol = model.config.solver.tol
    picard, picard_converged = _mean_iterations(model, x, "picard", tol, 500)
    anderson, anderson_converged = _mean_iterations(model, x, "anderson", tol, 500)
    assert anderson_converged >= picard_converged
    assert anderson < picard, (anderson, picard)
    assert math.isfinite(anderson)


@pytest.mark.parametrize("old_steps", [1, 4])
def test_anderson_rows_of_different_ages_step_as_they_would_alone(old_steps):
    """The serving engine steps rows that joined at different iterations together; each row's
    trajectory is its own, even when the history slots it has not written hold NaN garbage
    (the newcomer's, and the older row's when it is younger than the memory)."""
    from models.solvers import Anderson

    torch.manual_seed(0)
    A = 0.9 * torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))[0]

    def f(z, b):
        return torch.tanh(z @ A.T + b)

    stepper = Anderson(memory=3)
    b = torch.randn(2, 6, dtype=torch.float64)
    z0 = torch.zeros(2, 6, dtype=torch.float64)
    old = stepper.start(f, z0[:1], (b[:1],), None)
    old["F"].fill_(float("nan"))
    old["G"].fill_(float("nan"))
    for _ in range(old_steps):  # row 0 is that many steps old when row 1 joins
        old = stepper.step(f, old, (b[:1],), None).state
    old_alone = {k: v.clone() for k, v in old.items()}
    new = stepper.start(f, z0[1:], (b[1:],), None)
    new["F"].fill_(float("nan"))
    new["G"].fill_(float("nan"))
    together = {k: torch.cat([old[k], new[k]]) for k in old}
    alone = stepper.start(f, z0[1:], (b[1:],), None)
    for _ in range(6):
        step = stepper.step(f, together, (b,), None)
        reference = stepper.step(f, alone, (b[1:],), None)
        old_reference = stepper.step(f, old_alone, (b[:1],), None)
        together, alone, old_alone = step.state, reference.state, old_reference.state
        assert torch.isfinite(step.fz).all()
        torch.testing.assert_close(step.fz[1:], reference.fz, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(step.fz[:1], old_reference.fz, rtol=1e-12, atol=1e-12)
