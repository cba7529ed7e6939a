"""The solver loops in ONNX: one ``Loop`` node per stepper, following :mod:`models.solvers`.

Each loop runs the step graph on the rows still active, computes SPEC §5's residual
(:func:`models.onnx.graph.relative_residual`), applies :func:`models.solvers.stop_rule`, scatters
the rows that stop into the outputs and drops them from the loop-carried state (``Compress``), so
the work per iteration shrinks as samples converge, as in torch. The loop ends when no row is
left. Stepper kinds and their loops (:data:`LOOPS`):

- :class:`~models.solvers.Picard`: ``z ← (1 − α) z + α f(z)`` with the stepper's damping ``α``;
- :class:`~models.solvers.Anderson`: memory, mixing and regularisation of the stepper;
  the ``m × m`` systems use onnxruntime's ``com.microsoft.Inverse`` (CPU and CUDA kernels);
- :class:`~models.solvers.FixedDepth`: exactly ``depth`` applications of ``f``, ``tol`` and
  ``max_iter`` ignored, a row converged when finite (its residual: that of the last step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..solvers import Anderson, FixedDepth, Picard, Stepper
from .graph import Graph, Names, not_finite, relative_residual, tensor, value_info

if TYPE_CHECKING:  # pragma: no cover
    import onnx


@dataclass(frozen=True)
class LoopStart:
    """Names of the values a loop starts from: ``z0`` (B, *S), the ``context``, ``tol`` (B,)
    float64, ``max_iter`` (B,) int64, ``index`` (B,) int64 row numbers, and ``batch`` (1,)."""

    z0: str
    context: str
    tol: str
    max_iter: str
    index: str
    batch: str


@dataclass(frozen=True)
class _Carried:
    """Names of the loop-carried values inside a body."""

    z: str
    context: str
    index: str
    tol: str
    max_iter: str
    out: str
    iterations: str
    residual: str
    converged: str


def _record(
    g: Graph, s: _Carried, k: str, z: str, fz: str, rank: int, *, fixed: bool, diff: str | None
) -> tuple[str, ...]:
    """:func:`models.solvers.stop_rule` and the scatter of the rows that stop: a row stops when it
    converged (``fixed``: never early), when its residual is not finite (keeping its last finite
    iterate) or at its ``max_iter``. Returns (keep mask, out, iterations, residual, converged)."""
    res = relative_residual(g, fz, z, diff)
    bad = not_finite(g, res)
    if fixed:
        converged = g.op("Not", bad)
        done = g.op("Or", bad, g.op("LessOrEqual", s.max_iter, k))
    else:
        converged = g.op("LessOrEqual", g.op("Cast", res, to=11), s.tol)  # float64, as torch
        done = g.op("Or", g.op("Or", converged, bad), g.op("LessOrEqual", s.max_iter, k))

    def finished(value: str) -> str:
        return g.op("Compress", value, done, axis=0)

    rows = g.op("Unsqueeze", finished(s.index), g.const([1], np.int64))  # (D, 1)
    shape = g.const([-1] + [1] * (rank - 1), np.int64)
    last = g.op("Where", g.op("Reshape", finished(bad), shape), finished(z), finished(fz))
    out = g.op("ScatterND", s.out, rows, last)
    count = g.op("Expand", k, g.op("Shape", rows, end=1))
    iterations = g.op("ScatterND", s.iterations, rows, count)
    residual = g.op("ScatterND", s.residual, rows, finished(res))
    conv = g.op("ScatterND", s.converged, rows, finished(converged))
    return g.op("Not", done), out, iterations, residual, conv


def _picard_update(
    g: Graph, stepper: Picard | FixedDepth, step: onnx.ModelProto, s: _Carried, k: str, rank: int
) -> tuple[tuple[str, ...], str, list[str]]:
    """One Picard (or fixed-depth) step. Returns (record, next state of the kept rows, [])."""
    (fz,) = g.inline(step, {"z": s.z, "qx": s.context}, "step")
    fixed = isinstance(stepper, FixedDepth)
    record = _record(g, s, k, s.z, fz, rank, fixed=fixed, diff=None)
    z_next = fz
    damping = 1.0 if isinstance(stepper, FixedDepth) else stepper.damping
    if damping != 1.0:
        z_next = g.op("Add", s.z, g.op("Mul", g.const(damping), g.op("Sub", fz, s.z)))
    return record, g.op("Compress", z_next, record[0], axis=0), []


def _anderson_update(
    g: Graph,
    stepper: Anderson,
    step: onnx.ModelProto,
    s: _Carried,
    k: str,
    state_shape: tuple[int, ...],
    history: list[str],
) -> tuple[tuple[str, ...], str, list[str]]:
    """One Anderson step on the flattened state ``x`` (A, n). The history keeps the last ``m``
    images ``f(x_i)`` and residuals ``g_i = f(x_i) − x_i`` (torch keeps the residuals' Gram
    matrix too; the graph recomputes it: the same numbers). Returns (record, next x, [G, F])."""
    n = int(np.prod(state_shape))
    x = s.z
    shaped = g.op("Reshape", x, g.const([-1, *state_shape], np.int64))
    (fx_shaped,) = g.inline(step, {"z": shaped, "qx": s.context}, "step")
    fx = g.op("Reshape", fx_shaped, g.const([-1, n], np.int64))
    gx = g.op("Sub", fx, x)
    m = stepper.memory
    one = g.const([1], np.int64)
    window = (g.const([1 - m], np.int64), g.const([2**62], np.int64), one)

    def push(past: str, value: str) -> str:  # (A, u, n) -> (A, min(u + 1, m), n)
        kept = g.op("Slice", past, *window) if m > 1 else None
        new = g.op("Unsqueeze", value, one)
        return g.op("Concat", kept, new, axis=1) if kept else new

    G, F = push(history[0], gx), push(history[1], fx)
    record = _record(g, s, k, x, fx, 2, fixed=False, diff=gx)
    G, F, fx = (g.op("Compress", v, record[0], axis=0) for v in (G, F, fx))
    return record, _anderson_mix(g, G, F, fx, stepper), [G, F]


def _anderson_mix(g: Graph, G: str, F: str, fx: str, stepper: Anderson) -> str:
    """:class:`~models.solvers.Anderson`'s extrapolation for the kept rows. G, F: (A, u, n);
    fx: (A, n). λ is relative to the smallest ``‖g_i‖²``, as in torch."""
    gram = g.op("MatMul", G, g.op("Transpose", G, perm=[0, 2, 1]))  # (A, u, u)
    u = g.op("Shape", gram, start=1, end=2)
    zeros = g.op("ConstantOfShape", g.op("Concat", u, u, axis=0),
                 value=tensor(np.zeros(1, np.float32)))  # fmt: skip
    eye = g.op("EyeLike", zeros)
    diag = g.op("ReduceSum", g.op("Mul", gram, eye), g.const([2], np.int64), keepdims=0)  # (A, u)
    scale = g.op("ReduceMin", diag, g.const([1], np.int64), keepdims=1)  # (A, 1)
    scale = g.op("Max", scale, g.const(np.finfo(np.float32).tiny))
    lam = g.op("Mul", scale, g.const(stepper.regularization))
    gram = g.op("Add", gram, g.op("Mul", eye, g.op("Unsqueeze", lam, g.const([2], np.int64))))
    inverse = g.op("Inverse", gram, domain="com.microsoft")
    weights = g.op("ReduceSum", inverse, g.const([2], np.int64), keepdims=1)  # (A, u, 1)
    alpha = g.op("Div", weights, g.op("ReduceSum", weights, g.const([1], np.int64), keepdims=1))
    axis1 = g.const([1], np.int64)
    mixed = g.op("ReduceSum", g.op("Mul", alpha, F), axis1, keepdims=0)  # (A, n)
    if stepper.mixing != 1.0:  # β Σ α_i f(x_i) + (1 − β) Σ α_i x_i
        X = g.op("Sub", F, G)  # past iterates x_i
        mixed_x = g.op("ReduceSum", g.op("Mul", alpha, X), axis1, keepdims=0)
        mixed = g.op(
            "Add", mixed_x, g.op("Mul", g.const(stepper.mixing), g.op("Sub", mixed, mixed_x))
        )
    # A failed or overflowing extrapolation costs that sample a plain step, never a NaN state.
    bad = g.op("ReduceMax", g.op("Cast", not_finite(g, mixed), to=1), axis1, keepdims=1)
    return g.op("Where", g.op("Greater", bad, g.const(0.0)), fx, mixed)


LOOPS: dict[type[Stepper], str] = {
    Picard: "picard",
    Anderson: "anderson",
    FixedDepth: "fixed-depth",
}
"""The stepper kinds the graph runs (by class), with the stem of their loop's value names."""


