"""Certified robustness of the ``linf`` family: interval bounds through the fixed point and the
certified-margin training loss. Companion of :mod:`models.linf` (the family's knowledge, kept in
its own module so the family's solve and the certificate math change independently).

**Interval bounds through the fixed point** (the mixed-monotone embedding of Jafarpour, Abate
and Bullo, "Robustness certificates for implicit neural networks: a mixed monotone contractive
approach", L4DC 2022). Split ``A`` into its Metzler part ``M = diag(A) + max(offdiag(A), 0)`` and
the rest ``N = min(offdiag(A), 0)``. For inputs in a box ``[u_lo, u_hi]`` the embedded map

    z_lo ← (1 − α) z_lo + α relu(M z_lo + N z_hi + q_lo)
    z_hi ← (1 − α) z_hi + α relu(M z_hi + N z_lo + q_hi)

(``[q_lo, q_hi]`` the exact box of ``B u + b``) is monotone for ``α ≤ α*`` and an ℓ∞ contraction
of ``(z_lo, z_hi)`` with the rate ``ρ = 1 − α (1 − max(μ∞(A), 0))`` of the original average
iteration (its rows have the same absolute sums). Its fixed point encloses ``z*(u)`` for every
``u`` in the box. The computed iterate ``w`` is within ``‖F(w) − w‖∞ / (1 − ρ)`` of that fixed
point, so :func:`interval_fixed_point` widens the box by that much and the certificate is rigorous
for the exact fixed point (up to float rounding). Logit differences are then bounded exactly for a
box: ``(C_i − C_j) z + (D_i − D_j) u + c_i − c_j`` over ``z`` and ``u`` in their boxes.

**Lipschitz certificate**: ``y_i − y_j ≥ (y_i − y_j)(x) − 2 L ε`` with ``L`` the family's ℓ∞
bound (:meth:`models.linf.LinfClassifier.lipschitz_bound`).

**Certified-margin loss** (Lipschitz-margin training, Tsuzuku et al. 2018; interval bound
propagation training, Gowal et al. 2018): cross-entropy on the worst-case logits
``w_j = −lower(y_t − y_j)`` (``w_t = 0``) for the true class ``t``, mixed with the clean loss.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from .solvers import picard_solve

if TYPE_CHECKING:
    from .linf import LinfClassifier

CERTIFICATES = ("lipschitz", "interval")


def input_box(model: LinfClassifier, x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Centre and radius of the normalised, flattened input box for raw ``x ± eps`` clipped to
    ``[0, 1]`` (raw inputs live there). (B, *input) -> (B, d), (B, d)."""
    x = x.reshape(x.shape[0], -1)
    lo, hi = (x - eps).clamp(0.0, 1.0), (x + eps).clamp(0.0, 1.0)
    std = model.input_std
    centre = ((lo + hi) / 2 - model.input_mean) / std
    return centre, (hi - lo) / 2 / std


def _split(A: Tensor) -> tuple[Tensor, Tensor]:
    """``A = M + N``: ``M`` Metzler (diagonal kept, off-diagonal ≥ 0), ``N`` off-diagonal ≤ 0."""
    diag = torch.diag(A.diagonal())
    off = A - diag
    return diag + off.clamp(min=0.0), off.clamp(max=0.0)


def _embedded_map(M: Tensor, N: Tensor, n: int):
    def E(w: Tensor, q_lo: Tensor, q_hi: Tensor) -> Tensor:  # (B, 2n) -> (B, 2n)
        lo, hi = w[:, :n], w[:, n:]
        new_lo = F.relu(lo @ M.T + hi @ N.T + q_lo)
        new_hi = F.relu(hi @ M.T + lo @ N.T + q_hi)
        return torch.cat([new_lo, new_hi], dim=1)

    return E


