"""What every registered family must do, one test per check parametrised over ``FAMILIES`` (as
timm tests every registered model): build, predict with per-sample depth, keep samples
independent, reach one fixed point from any start, back-propagate the gradient it claims,
round-trip through a checkpoint and learn. Each family's own behaviour is in its
``test_family_<name>.py``."""

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

from models import (
    FAMILIES,
    SOLVERS,
    ArchConfig,
    ImplicitClassifier,
    ImplicitOutput,
    ModelConfig,
    SolverConfig,
    create_model,
    get_family,
    register_family,
)
from models.backprop import BACKPROP_MODES

KINDS = ("conv", "mlp")
ADAPTIVE = sorted(set(FAMILIES) - {"explicit"})  # families whose depth follows tol / max_iter


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_builds_and_predicts(make_model, make_inputs, family, kind):
    model = make_model(family, kind)
    assert isinstance(model, ImplicitClassifier)
    out = model.predict(make_inputs(model, 5))
    assert isinstance(out, ImplicitOutput)
    assert out.logits.shape == (5, 3) and torch.isfinite(out.logits).all()
    assert out.z.shape[0] == 5 and torch.isfinite(out.z).all()
    stats = out.stats
    assert stats.iterations.shape == stats.residual.shape == stats.converged.shape == (5,)
    assert (stats.iterations >= 1).all()
    assert not out.logits.requires_grad


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_names_a_real_default_backprop_mode(family):
    spec = get_family(family)
    assert spec.name == family
    assert spec.default_backprop in BACKPROP_MODES
    assert spec.description


@pytest.mark.parametrize("family", ADAPTIVE)
def test_the_fixed_point_does_not_depend_on_where_the_solve_starts(family):
    model = tiny_model(family, "mlp")
    x = random_inputs(model, 4)
    qx = model.inject(x)
    z0 = model.initial_state(x, qx)
    g = torch.Generator().manual_seed(3)
    starts = [4 * torch.rand(z0.shape, generator=g, dtype=z0.dtype), -torch.ones_like(z0)]
    assert_unique_fixed_point(model, x, starts, tol=1e-10, atol=1e-7)


@pytest.mark.parametrize("mode", ["jfb", "ift"])
@pytest.mark.parametrize("family", ADAPTIVE)
def test_gradients_match_finite_differences(family, mode):
    model = tiny_model(family, "mlp")
    x = random_inputs(model, 5)
    assert_gradient_matches_finite_differences(model, x, torch.tensor([0, 1, 2, 0, 1]), mode)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_checkpoint_round_trip(family, tmp_path):
    model = tiny_model(family, "mlp")
    assert_checkpoint_round_trip(model, random_inputs(model, 4), tmp_path / family)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_short_synthetic_run_learns(family):
    model = tiny_model(family, "mlp", dtype=torch.float32, width=32)
    before, after, _ = train_on_prototypes(model, steps=60)
    assert before < 0.6 and after > 0.95, (before, after)
    x, _ = prototypes(64, model.config.input.shape, 3, seed=1)
    assert model.predict(x.float(), tol=1e-4, max_iter=200).stats.converged.all()


def test_unknown_family_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"unknown family 'resnet'; available: \[.*'fpn'"):
        create_model(ModelConfig(family="resnet"))


def test_a_family_name_cannot_be_registered_twice():
    with pytest.raises(ValueError, match="already registered"):
        register_family("fpn", default_backprop="jfb", description="again")(lambda config: None)
    assert get_family("fpn").description != "again"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_samples_answer_never_depends_on_its_batch_mates(make_model, make_inputs, family):
    model = make_model(family, "conv", gamma=0.8)
    x = make_inputs(model, 6)
    for solver in model.solvers():
        _check_batch_independence(model, x, solver)


def _check_batch_independence(model, x, solver: str) -> None:
    batch = model.predict(x, tol=1e-6, max_iter=200, solver=solver)
    for i in range(6):
        alone = model.predict(x[i : i + 1], tol=1e-6, max_iter=200, solver=solver)
        assert batch.logits[i].argmax() == alone.logits[0].argmax()
        assert batch.stats.iterations[i] == alone.stats.iterations[0]
        assert batch.stats.converged[i] == alone.stats.converged[0]
        torch.testing.assert_close(batch.z[i], alone.z[0], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(batch.logits[i], alone.logits[0], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("family", ADAPTIVE)
def test_predict_takes_per_sample_tolerances(make_model, make_inputs, family):
    model = make_model(family, "mlp", gamma=0.9)
    x = make_inputs(model, 1).expand(3, -1)  # one input three times, three tolerances
    tol = torch.tensor([1e-2, 1e-5, 1e-9])
    out = model.predict(x, tol=tol, max_iter=500)
    assert (out.stats.iterations.diff() >= 0).all() and out.stats.iterations[
        2
    ] > out.stats.iterations[0]
    for i in range(3):
        alone = model.predict(x[:1], tol=float(tol[i]), max_iter=500)
        assert out.stats.iterations[i] == alone.stats.iterations[0]


@pytest.mark.parametrize("family", ADAPTIVE)
def test_predict_knobs_default_to_the_config_and_arguments_override_it(
    make_model, make_inputs, family
):
    model = make_model(
        family, "mlp", gamma=0.9, solver=SolverConfig(method="picard", tol=1e-12, max_iter=3)
    )
    x = make_inputs(model, 4)
    default = model.predict(x)
    assert (default.stats.iterations <= 3).all() and not default.stats.converged.all()
    assert (model.predict(x, max_iter=1).stats.iterations == 1).all()
    assert model.predict(x, tol=0.5, max_iter=200).stats.converged.all()


def test_the_explicit_family_applies_T_exactly_depth_times(make_model, make_inputs):
    model = make_model("explicit", "mlp", depth=4)
    x = make_inputs(model, 3)
    out = model.predict(x, tol=1e-1, max_iter=100)  # solver knobs do not change its depth
    assert out.stats.iterations.tolist() == [4, 4, 4]
    qx, T = model.inject(x), model.prepare_operator()
    z = torch.zeros_like(qx)
    for _ in range(4):
        z = T(z, qx)
    torch.testing.assert_close(out.z, z)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_config_round_trips_through_json(make_model, family, kind):
    config = make_model(family, kind).config
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize(
    "document",
    [
        {"familly": "fpn"},
        {"arch": {"kind": "mlp", "widht": 8}},
        {"solver": {"method": "picard", "threshold": 1e-3}},
    ],
)
def test_unknown_config_keys_are_an_error_not_dropped(document):
    with pytest.raises(ValueError, match="unknown"):
        ModelConfig.from_dict(document)


@pytest.mark.parametrize("gamma", [0.0, 1.0, 1.5, -0.1])
def test_gamma_must_make_a_contraction(gamma):
    with pytest.raises(ValueError, match="gamma"):
        ArchConfig(gamma=gamma)


def test_unknown_arch_kind_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"unknown arch kind 'rnn'; available: \['conv', 'mlp'\]"):
        ArchConfig(kind="rnn")


def test_solver_options_are_those_the_method_accepts():
    config = SolverConfig(damping=0.5, memory=3, mixing=0.7, regularization=1e-3)
    assert config.options("picard") == {"damping": 0.5}
    assert config.options("anderson") == {"memory": 3, "mixing": 0.7, "regularization": 1e-3}
    for name, solve in SOLVERS.items():  # every option is a real keyword of that solver
        solve(lambda z: 0.5 * z, torch.ones(1, 2), max_iter=2, **config.options(name))