def solver_loop(
    names: Names,
    stepper: Stepper,
    step: onnx.ModelProto,
    state_shape: tuple[int, ...],
    start: LoopStart,
) -> tuple[list[onnx.NodeProto], list[str]]:
    """One ``Loop`` node (and the nodes feeding it) running ``stepper`` from ``start``.
    Returns (nodes, [z*, iterations, residual, converged])."""
    from onnx import TensorProto as TP
    from onnx import helper

    stem = LOOPS[type(stepper)]
    flat = isinstance(stepper, Anderson)  # Anderson runs on (A, n) rows with a history
    rank = 1 + len(state_shape)
    state_rank = 2 if flat else rank
    n = int(np.prod(state_shape))
    outer, body = Graph(names), Graph(names, local=True)

    def inp(name: str) -> str:
        return names.new(f"{stem}_{name}")

    i, cond = inp("i"), inp("cond")
    fields = ("z", "context", "index", "tol", "max_iter", "out", "iterations", "residual",
              "converged")  # fmt: skip
    s = _Carried(*(inp(k) for k in fields))
    elems = [TP.FLOAT, TP.FLOAT, TP.INT64, TP.DOUBLE, TP.INT64, TP.FLOAT, TP.INT64, TP.FLOAT,
             TP.BOOL]  # fmt: skip
    ranks = [state_rank, None, 1, 1, 1, state_rank, 1, 1, 1]
    history = [inp("G"), inp("F")] if flat else []
    body_inputs = [value_info(i, TP.INT64, 0), value_info(cond, TP.BOOL, 0)]
    body_inputs += [value_info(v, e, r) for v, e, r in zip(s.__dict__.values(), elems, ranks,
                                                           strict=True)]  # fmt: skip
    body_inputs += [value_info(h, TP.FLOAT, 3) for h in history]

    k = body.op("Add", i, body.const(1, np.int64))  # applications of f after this step
    if isinstance(stepper, Anderson):
        record, x_next, history_next = _anderson_update(body, stepper, step, s, k, state_shape,
                                                        history)  # fmt: skip
    elif isinstance(stepper, Picard | FixedDepth):
        record, x_next, history_next = _picard_update(body, stepper, step, s, k, rank)
    else:  # unreachable: LOOPS has no other kind
        raise TypeError(f"no loop for a {type(stepper).__name__} step")
    keep, out, iterations, residual, conv = record
    carried = [x_next] + [
        body.op("Compress", v, keep, axis=0) for v in (s.context, s.index, s.tol, s.max_iter)
    ]
    go_on = body.op("Greater", body.op("Size", carried[2]), body.const(0, np.int64))
    body_outputs = [go_on, *carried, out, iterations, residual, conv, *history_next]
    out_elems = [TP.BOOL, *elems, TP.FLOAT, TP.FLOAT]
    out_ranks = [0, *ranks, 3, 3]
    # Every output is computed in the body (no pass-through), so no Identity copies are needed.
    graph = helper.make_graph(
        body.nodes,
        f"{stem}_body",
        body_inputs,
        [value_info(v, e, r) for v, e, r in zip(body_outputs, out_elems, out_ranks, strict=False)],
        initializer=body.initializers,
    )

    z0, max_iter = start.z0, start.max_iter
    if flat:
        z0 = outer.op("Reshape", z0, outer.const([-1, n], np.int64))
    if isinstance(stepper, FixedDepth):  # every row runs exactly depth steps, as in torch
        max_iter = outer.op("Expand", outer.const(stepper.depth, np.int64), start.batch)
        trip = outer.const(stepper.depth, np.int64)
    else:  # the largest max_iter (0 for an empty batch)
        budgets = outer.op("Concat", outer.const([0], np.int64), max_iter, axis=0)
        trip = outer.op("ReduceMax", budgets, keepdims=0)
    go = outer.op("Greater", outer.op("Size", start.index), outer.const(0, np.int64))

    def filled(value: np.ndarray) -> str:
        return outer.op("ConstantOfShape", start.batch, value=tensor(value))

    loop_inputs = [trip, go, z0, start.context, start.index, start.tol, max_iter, z0,
                   filled(np.zeros(1, np.int64)), filled(np.full(1, np.nan, np.float32)),
                   filled(np.zeros(1, np.bool_))]  # fmt: skip
    if flat:
        empty = outer.op("Concat", start.batch, outer.const([0, n], np.int64), axis=0)
        history0 = outer.op("ConstantOfShape", empty, value=tensor(np.zeros(1, np.float32)))
        loop_inputs += [history0, history0]
    results = outer.op("Loop", *loop_inputs, outputs=len(loop_inputs) - 2, body=graph)
    z_star, iters, res, conv = results[5:9]
    if flat:
        z_star = outer.op("Reshape", z_star, outer.const([-1, *state_shape], np.int64))
    return outer.nodes, [z_star, iters, res, conv]
