"""Fixtures for the model library's tests: tiny models (built by :mod:`model_fixtures`, the one
home of the tiny-model helpers) and maps with known fixed points.

Everything here is small and float64 unless a test says otherwise, so exact comparisons are
meaningful and the whole package runs in seconds on a CPU. Helpers reach tests as fixtures
(``make_model``, ``make_inputs``, ``make_contraction``, ``recorder``), never by importing this file.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from model_fixtures import random_inputs, tiny_model
from torch import Tensor

from models import BackpropConfig, ImplicitClassifier, SolverConfig

HALF_COS_FIXED_POINT = 0.45018361129487355  # z = 0.5·cos(z), by Newton's method
CORE_FAMILIES = ("fpn", "deq", "explicit")  # must support both arch kinds


@pytest.fixture
def make_model() -> Callable[..., ImplicitClassifier]:
    """``make_model(family, kind, *, dtype=float64, train=False, **tiny_config_kwargs)``:
    :func:`model_fixtures.tiny_model` with the library's default solver and backprop settings
    and γ = 0.5. Families outside :data:`CORE_FAMILIES` that reject an arch kind with a
    ``ValueError`` skip the test (the core families must build every kind)."""

    def make(family: str = "fpn", kind: str = "mlp", **kwargs: Any) -> ImplicitClassifier:
        kwargs = {"gamma": 0.5, "solver": SolverConfig(), "backprop": BackpropConfig(), **kwargs}
        try:
            return tiny_model(family, kind, **kwargs)
        except ValueError as exc:
            if family in CORE_FAMILIES:
                raise
            pytest.skip(f"family {family!r} does not build a {kind} model: {exc}")

    return make


@pytest.fixture
def make_inputs() -> Callable[..., Tensor]:
    """``make_inputs(model, batch, seed=1)``: :func:`model_fixtures.random_inputs`."""
    return random_inputs


@dataclass(frozen=True)
class LinearContraction:
    """Per-sample affine contractions ``z ↦ rate_i · A z + b_i`` with a closed-form fixed point.

    ``A`` is symmetric with ``‖A‖₂ = 1`` and an eigenvalue at +1, so sample ``i`` contracts at
    exactly ``rate_i`` and Picard needs about ``log(tol) / log(rate_i)`` iterations.
    """

    A: Tensor  # (n, n)
    b: Tensor  # (B, n)
    rate: Tensor  # (B, 1)

    def __call__(self, z: Tensor, b: Tensor, rate: Tensor) -> Tensor:  # z: (B', n)
        return rate * (z @ self.A.T) + b

    @property
    def context(self) -> tuple[Tensor, Tensor]:
        return (self.b, self.rate)

    @property
    def z0(self) -> Tensor:
        return torch.zeros_like(self.b)

    def solution(self) -> Tensor:
        """``(I − rate_i A)⁻¹ b_i`` per sample, by ``torch.linalg.solve``: (B, n)."""
        eye = torch.eye(self.A.shape[0], dtype=self.A.dtype)
        systems = eye - self.rate[:, :, None] * self.A  # (B, n, n)
        return torch.linalg.solve(systems, self.b)

    def row(self, i: int) -> LinearContraction:
        return LinearContraction(self.A, self.b[i : i + 1], self.rate[i : i + 1])


def linear_contraction(
    rates: tuple[float, ...] = (0.3, 0.6, 0.9, 0.95), n: int = 12, seed: int = 0
) -> LinearContraction:
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    eigenvalues = torch.linspace(-0.9, 1.0, n, dtype=torch.float64)
    A = (q * eigenvalues) @ q.T
    b = torch.randn(len(rates), n, generator=generator, dtype=torch.float64)
    rate = torch.tensor(rates, dtype=torch.float64)[:, None]
    return LinearContraction(A, b, rate)


@pytest.fixture
def make_contraction() -> Callable[..., LinearContraction]:
    """``make_contraction(rates=(0.3, 0.6, 0.9, 0.95), n=12, seed=0)``."""
    return linear_contraction


@pytest.fixture
def contraction() -> LinearContraction:
    """Four samples contracting at rates 0.3, 0.6, 0.9 and 0.95."""
    return linear_contraction()


@pytest.fixture
def half_cos() -> tuple[Callable[[Tensor], Tensor], float]:
    """``(z ↦ 0.5·cos z, its fixed point)``."""
    return (lambda z: 0.5 * torch.cos(z)), HALF_COS_FIXED_POINT


@dataclass
class RowRecorder:
    """Wraps a map and records, per call, the state it was given (so: how many rows)."""

    f: Callable[..., Tensor]
    inputs: list[Tensor] = field(default_factory=list)

    def __call__(self, z: Tensor, *context: Tensor) -> Tensor:
        self.inputs.append(z.detach().clone())
        return self.f(z, *context)

    @property
    def rows(self) -> list[int]:
        return [z.shape[0] for z in self.inputs]


@pytest.fixture
def recorder() -> type[RowRecorder]:
    """``recorder(f)`` wraps a map and records the rows of every call."""
    return RowRecorder


# --- MNIST (SPEC §3: the standard IDX .gz files) -----------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    """A gzip-compressed unsigned-byte IDX file as an array of its stated shape."""
    raw = gzip.decompress(path.read_bytes())
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


@pytest.fixture(scope="session")
def mnist_test_images(data_dir: Path) -> Tensor:
    """The first 256 MNIST test images as raw intensities in [0, 1]: (256, 1, 28, 28) float32."""
    path = data_dir / "mnist" / "t10k-images-idx3-ubyte.gz"
    if not path.is_file():
        pytest.skip(f"MNIST not found at {path}")
    images = read_idx(path)[:256]
    return torch.from_numpy(images.copy()).float().div_(255.0).unsqueeze(1)
