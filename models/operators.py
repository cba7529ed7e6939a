"""Contractive operators ``T(z; Qx)`` whose Lipschitz constant in ``z`` is below 1 by construction.

Both operators have the form

    T(z; Qx) = relu(Qx + γ · W₂ relu(W₁ z))        (conv)
    T(z; Qx) = relu(Qx + γ · W z)                   (mlp)

where every ``W`` is a linear map divided by its spectral norm ``‖W‖₂`` (so ``‖W / ‖W‖₂‖₂ = 1``)
and ``0 < γ < 1``. ReLU is 1-Lipschitz and adding ``Qx`` does not change the Lipschitz constant
in ``z``, so ``Lip_z(T) ≤ γ · 1 · 1 = γ < 1``: ``T`` is a contraction and has a unique fixed point
(Banach), which Picard iteration reaches at the linear rate γ.

The spectral norm is that of the *whole* linear map: for a convolution, of the convolution operator
on the state's spatial size (not of the reshaped kernel matrix, which can under-estimate it). It is
estimated by power iteration with the map and its adjoint (``conv2d`` / ``conv_transpose2d``): one
step per training forward pass, persistent vector ``u`` in a buffer, as in spectral normalisation
(Miyato et al.). :meth:`SpectralNormalizedMap.tighten` runs the iteration to convergence before a
checkpoint is written, and eval mode uses the stored ``u``, so a loaded model is deterministic.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

OperatorFn = Callable[[Tensor, Tensor], Tensor]


class Operator(Protocol):
    """What a classifier asks of its operator module: ``T`` with weights prepared for one pass."""

    def prepare(self) -> OperatorFn: ...


class SpectralNormalizedMap(nn.Module):
    """A bias-free linear map (conv or dense) normalised to spectral norm 1.

    ``input_shape`` is one sample's input shape, e.g. ``(C, H, W)`` for conv or ``(D,)`` for dense.
    """

    u: Tensor  # buffer (1, *input_shape): the power iteration's unit vector

    def __init__(self, weight: Tensor, input_shape: tuple[int, ...], padding: int = 0) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.padding = padding
        self.conv = weight.ndim == 4
        u = torch.randn(1, *input_shape)
        self.register_buffer("u", u / u.norm())

    def apply_map(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.conv2d(x, weight, padding=self.padding) if self.conv else F.linear(x, weight)

    def apply_adjoint(self, y: Tensor, weight: Tensor) -> Tensor:
        if self.conv:
            return F.conv_transpose2d(y, weight, padding=self.padding)
        return F.linear(y, weight.t())

    @torch.no_grad()
    def power_iteration(self, steps: int) -> None:
        u = self.u
        for _ in range(steps):
            u = self.apply_adjoint(self.apply_map(u, self.weight), self.weight)
            u = u / u.norm().clamp_min(1e-12)
        self.u.copy_(u)

    def tighten(self, steps: int = 500) -> None:
        """Run power iteration to convergence (call before saving or measuring)."""
        self.power_iteration(steps)

    def sigma(self) -> Tensor:
        """Spectral norm estimate ``‖W u‖`` (differentiable in W, u fixed). ``u`` is cloned: a
        later power-iteration step updates the buffer in place, which must not invalidate a
        graph that already used it."""
        return self.apply_map(self.u.clone(), self.weight).norm()

    def normalized_weight(self) -> Tensor:
        if self.training:
            self.power_iteration(1)
        return self.weight / self.sigma()


class ConvOperator(nn.Module):
    """``T(z; Qx) = relu(Qx + γ W₂ relu(W₁ z))`` on states of shape (C, H, W); 3×3 convs."""

    def __init__(self, channels: int, spatial: tuple[int, int], gamma: float) -> None:
        super().__init__()
        self.gamma = gamma
        shape = (channels, *spatial)
        self.w1 = SpectralNormalizedMap(_kaiming(channels, channels, 3), shape, padding=1)
        self.w2 = SpectralNormalizedMap(_kaiming(channels, channels, 3), shape, padding=1)

    def prepare(self) -> OperatorFn:
        """Normalise the weights once (one power-iteration step when training) and return ``T``."""
        w1 = self.w1.normalized_weight()
        w2 = self.w2.normalized_weight() * self.gamma

        def T(z: Tensor, qx: Tensor) -> Tensor:  # z, qx: (B, C, H, W)
            return F.relu(qx + F.conv2d(F.relu(F.conv2d(z, w1, padding=1)), w2, padding=1))

        return T

    def maps(self) -> list[SpectralNormalizedMap]:
        return [self.w1, self.w2]


class LinearOperator(nn.Module):
    """``T(z; Qx) = relu(Qx + γ W z)`` on states of shape (D,)."""

    def __init__(self, width: int, gamma: float) -> None:
        super().__init__()
        self.gamma = gamma
        weight = torch.empty(width, width)
        nn.init.orthogonal_(weight)
        self.w = SpectralNormalizedMap(weight, (width,))

    def prepare(self) -> OperatorFn:
        w = self.w.normalized_weight() * self.gamma

        def T(z: Tensor, qx: Tensor) -> Tensor:  # z, qx: (B, D)
            return F.relu(qx + F.linear(z, w))

        return T

    def maps(self) -> list[SpectralNormalizedMap]:
        return [self.w]


def _kaiming(out_channels: int, in_channels: int, k: int) -> Tensor:
    weight = torch.empty(out_channels, in_channels, k, k)
    nn.init.kaiming_uniform_(weight, a=5**0.5)
    return weight


def jacobian_spectral_norm(
    T: OperatorFn, z: Tensor, qx: Tensor, *, steps: int = 100, seed: int = 0
) -> Tensor:
    """Largest singular value of ``∂T/∂z`` at each sample of ``z`` by power iteration on ``JᵀJ``.

    Returns (B,). Used to check contraction numerically; it never enters training.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(z.shape, generator=generator, dtype=z.dtype).to(z.device)
    z = z.detach()

    def apply_t(zz: Tensor) -> Tensor:
        return T(zz, qx.detach())

    sigma = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
    for _ in range(steps):
        v = v / v.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, *([1] * (v.ndim - 1)))
        jv = torch.func.jvp(apply_t, (z,), (v,))[1]  # (outputs, tangents)
        vjp_fn = torch.func.vjp(apply_t, z)[1]  # (outputs, the vjp function)
        (v,) = vjp_fn(jv)
        sigma = jv.flatten(1).norm(dim=1)
    return sigma
