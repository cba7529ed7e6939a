"""Backward modes through a fixed point ``z* = T(z*; Qx)``, all in one place.

Each function returns ``z = T(z*; Qx)`` attached to the autograd graph of the parameters (and of
``Qx``) so that ``loss(readout(z)).backward()`` produces that mode's gradient. The forward solve
that found ``z*`` always ran without a graph; only what is written here is differentiated.

With ``J = ∂T/∂z`` at ``z*`` and ``g = ∂ℓ/∂z``:

- ``jfb``:      ``dℓ/dθ ≈ (∂T/∂θ)ᵀ g``  (Jacobian-free: ``(I − J)^{-1}`` replaced by ``I``)
- ``ift``:      ``dℓ/dθ = (∂T/∂θ)ᵀ y`` with ``y = Jᵀ y + g`` solved by a fixed-point solver
- ``neumann``:  ``y ≈ Σ_{i<k} (Jᵀ)^i g``
- ``unrolled``: autograd through every Picard step from ``z0`` (memory grows with depth)
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import BackpropConfig, SolverConfig
from .operators import OperatorFn
from .solvers import get_solver, relative_residual

BACKPROP_MODES = ("jfb", "ift", "neumann", "unrolled")


def jfb(T: OperatorFn, z_star: Tensor, qx: Tensor) -> Tensor:
    """One differentiable application of ``T`` at the (detached) fixed point."""
    return T(z_star.detach(), qx)


def _attach_backward_hook(T: OperatorFn, z_star: Tensor, qx: Tensor, solve_adjoint) -> Tensor:
    """``z = T(z*, Qx)`` whose incoming gradient ``g`` is replaced by ``solve_adjoint(vjp, g)``.

    ``vjp(v) = Jᵀ v`` uses its own small graph (``T`` at a detached copy of ``z*`` and ``Qx``) so
    that the backward solve never touches the parameters' graph.
    """
    z = T(z_star.detach(), qx)
    if not z.requires_grad:
        return z
    z_leaf = z_star.detach().requires_grad_()
    with torch.enable_grad():
        f_leaf = T(z_leaf, qx.detach())

    def vjp(v: Tensor) -> Tensor:
        return torch.autograd.grad(f_leaf, z_leaf, v, retain_graph=True)[0]

    z.register_hook(lambda g: solve_adjoint(vjp, g))
    return z


def ift(
    T: OperatorFn,
    z_star: Tensor,
    qx: Tensor,
    *,
    solver: SolverConfig,
    tol: float,
    max_iter: int,
) -> Tensor:
    """Implicit differentiation: solve ``y = Jᵀ y + g`` with the forward solver (DEQ backward)."""

    def solve_adjoint(vjp, g: Tensor) -> Tensor:
        index = torch.arange(g.shape[0], device=g.device)

        def adjoint_map(y: Tensor, g_rows: Tensor, rows: Tensor) -> Tensor:
            # vjp runs on the full batch; rows that already converged are fed zeros.
            full = torch.zeros_like(g)
            full[rows] = y
            return vjp(full)[rows] + g_rows

        y, _ = get_solver(solver.method)(
            adjoint_map,
            g,
            context=(g, index),
            tol=tol,
            max_iter=max_iter,
            **solver.options(),
        )
        return y

    return _attach_backward_hook(T, z_star, qx, solve_adjoint)


def neumann(T: OperatorFn, z_star: Tensor, qx: Tensor, *, terms: int) -> Tensor:
    """Truncated Neumann series ``(I − Jᵀ)^{-1} g ≈ Σ_{i<terms} (Jᵀ)^i g``."""

    def solve_adjoint(vjp, g: Tensor) -> Tensor:
        y, term = g, g
        for _ in range(terms - 1):
            term = vjp(term)
            y = y + term
        return y

    return _attach_backward_hook(T, z_star, qx, solve_adjoint)


def unrolled(
    T: OperatorFn, z0: Tensor, qx: Tensor, *, tol: float | Tensor, max_iter: int
) -> tuple[Tensor, int]:
    """Differentiable Picard iteration from ``z0`` until every sample's residual ≤ ``tol`` or
    ``max_iter`` steps. Returns the last iterate and the number of steps taken."""
    z = z0
    for step in range(1, max_iter + 1):
        fz = T(z, qx)
        with torch.no_grad():
            done = bool((relative_residual(fz, z) <= torch.as_tensor(tol, device=z.device)).all())
        z = fz
        if done:
            return z, step
    return z, max_iter


def differentiable_fixed_point(
    mode: str,
    T: OperatorFn,
    z_star: Tensor,
    qx: Tensor,
    *,
    backprop: BackpropConfig,
    solver: SolverConfig,
) -> Tensor:
    """Dispatch to a backward mode (``unrolled`` is handled by the model: it has no ``z*``)."""
    if mode == "jfb":
        return jfb(T, z_star, qx)
    if mode == "ift":
        return ift(T, z_star, qx, solver=solver, tol=backprop.tol, max_iter=backprop.max_iter)
    if mode == "neumann":
        return neumann(T, z_star, qx, terms=backprop.neumann_terms)
    raise ValueError(f"unknown backprop mode {mode!r}; available: {list(BACKPROP_MODES)}")
