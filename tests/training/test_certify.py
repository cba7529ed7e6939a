"""Certified robustness on real data: ``fpn-eval --certify`` and PGD inside the certificates.

The bundled ``mnist-linf`` checkpoint on the first MNIST test images: no adversarial
perturbation found by projected gradient descent (exact implicit gradients) inside a certified
radius changes a certified label, while the same attack does change labels outside it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import load_checkpoint
from training.data import load_dataset

BIN = Path(sys.executable).parent
TIGHT = {"tol": 1e-6, "max_iter": 2000}


@pytest.fixture(scope="module")
def linf(repo_root):
    return load_checkpoint(repo_root / "checkpoints" / "mnist-linf").model


@pytest.fixture(scope="module")
def images(mnist_dir):
    test = load_dataset("mnist", "test", mnist_dir).subset(200)
    return test.batch(slice(None)), test.labels


def pgd(model, x, labels, eps, *, steps=30, seed=0):
    """ℓ∞ PGD on the margin ``max_{j≠y} y_j − y_y`` with a random start; ``eps`` a scalar or (B,).
    Returns the perturbed inputs (inside the ball and [0, 1])."""
    eps = torch.as_tensor(eps, dtype=x.dtype).expand(x.shape[0]).view(-1, 1, 1, 1)
    g = torch.Generator().manual_seed(seed)
    delta = (torch.rand(x.shape, generator=g) * 2 - 1) * eps
    rows = torch.arange(x.shape[0])
    for _ in range(steps):
        delta.requires_grad_(True)
        logits = model((x + delta).clamp(0, 1), backprop="ift").logits
        others = logits.scatter(1, labels.view(-1, 1), float("-inf"))
        margin = others.max(1).values - logits[rows, labels]
        (grad,) = torch.autograd.grad(margin.sum(), delta)
        with torch.no_grad():
            delta = (delta + 2.5 * eps / steps * grad.sign()).clamp(-eps, eps)
            delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach()


def test_pgd_inside_a_certified_radius_never_changes_a_certified_label(linf, images):
    x, labels = images
    model = linf.eval()
    flipped_outside = 0
    for eps in (0.01, 0.05, 0.1):
        verdict = model.certify(x, labels, eps)
        certified = verdict["interval"] | verdict["lipschitz"]
        adversarial = model.predict(pgd(model, x, labels, eps), **TIGHT).logits.argmax(1)
        assert torch.equal(adversarial[certified], labels[certified]), eps
        flipped_outside += int((adversarial != labels).sum())
    assert flipped_outside > 0, "the attack must find something where nothing is certified"
    # the served Lipschitz radius, per sample
    out = model.predict(x)
    radius = out.extras["certified_radius_linf"]
    ok = (out.logits.argmax(1) == labels) & (radius > 0)
    adversarial = model.predict(pgd(model, x, labels, 0.999 * radius), **TIGHT)
    assert torch.equal(adversarial.logits.argmax(1)[ok], labels[ok])


def test_the_attack_is_real_far_outside_the_certificates(linf, images):
    x, labels = images
    adversarial = linf.predict(pgd(linf, x, labels, 0.3), **TIGHT).logits.argmax(1)
    flipped = adversarial != labels
    noise = linf.predict(pgd(linf, x, labels, 0.3, steps=0), **TIGHT).logits.argmax(1)
    # (bundled robust model, measured: PGD 9.5 % of labels, uniform noise of that size 3 %)
    assert flipped.double().mean() > max(0.05, 2 * (noise != labels).double().mean())
    verdict = linf.certify(x, labels, 0.3)
    assert not (flipped & (verdict["interval"] | verdict["lipschitz"])).any()


def _eval(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "fpn-eval"), *args], capture_output=True, text=True, check=False, timeout=300
    )


def test_fpn_eval_certify_reports_certified_accuracy_from_the_served_radius(
    repo_root, mnist_dir, linf, images
):
    done = _eval(
        "--checkpoint", str(repo_root / "checkpoints" / "mnist-linf"), "--dataset", "mnist",
        "--data-dir", str(mnist_dir), "--limit", "200", "--certify", "0.01", "0.05", "0.1",
        "--device", "cpu", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert set(report["certified_accuracy"]) == {"0.01", "0.05", "0.1"}
    by = report["certified_accuracy_by_certificate"]
    assert set(by) == {"lipschitz", "interval"}
    x, labels = images
    out = linf.predict(x)
    served = (out.logits.argmax(1) == labels) & (out.extras["certified_radius_linf"] > 0.01)
    assert by["lipschitz"]["0.01"] == pytest.approx(float(served.double().mean()))
    for eps, best in report["certified_accuracy"].items():
        assert max(by["lipschitz"][eps], by["interval"][eps]) <= best  # either certificate counts
        assert best <= by["lipschitz"][eps] + by["interval"][eps]
        assert best <= report["accuracy"]
    values = list(report["certified_accuracy"].values())
    assert values == sorted(values, reverse=True)


def test_fpn_eval_certify_on_a_family_without_a_bound_is_a_clear_error(repo_root):
    done = _eval(
        "--checkpoint", str(repo_root / "checkpoints" / "mnist-fpn"), "--dataset", "synthetic",
        "--certify", "0.1",
    )  # fmt: skip
    assert done.returncode == 2
    assert "no certified bound" in done.stderr and "--certify" in done.stderr


def test_fpn_eval_takes_the_solvers_the_family_runs_and_names_them_otherwise(repo_root, mnist_dir):
    cdeq = str(repo_root / "checkpoints" / "mnist-cdeq")
    data = ("--dataset", "mnist", "--data-dir", str(mnist_dir), "--limit", "8")
    done = _eval("--checkpoint", cdeq, *data, "--solver", "picard")
    assert done.returncode == 2
    assert "unknown solver 'picard'" in done.stderr and "['bosh3', 'dopri5']" in done.stderr
    done = _eval("--checkpoint", cdeq, *data, "--solver", "dopri5", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["n"] == 8