def interval_fixed_point(
    model: LinfClassifier,
    u_centre: Tensor,
    u_radius: Tensor,
    z_start: Tensor,
    *,
    tol: float,
    max_iter: int,
    differentiable: bool = False,
) -> tuple[Tensor, Tensor]:
    """Box ``[z_lo, z_hi]`` (each (B, n)) that holds ``z*(u)`` for every ``u`` in the box.

    ``z_start`` (B, n): where the embedded solve starts (the clean fixed point is a good start).
    With ``differentiable`` the solve runs without a graph and one differentiable application of
    the embedded map gives the gradient (JFB); the box is then not widened (training). Otherwise
    the box is widened by the solve's a-posteriori error bound (certification).
    """
    n = model.width
    A = model.operator.matrix()
    M, N = _split(A)
    Bw, b = model.injection.b.weight, model.injection.b.bias
    q_centre = u_centre @ Bw.T + b
    q_radius = u_radius @ Bw.abs().T
    q_lo, q_hi = q_centre - q_radius, q_centre + q_radius
    E = _embedded_map(M, N, n)
    with torch.no_grad():
        A0 = A.detach()
        alpha = float(1.0 / (1.0 - A0.diagonal().min().clamp(max=0.0)))
        E0 = _embedded_map(M.detach(), N.detach(), n)
        w0 = torch.cat([z_start, z_start], dim=1).detach()
        w, _ = picard_solve(
            E0,
            w0,
            context=(q_lo.detach(), q_hi.detach()),
            tol=tol,
            max_iter=max_iter,
            damping=alpha,
        )
    if differentiable:
        w = E(w, q_lo, q_hi)
        return w[:, :n], w[:, n:]
    with torch.no_grad():
        mu = float(_measure(A0))
        step = torch.lerp(w, E0(w, q_lo, q_hi), alpha) - w
        slack = step.abs().amax(1, keepdim=True) / (alpha * (1.0 - max(mu, 0.0)))  # (B, 1)
        lo, hi = w[:, :n] - slack, w[:, n:] + slack
        return lo.clamp(min=0.0), hi  # z* = relu(…) ≥ 0


def _measure(A: Tensor) -> Tensor:
    diag = A.diagonal()
    return (A.abs().sum(1) - diag.abs() + diag).max()


def margin_lower_bounds(
    model: LinfClassifier, z_lo: Tensor, z_hi: Tensor, u_centre: Tensor, u_radius: Tensor
) -> Tensor:
    """``lower[b, i, j]`` ≤ ``y_i − y_j`` for every ``z`` in ``[z_lo, z_hi]`` and ``u`` in its box.
    (B, n) ×2, (B, d) ×2 -> (B, K, K); the diagonal is 0."""
    C, c = model.head.c.weight, model.head.c.bias  # (K, n), (K,)
    D = model.injection.d.weight  # (K, d)
    z_centre, z_radius = (z_lo + z_hi) / 2, (z_hi - z_lo) / 2
    lower = _pairwise(C, z_centre, z_radius) + (c[:, None] - c[None, :])
    if bool((D != 0).any()):
        lower = lower + _pairwise(D, u_centre, u_radius)
    return lower


def _pairwise(W: Tensor, centre: Tensor, radius: Tensor) -> Tensor:
    """Lower bound of ``(W_i − W_j) v`` for ``v`` in the box: (K, m), (B, m) ×2 -> (B, K, K)."""
    diff = W[:, None, :] - W[None, :, :]  # (K, K, m)
    K = W.shape[0]
    flat = diff.reshape(K * K, -1)
    lower = centre @ flat.T - radius @ flat.abs().T  # (B, K·K)
    return lower.reshape(-1, K, K)


def lipschitz_margin_lower_bounds(logits: Tensor, bound: Tensor, eps: float) -> Tensor:
    """``lower[b, i, j] = y_i − y_j − 2 L ε`` off the diagonal, 0 on it. (B, K) -> (B, K, K)."""
    diff = logits[:, :, None] - logits[:, None, :]
    off = 1.0 - torch.eye(logits.shape[1], dtype=logits.dtype, device=logits.device)
    return diff - 2.0 * bound * eps * off


def certified_by(lower: Tensor, labels: Tensor) -> Tensor:
    """(B,) bool: ``labels`` beats every other class by a positive margin bound. (B, K, K), (B,)."""
    rows = lower[torch.arange(labels.shape[0], device=labels.device), labels]  # (B, K)
    rows = rows.scatter(1, labels.view(-1, 1), float("inf"))
    return (rows > 0).all(1)


def worst_case_cross_entropy(lower: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy on the worst-case logits ``w_j = −lower(y_t − y_j)``, ``w_t = 0``."""
    rows = lower[torch.arange(target.shape[0], device=target.device), target]  # (B, K)
    return F.cross_entropy(-rows, target)
