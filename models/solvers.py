"""Batched fixed-point solvers with per-sample stopping (SPEC §5).

A solver is a pure function ``solve(f, z0, *, context, tol, max_iter, ...) -> (z, SolverStats)``.
It knows nothing about models, HTTP or datasets.

- ``f(z, *context)`` maps a batch of states to a batch of states; row ``i`` of the output may depend
  only on row ``i`` of ``z`` and of each context tensor. Solvers rely on this: they call ``f`` on
  the still-active rows only, so the work shrinks as samples converge, and a sample's answer never
  depends on its batch-mates.
- ``tol`` and ``max_iter`` are scalars or per-sample tensors of shape ``(B,)``.
- Per-sample residual: ``‖f(z) − z‖₂ / max(‖f(z)‖₂, 1e-12)`` over the flattened state.
- A sample stops when its residual ≤ its ``tol`` or after ``max_iter`` applications of ``f``;
  ``iterations`` counts those applications. The returned state is the last ``f(z)``.
- A non-finite ``f(z)`` stops only that sample: ``converged=False``, and the last finite iterate is
  returned for it.

Example (``0.5·cos`` has the fixed point 0.45018...):

>>> import torch
>>> f = lambda z: 0.5 * torch.cos(z)
>>> z, stats = anderson_solve(f, torch.zeros(3, 1), tol=1e-8, max_iter=50)
>>> [round(v, 5) for v in z.flatten().tolist()]
[0.45018, 0.45018, 0.45018]
>>> bool(stats.converged.all()), bool((stats.iterations < 50).all())
(True, True)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

Context = tuple[Tensor, ...]
FixedPointMap = Callable[..., Tensor]

EPS = 1e-12


@dataclass(frozen=True)
class SolverStats:
    """Per-sample solver statistics.

    iterations: (B,) int64, applications of ``f`` to each sample.
    residual:   (B,) float, relative residual at the returned iterate (NaN/Inf if it diverged).
    converged:  (B,) bool, residual ≤ tol.
    trace:      (K, B) float relative residuals per iteration (NaN once a sample stopped), or None.
    """

    iterations: Tensor
    residual: Tensor
    converged: Tensor
    trace: Tensor | None = None


def relative_residual(fz: Tensor, z: Tensor) -> Tensor:
    """``‖f(z) − z‖ / max(‖f(z)‖, 1e-12)`` per row of the flattened batch: (B, ...) -> (B,)."""
    fz_flat, z_flat = fz.reshape(fz.shape[0], -1), z.reshape(z.shape[0], -1)
    return _relative_residual_rows(fz_flat, fz_flat - z_flat)


def _relative_residual_rows(fz: Tensor, g: Tensor) -> Tensor:
    """The same from (B, n) rows of ``f(z)`` and of ``g = f(z) − z``."""
    norm = fz.norm(dim=1)
    res = g.norm(dim=1) / norm.clamp_min(EPS)
    # A diverging iterate whose norm overflows is not "residual 0": report it as non-finite.
    return torch.where(torch.isfinite(norm), res, torch.nan)


def per_sample(value: float | int | Tensor, batch: int, dtype: torch.dtype, device) -> Tensor:
    """Broadcast a scalar or (B,) knob to a (B,) tensor on ``device``."""
    t = torch.as_tensor(value, dtype=dtype, device=device)
    if t.ndim == 0:
        return t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(
            f"per-sample knob must be a scalar or shape ({batch},), got {tuple(t.shape)}"
        )
    return t


class _ActiveSet:
    """Bookkeeping shared by the solvers: which rows still iterate, and the finished rows' results.

    Finished rows are written into the output buffers once, when they stop; the active rows are
    compacted only on iterations where some row stopped, so a batch whose samples all need the
    same depth pays no indexing cost.
    """

    def __init__(self, z0: Tensor, context: Context, tol, max_iter, trace: bool) -> None:
        batch, device = z0.shape[0], z0.device
        self.index = torch.arange(batch, device=device)
        self.tol = per_sample(tol, batch, torch.float64, device)
        self.max_iter = per_sample(max_iter, batch, torch.int64, device)
        if batch and (self.max_iter < 1).any():
            raise ValueError("max_iter must be >= 1 for every sample")
        self.context = context
        self.out = z0.clone()
        self.iterations = torch.zeros(batch, dtype=torch.int64, device=device)
        self.residual = torch.full((batch,), float("nan"), dtype=z0.dtype, device=device)
        self.converged = torch.zeros(batch, dtype=torch.bool, device=device)
        self.limit = int(self.max_iter.max()) if batch else 0
        self.trace = (
            torch.full((self.limit, batch), float("nan"), dtype=z0.dtype, device=device)
            if trace
            else None
        )

    def record(self, k: int, z: Tensor, fz: Tensor, res: Tensor | None = None) -> Tensor | None:
        """Note iteration ``k`` (1-based) for the active rows, whose relative residual is ``res``
        (computed here when not given). Returns the keep-mask, or None when every active row is
        still running."""
        if res is None:
            res = relative_residual(fz, z)
        if self.trace is not None:
            self.trace[k - 1, self.index] = res
        finite = torch.isfinite(res)
        converged = res <= self.tol
        done = converged | ~finite | (self.max_iter <= k)
        if not bool(done.any()):
            return None
        rows = self.index[done]
        shape = (-1,) + (1,) * (fz.ndim - 1)
        self.out[rows] = torch.where(finite.view(shape), fz, z)[done]
        self.iterations[rows] = k
        self.residual[rows] = res[done]
        self.converged[rows] = converged[done]
        return ~done

    def keep(self, mask: Tensor) -> None:
        self.index = self.index[mask]
        self.tol = self.tol[mask]
        self.max_iter = self.max_iter[mask]
        self.context = tuple(c[mask] for c in self.context)

    @property
    def empty(self) -> bool:
        return self.index.numel() == 0

    def stats(self) -> SolverStats:
        return SolverStats(self.iterations, self.residual, self.converged, self.trace)


@torch.no_grad()
def picard_solve(
    f: FixedPointMap,
    z0: Tensor,
    *,
    context: Context = (),
    tol: float | Tensor = 1e-4,
    max_iter: int | Tensor = 50,
    damping: float = 1.0,
    trace: bool = False,
) -> tuple[Tensor, SolverStats]:
    """Picard iteration ``z ← (1 − α) z + α f(z)`` (Krasnoselskii–Mann when ``α = damping < 1``).

    Shapes: ``z0`` (B, ...), each context tensor (B, ...), ``tol``/``max_iter`` scalar or (B,).

    >>> import torch
    >>> A = torch.tensor([[0.5, 0.1], [0.0, 0.3]]); b = torch.tensor([1.0, 2.0])
    >>> z, s = picard_solve(lambda z: z @ A.T + b, torch.zeros(1, 2), tol=1e-10, max_iter=200)
    >>> torch.allclose(z[0], torch.linalg.solve(torch.eye(2) - A, b), atol=1e-6)
    True
    """
    if not 0.0 < damping <= 1.0:
        raise ValueError(f"damping must be in (0, 1], got {damping}")
    active = _ActiveSet(z0, tuple(context), tol, max_iter, trace)
    z = z0
    for k in range(1, active.limit + 1):
        fz = f(z, *active.context)
        keep = active.record(k, z, fz)
        z = fz if damping == 1.0 else torch.lerp(z, fz, damping)
        if keep is not None:
            active.keep(keep)
            if active.empty:
                break
            z = z[keep]
    return active.out, active.stats()


@torch.no_grad()
def anderson_solve(
    f: FixedPointMap,
    z0: Tensor,
    *,
    context: Context = (),
    tol: float | Tensor = 1e-4,
    max_iter: int | Tensor = 50,
    memory: int = 5,
    mixing: float = 1.0,
    regularization: float = 1e-4,
    trace: bool = False,
) -> tuple[Tensor, SolverStats]:
    """Anderson acceleration (type II) with memory ``m``, mixing ``β`` and Tikhonov ``λ``.

    Each step solves, per sample, ``min_α ‖Σ α_i g_i‖² + λ min_i ‖g_i‖² ‖α‖²`` s.t. ``Σ α_i = 1``
    (λ is relative, so the solver is scale-invariant like the residual) over the last
    ``m`` residuals ``g_i = f(x_i) − x_i`` and mixes ``x ← β Σ α_i f(x_i) + (1 − β) Σ α_i x_i``.
    Shapes as :func:`picard_solve`.

    >>> import torch
    >>> A = torch.tensor([[0.9, 0.05], [0.0, 0.8]]); b = torch.tensor([1.0, 2.0])
    >>> z, s = anderson_solve(lambda z: z @ A.T + b, torch.zeros(1, 2), tol=1e-10, max_iter=200)
    >>> torch.allclose(z[0], torch.linalg.solve(torch.eye(2) - A, b), atol=1e-5)
    True
    """
    if memory < 1:
        raise ValueError(f"memory must be >= 1, got {memory}")
    active = _ActiveSet(z0, tuple(context), tol, max_iter, trace)
    batch, shape = z0.shape[0], z0.shape[1:]
    if batch == 0:
        return active.out, active.stats()
    n = z0[0].numel()
    # Ring buffers over the last m iterates: images f(x_i) and residuals g_i = f(x_i) − x_i, and
    # the residuals' Gram matrix, updated by one row per step (m·n work, not m²·n). The iterates
    # x_i themselves are never needed: Σ α_i x_i = Σ α_i f(x_i) − Σ α_i g_i.
    F = z0.new_empty(batch, memory, n)
    G = z0.new_empty(batch, memory, n)
    gram = z0.new_zeros(batch, memory, memory)
    x = z0.reshape(batch, n)
    for k in range(1, active.limit + 1):
        fx = f(x.view(-1, *shape), *active.context).reshape(-1, n)
        g = fx - x
        res = _relative_residual_rows(fx, g)
        slot, used = (k - 1) % memory, min(k, memory)
        F[:, slot], G[:, slot] = fx, g
        row = torch.bmm(G[:, :used], g.unsqueeze(2)).squeeze(2)  # (A, used) g_i · g
        gram[:, slot, :used], gram[:, :used, slot] = row, row
        keep = active.record(k, x.view(-1, *shape), fx.view(-1, *shape), res)
        if keep is not None:
            active.keep(keep)
            if active.empty:
                break
            F, G, gram, fx = F[keep], G[keep], gram[keep], fx[keep]
        if used == 1:
            x = fx  # first step: plain Picard
            continue
        system = gram[:, :used, :used].clone()  # (A, used, used)
        # λ is relative to the smallest ‖g_i‖² (the residuals' current scale): an absolute λ swamps
        # the gram as residuals shrink, α tends to uniform weights and Anderson falls behind Picard.
        diag = system.diagonal(dim1=1, dim2=2)  # (A, used) ‖g_i‖²
        scale = diag.amin(1, keepdim=True).clamp_min(torch.finfo(diag.dtype).tiny)  # (A, 1)
        diag.add_(regularization * scale)
        # min αᵀ(GGᵀ + λI)α s.t. Σα = 1 is solved by α ∝ (GGᵀ + λI)⁻¹ 1. solve_ex: one sample's
        # singular system must not fail the batch, and it does not synchronise with a GPU.
        weights, info = torch.linalg.solve_ex(system, system.new_ones(system.shape[0], used, 1))
        alpha = (weights / weights.sum(1, keepdim=True)).transpose(1, 2)  # (A, 1, used)
        x = torch.bmm(alpha, F[:, :used]).squeeze(1)  # Σ α_i f(x_i); bmm: no (A, used, n) temporary
        if mixing != 1.0:  # β Σ α_i f(x_i) + (1 − β) Σ α_i x_i
            x = x - (1.0 - mixing) * torch.bmm(alpha, G[:, :used]).squeeze(1)
        # A failed or overflowing extrapolation costs that sample a plain step, never a NaN state.
        # (A non-finite entry makes the row sum non-finite: one reduction instead of isfinite(x).)
        ok = (info == 0) & torch.isfinite(x.sum(1))  # (A,)
        x = torch.where(ok[:, None], x, fx)
    return active.out, active.stats()


SOLVERS: dict[str, Callable[..., tuple[Tensor, SolverStats]]] = {
    "picard": picard_solve,
    "anderson": anderson_solve,
}


def get_solver(name: str) -> Callable[..., tuple[Tensor, SolverStats]]:
    """Look a solver up by name; unknown names list what exists."""
    try:
        return SOLVERS[name]
    except KeyError:
        raise ValueError(f"unknown solver {name!r}; available: {sorted(SOLVERS)}") from None
