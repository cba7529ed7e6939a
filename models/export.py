"""ONNX export with adaptive depth kept: one ``model.onnx`` that runs the whole solve.

The graph has the interface of :meth:`ImplicitClassifier.predict`::

    inputs   x         float32 (B, *input.shape)  raw intensities in [0, 1]
             tol       float64 (B,)               per-sample tolerance
             max_iter  int64   (B,)               per-sample iteration budget
             solver    int64   ()                 index into SOLVER_NAMES (picard 0, anderson 1);
                                                  optional, defaults to the checkpoint's method
    outputs  logits         float32 (B, classes)
             probabilities  float32 (B, classes)  softmax of the logits
             iterations     int64   (B,)          applications of T per sample
             residual       float32 (B,)          SPEC §5 relative residual (NaN when diverged)
             converged      bool    (B,)
             <extras>       family outputs, e.g. certified_radius_linf float32 (B,)

How it is built. torch exports the model's three parts as separate graphs (the dynamo exporter):
the *prologue* ``x -> (Q(x), z0)``, the *step* ``(z, Q(x)) -> T(z; Q(x))`` with its weights
normalised once, and the *epilogue* ``(z*, Q(x)) -> (logits, extras)``. This module then writes
the solver around them in ONNX: an ``If`` on ``solver`` selects one of two ``Loop`` nodes
(Picard with damping, Anderson with memory, mixing and regularisation as in the checkpoint's
config) whose body inlines the step graph. ``Q(x)`` is computed once, before the loop.

The loops follow :mod:`models.solvers` exactly (SPEC §5): the residual
``‖T(z) − z‖ / max(‖T(z)‖, 1e-12)`` per sample (non-finite when ``‖T(z)‖`` overflows), compared in
float64 with that sample's ``tol``; a sample stops when it converges, when its residual is not
finite (keeping its last finite iterate) or after ``max_iter`` applications of ``T``. Finished
rows are scattered into the outputs and dropped from the loop-carried state (``Compress``), so the
work per iteration shrinks as samples converge, as in torch; the loop ends when no row is left.
Anderson's ``m × m`` systems are solved with onnxruntime's ``com.microsoft.Inverse`` (CPU and
CUDA kernels), so the file needs onnxruntime, not just any ONNX runtime.

Families: ``fpn``, ``deq``, ``opteq``, ``skip-deq`` (``z0`` from its predictor or ``T(0; Qx)``)
and ``linf`` (the solve runs on the implicit block; ``certified_radius_linf`` is an output) export
this way; ``explicit`` exports its fixed ``arch.depth`` applications of ``T`` unrolled (``tol``,
``max_iter`` and ``solver`` are accepted and ignored, as in torch). ``cdeq`` does not export: its
solve is an adaptive Runge–Kutta integration (:data:`UNSUPPORTED`).

The file is self-contained (weights inside, no external data) and carries metadata
(``fpn.*`` properties) including fingerprints of the checkpoint it came from, so a runtime can
refuse a ``model.onnx`` that no longer matches ``model.safetensors`` (:func:`check_fresh`).

onnx and onnxruntime are imported only by the functions that need them: importing this module
costs nothing beyond torch.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from .checkpoint import CONFIG_FILE, ONNX_FILE, WEIGHTS_FILE, _atomic_write, load_checkpoint
from .config import ModelConfig
from .implicit import ExplicitClassifier, ImplicitClassifier
from .linf import LinfClassifier, average_step_size

if TYPE_CHECKING:  # pragma: no cover
    import onnx

EXPORT_VERSION = 1
OPSET = 20
SOLVER_NAMES = ("picard", "anderson")  # the ``solver`` input is an index into this tuple
INPUTS = ("x", "tol", "max_iter", "solver")
OUTPUTS = ("logits", "probabilities", "iterations", "residual", "converged")

UNSUPPORTED = {
    "cdeq": "its forward solve is an adaptive Runge–Kutta integration of dz/dt = T(z) − z with "
    "per-sample step sizes and accept/reject decisions, which the exported solver loop does not "
    "implement",
}
"""Families that cannot be exported, with the reason (used in error messages)."""


class ExportError(Exception):
    """The checkpoint cannot be exported, or the export does not match torch."""


# --- what to export ----------------------------------------------------------------------------
@dataclass
class _Plan:
    """A model cut into exportable parts.

    ``iterative``: the parts are prologue ``x -> (qx, z0)``, step ``(z, qx) -> f(z)`` and epilogue
    ``(z, qx) -> (logits, *extras)``, with the solver between them. Otherwise (``explicit``)
    ``whole`` is ``x -> (logits, residual, *extras)`` and ``depth`` its fixed iteration count.
    """

    iterative: bool
    state_shape: tuple[int, ...] = ()
    prologue: nn.Module | None = None
    step: nn.Module | None = None
    epilogue: nn.Module | None = None
    whole: nn.Module | None = None
    depth: int = 0
    damping: float = 1.0
    anderson: dict[str, float] = field(default_factory=dict)
    extras: tuple[str, ...] = ()


class _Fn(nn.Module):
    """A module around a function, so that torch.export can trace it."""

    def __init__(self, model: nn.Module, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.model = model  # registers the parameters the function reads
        self.fn = fn

    def forward(self, *args: Tensor) -> Any:
        return self.fn(*args)


def check_exportable(config: ModelConfig) -> None:
    """Raise :class:`ExportError` when ``config.family`` has no ONNX export (no model built)."""
    if config.family in UNSUPPORTED:
        raise ExportError(
            f"family {config.family!r} cannot be exported to ONNX: "
            f"{UNSUPPORTED[config.family]}; serve it with FPN_BACKEND=torch"
        )


def _plan(model: ImplicitClassifier) -> _Plan:
    check_exportable(model.config)
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes != {torch.float32}:
        raise ExportError(f"the exported graph is float32; the model is {sorted(map(str, dtypes))}")
    model.eval()
    solver = model.config.solver
    anderson = {
        "memory": int(solver.memory),
        "mixing": float(solver.mixing),
        "regularization": float(solver.regularization),
    }
    probe_x = torch.rand(2, *model.config.input.shape)
    with torch.no_grad():
        T = model.prepare_operator()  # weights normalised once, as in predict()
        extras = tuple(model.predict(probe_x, max_iter=2).extras)

    def epilogue_outputs(logits: Tensor) -> tuple[Tensor, ...]:
        found = model.prediction_extras(logits)
        return (logits, *(found[k] for k in extras))

    if isinstance(model, ExplicitClassifier):
        depth = model.config.arch.depth

        def whole(x: Tensor) -> tuple[Tensor, ...]:
            qx = model.inject(x)
            z = model.initial_state(x, qx)
            for _ in range(depth):
                z = T(z, qx)
            residual = _relative_residual(T(z, qx), z)
            logits, *rest = epilogue_outputs(model.readout(z))
            return (logits, residual, *rest)

        return _Plan(False, whole=_Fn(model, whole), depth=depth, extras=extras)

    if isinstance(model, LinfClassifier):
        n = model.width
        damping = min(average_step_size(model.operator.matrix().detach()), float(solver.damping))

        def prologue(x: Tensor) -> tuple[Tensor, Tensor]:
            qx = model.inject(x)
            return qx, model.initial_state(x, qx)[:, :n]

        def step(z: Tensor, qx: Tensor) -> Tensor:
            return T(torch.cat([z, qx[:, n:]], dim=1), qx)[:, :n]

        def epilogue(z: Tensor, qx: Tensor) -> tuple[Tensor, ...]:
            return epilogue_outputs(model.readout(torch.cat([z, qx[:, n:]], dim=1)))

        state_shape: tuple[int, ...] = (n,)
    else:
        if type(model).solve_fixed_point is not ImplicitClassifier.solve_fixed_point:
            raise ExportError(
                f"family {model.config.family!r} cannot be exported to ONNX: "
                f"{type(model).__name__} overrides solve_fixed_point, and the exported loop "
                "only runs the library's picard/anderson solvers; serve it with FPN_BACKEND=torch"
            )
        damping = float(solver.damping)

        def prologue(x: Tensor) -> tuple[Tensor, Tensor]:
            qx = model.inject(x)
            return qx, model.initial_state(x, qx)

        def step(z: Tensor, qx: Tensor) -> Tensor:
            return T(z, qx)

        def epilogue(z: Tensor, qx: Tensor) -> tuple[Tensor, ...]:
            return epilogue_outputs(model.readout(z))

        with torch.no_grad():
            state_shape = tuple(prologue(probe_x)[1].shape[1:])

    return _Plan(
        True,
        state_shape=state_shape,
        prologue=_Fn(model, prologue),
        step=_Fn(model, step),
        epilogue=_Fn(model, epilogue),
        damping=damping,
        anderson=anderson,
        extras=extras,
    )


def _relative_residual(fz: Tensor, z: Tensor) -> Tensor:
    """As :func:`models.solvers.relative_residual` (restated with exportable ops)."""
    fz_flat, z_flat = fz.reshape(fz.shape[0], -1), z.reshape(z.shape[0], -1)
    norm = torch.linalg.vector_norm(fz_flat, dim=1)
    res = torch.linalg.vector_norm(fz_flat - z_flat, dim=1) / norm.clamp_min(1e-12)
    return torch.where(torch.isfinite(norm), res, torch.full_like(res, float("nan")))


# --- torch -> ONNX for one part -----------------------------------------------------------------
def _export_part(
    module: nn.Module, args: tuple[Tensor, ...], inputs: list[str], outputs: list[str]
) -> onnx.ModelProto:
    """One part as an ONNX model (dynamic batch), through torch's dynamo exporter."""
    import onnx
    import onnx.inliner

    batch = torch.export.Dim.DYNAMIC
    dynamic = (tuple({0: batch} for _ in args),)  # forward(*args): one varargs tuple
    quiet = logging.getLogger("torch.onnx")  # "torchvision is not installed" and the like
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                module.eval(),
                args,
                dynamo=True,
                input_names=inputs,
                output_names=outputs,
                dynamic_shapes=dynamic,
                opset_version=OPSET,
                external_data=False,
                optimize=True,
                verbose=False,
            )
        finally:
            quiet.setLevel(level)
    proto = program.model_proto
    if proto.functions:
        proto = onnx.inliner.inline_local_functions(proto)
    _transposed_conv_as_conv(proto.graph)
    return proto


def _transposed_conv_as_conv(graph: onnx.GraphProto) -> None:
    """Rewrite stride-1 ``ConvTranspose`` nodes with constant weights as ``Conv`` (in place).

    ``conv_transpose2d(z, W, padding=p)`` with stride 1 is ``conv2d(z, W', padding=k − 1 − p)``
    with ``W'`` the kernel flipped in space and with its channel axes swapped: the same products,
    summed in another order. onnxruntime's CPU ``ConvTranspose`` is a GEMM plus col2im, several
    times slower than its ``Conv`` (which gets the NCHWc layout), and the ``opteq`` operator
    applies one per iteration (``W = γ (K + Kᵀ)/2``).
    """
    from onnx import helper, numpy_helper

    weights = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type != "ConvTranspose" or len(node.input) < 2 or node.input[1] not in weights:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        kernel = numpy_helper.to_array(weights[node.input[1]])  # (C_in, C_out / g, kH, kW)
        k = kernel.shape[2:]
        pads = list(attrs.get("pads", [0] * 2 * len(k)))
        if (
            attrs.get("group", 1) != 1
            or any(v != 1 for v in attrs.get("strides", [1] * len(k)))
            or any(v != 1 for v in attrs.get("dilations", [1] * len(k)))
            or any(attrs.get("output_padding", [0] * len(k)))
            or "output_shape" in attrs
            or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")
            or any(p > kk - 1 for p, kk in zip(pads, list(k) * 2, strict=True))
        ):
            continue
        flipped = np.ascontiguousarray(
            np.flip(kernel, axis=tuple(range(2, kernel.ndim))).swapaxes(0, 1)
        )
        name = f"{node.input[1]}_as_conv"
        if name not in weights:
            weights[name] = numpy_helper.from_array(flipped, name)
            graph.initializer.append(weights[name])
        conv_pads = [kk - 1 - p for p, kk in zip(pads, list(k) * 2, strict=True)]
        replacement = helper.make_node(
            "Conv", [node.input[0], name, *node.input[2:]], list(node.output), name=node.name,
            kernel_shape=list(k), pads=conv_pads,
        )  # fmt: skip
        node.CopyFrom(replacement)


# --- ONNX graph building ----------------------------------------------------------------------
class _Graph:
    """Nodes of one (sub)graph. Value names are unique across the whole model (``names``)."""

    def __init__(self, names: _Names, *, local: bool = False) -> None:
        self.names = names
        self.nodes: list[onnx.NodeProto] = []
        # local: inlined parts keep their weights in this graph (a loop body), where
        # onnxruntime's layout optimisations see them as constants.
        self.local = local
        self.initializers: list[onnx.TensorProto] = []
        self._local_names: dict[tuple[int, str], str] = {}

    def op(self, op_type: str, *inputs: str, outputs: int = 1, domain: str = "", **attrs):
        from onnx import helper

        outs = [self.names.new(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(
            helper.make_node(
                op_type, list(inputs), outs, name=self.names.new(f"n_{op_type}"), domain=domain,
                **attrs,
            )
        )  # fmt: skip
        return outs[0] if outputs == 1 else outs

    def const(self, value: Any, dtype: Any = np.float32) -> str:
        return self.names.const(np.asarray(value, dtype=dtype))

    def inline(self, part: onnx.ModelProto, inputs: dict[str, str], prefix: str) -> list[str]:
        """Copy ``part``'s nodes here, its graph inputs bound to ``inputs``. Its initializers
        become initializers of this graph (``local``) or of the model, once per part whatever the
        number of copies. Returns the names of its outputs, in order."""
        import onnx

        graph = part.graph
        rename = dict(inputs)
        for init in graph.initializer:
            if self.local:
                key = (id(part), init.name)
                if key not in self._local_names:
                    copy = onnx.TensorProto()
                    copy.CopyFrom(init)
                    copy.name = self.names.new(f"{prefix}_{init.name}")
                    self.initializers.append(copy)
                    self._local_names[key] = copy.name
                rename[init.name] = self._local_names[key]
            else:
                rename[init.name] = self.names.initializer(part, init, prefix)
        for node in graph.node:
            for attr in node.attribute:
                if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                    raise ExportError(
                        f"the exported {prefix} graph has control flow ({node.op_type})"
                    )
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            del copy.input[:]
            del copy.output[:]
            for name in node.input:
                if name and name not in rename:
                    rename[name] = self.names.new(f"{prefix}_{name}")
                copy.input.append(rename[name] if name else "")
            for name in node.output:
                if name:
                    rename[name] = self.names.new(f"{prefix}_{name}")
                copy.output.append(rename[name] if name else "")
            copy.name = self.names.new(f"{prefix}_{node.op_type}")
            self.nodes.append(copy)
        return [rename[o.name] for o in graph.output]


class _Names:
    """Unique value names and the model's initializers."""

    def __init__(self) -> None:
        self.count = 0
        self.initializers: list[onnx.TensorProto] = []
        self._shared: dict[tuple[int, str], str] = {}

    def new(self, stem: str) -> str:
        self.count += 1
        return f"{stem.replace('.', '_')}_{self.count}"

    def const(self, array: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.new("c")
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def initializer(self, part: onnx.ModelProto, init: onnx.TensorProto, prefix: str) -> str:
        import onnx

        key = (id(part), init.name)
        if key not in self._shared:
            copy = onnx.TensorProto()
            copy.CopyFrom(init)
            copy.name = self.new(f"{prefix}_{init.name}")
            self.initializers.append(copy)
            self._shared[key] = copy.name
        return self._shared[key]


def _not_finite(g: _Graph, value: str) -> str:
    return g.op("Or", g.op("IsNaN", value), g.op("IsInf", value))


def _residual(g: _Graph, fz: str, z: str, diff: str | None = None) -> str:
    """(A, ...) x 2 -> (A,) float32, as ``models.solvers.relative_residual``. ``diff``: ``fz − z``
    when the caller has it already (same shape as ``fz``)."""
    fz_flat = g.op("Flatten", fz, axis=1)
    diff = g.op("Flatten", diff if diff is not None else g.op("Sub", fz, z), axis=1)
    axes = g.const([1], np.int64)
    norm = g.op("ReduceL2", fz_flat, axes, keepdims=0)
    res = g.op("Div", g.op("ReduceL2", diff, axes, keepdims=0), g.op("Max", norm, g.const(1e-12)))
    return g.op("Where", _not_finite(g, norm), g.const(np.nan), res)


@dataclass
class _LoopState:
    """Names of the loop-carried values inside a body."""

    z: str
    qx: str
    index: str
    tol: str
    max_iter: str
    out: str
    iterations: str
    residual: str
    converged: str


def _record(
    g: _Graph, s: _LoopState, k: str, z: str, fz: str, rank: int, diff: str | None = None
) -> tuple[str, ...]:
    """``_ActiveSet.record``: residual, stopping rule, finished rows scattered into the outputs.
    Returns (keep mask, new out, iterations, residual, converged)."""
    res = _residual(g, fz, z, diff)
    bad = _not_finite(g, res)
    converged = g.op("LessOrEqual", g.op("Cast", res, to=11), s.tol)  # float64 comparison
    done = g.op("Or", g.op("Or", converged, bad), g.op("LessOrEqual", s.max_iter, k))

    def finished(value: str) -> str:
        return g.op("Compress", value, done, axis=0)

    rows = g.op("Unsqueeze", finished(s.index), g.const([1], np.int64))  # (D, 1)
    shape = g.const([-1] + [1] * (rank - 1), np.int64)
    last = g.op("Where", g.op("Reshape", finished(bad), shape), finished(z), finished(fz))
    out = g.op("ScatterND", s.out, rows, last)  # a diverged row keeps its last finite iterate
    count = g.op("Expand", k, g.op("Shape", rows, end=1))
    iterations = g.op("ScatterND", s.iterations, rows, count)
    residual = g.op("ScatterND", s.residual, rows, finished(res))
    conv = g.op("ScatterND", s.converged, rows, finished(converged))
    return g.op("Not", done), out, iterations, residual, conv


def _value_info(name: str, elem: int, rank: int | None):
    from onnx import helper

    shape = None if rank is None else [None] * rank
    return helper.make_tensor_value_info(name, elem, shape)


def _solver_loop(
    names: _Names,
    plan: _Plan,
    step: onnx.ModelProto,
    method: str,
    start: dict[str, str],
) -> tuple[list[onnx.NodeProto], list[str]]:
    """One ``Loop`` node (and the nodes feeding it) running ``method`` from ``start``.

    ``start``: z0 (B, *S), qx, tol, max_iter, index (B,) int64, trip (max of max_iter), cond.
    Returns (nodes, [z*, iterations, residual, converged]).
    """
    from onnx import TensorProto as TP
    from onnx import helper

    outer = _Graph(names)
    body = _Graph(names, local=True)
    rank = 1 + len(plan.state_shape)
    n = int(np.prod(plan.state_shape))
    anderson = method == "anderson"
    state_rank = 2 if anderson else rank

    def inp(stem: str) -> str:
        return names.new(f"{method}_{stem}")

    i, cond = inp("i"), inp("cond")
    s = _LoopState(*(inp(k) for k in (
        "z", "qx", "index", "tol", "max_iter", "out", "iterations", "residual", "converged",
    )))  # fmt: skip
    body_inputs = [
        _value_info(i, TP.INT64, 0),
        _value_info(cond, TP.BOOL, 0),
        _value_info(s.z, TP.FLOAT, state_rank),
        _value_info(s.qx, TP.FLOAT, None),
        _value_info(s.index, TP.INT64, 1),
        _value_info(s.tol, TP.DOUBLE, 1),
        _value_info(s.max_iter, TP.INT64, 1),
        _value_info(s.out, TP.FLOAT, state_rank),
        _value_info(s.iterations, TP.INT64, 1),
        _value_info(s.residual, TP.FLOAT, 1),
        _value_info(s.converged, TP.BOOL, 1),
    ]
    if anderson:
        hist_g, hist_f = inp("G"), inp("F")
        body_inputs += [_value_info(hist_g, TP.FLOAT, 3), _value_info(hist_f, TP.FLOAT, 3)]

    g = body
    k = g.op("Add", i, g.const(1, np.int64))
    if anderson:
        # x: (A, n) flattened state; the step sees (A, *S). The history keeps the last m images
        # f(x_i) and residuals g_i = f(x_i) − x_i (torch keeps x_i and subtracts each step:
        # the same numbers, one subtraction fewer).
        x = s.z
        shaped = g.op("Reshape", x, g.const([-1, *plan.state_shape], np.int64))
        (fx_shaped,) = g.inline(step, {"z": shaped, "qx": s.qx}, "step")
        fx = g.op("Reshape", fx_shaped, g.const([-1, n], np.int64))
        gx = g.op("Sub", fx, x)
        m = plan.anderson["memory"]
        one = g.const([1], np.int64)
        window = (g.const([1 - m], np.int64), g.const([2**62], np.int64), one)

        def push(history: str, value: str) -> str:  # (A, u, n) -> (A, min(u + 1, m), n)
            kept = g.op("Slice", history, *window) if m > 1 else None
            new = g.op("Unsqueeze", value, one)
            return g.op("Concat", kept, new, axis=1) if kept else new

        G, F = push(hist_g, gx), push(hist_f, fx)
        keep, out, iterations, residual, conv = _record(g, s, k, x, fx, 2, gx)
        G, F, fx = (g.op("Compress", v, keep, axis=0) for v in (G, F, fx))
        x_next = _anderson_mix(g, G, F, fx, plan.anderson)
    else:
        (fz,) = g.inline(step, {"z": s.z, "qx": s.qx}, "step")
        keep, out, iterations, residual, conv = _record(g, s, k, s.z, fz, rank)
        z_next = fz
        if plan.damping != 1.0:
            z_next = g.op("Add", s.z, g.op("Mul", g.const(plan.damping), g.op("Sub", fz, s.z)))
        x_next = g.op("Compress", z_next, keep, axis=0)
    carried = [x_next] + [
        g.op("Compress", v, keep, axis=0) for v in (s.qx, s.index, s.tol, s.max_iter)
    ]
    go_on = g.op("Greater", g.op("Size", carried[2]), g.const(0, np.int64))
    body_outputs = [go_on, *carried, out, iterations, residual, conv]
    if anderson:
        body_outputs += [G, F]
    ranks = [0, state_rank, None, 1, 1, 1, state_rank, 1, 1, 1, 3, 3]
    elems = [TP.BOOL, TP.FLOAT, TP.FLOAT, TP.INT64, TP.DOUBLE, TP.INT64, TP.FLOAT, TP.INT64,
             TP.FLOAT, TP.BOOL, TP.FLOAT, TP.FLOAT]  # fmt: skip
    # Every output is computed in the body (no pass-through), so no Identity copies are needed.
    graph = helper.make_graph(
        body.nodes,
        f"{method}_body",
        body_inputs,
        [_value_info(v, e, r) for v, e, r in zip(body_outputs, elems, ranks, strict=False)],
        initializer=body.initializers,
    )

    z0 = start["z0"]
    if anderson:
        z0 = outer.op("Reshape", z0, outer.const([-1, n], np.int64))
    batch = outer.op("Shape", start["index"])
    out0 = z0
    iterations0 = outer.op("ConstantOfShape", batch, value=_tensor(np.zeros(1, np.int64)))
    residual0 = outer.op("ConstantOfShape", batch, value=_tensor(np.full(1, np.nan, np.float32)))
    converged0 = outer.op("ConstantOfShape", batch, value=_tensor(np.zeros(1, np.bool_)))
    loop_inputs = [start["trip"], start["cond"], z0, start["qx"], start["index"], start["tol"],
                   start["max_iter"], out0, iterations0, residual0, converged0]  # fmt: skip
    if anderson:
        empty = outer.op("Concat", batch, outer.const([0, n], np.int64), axis=0)
        hist0 = outer.op("ConstantOfShape", empty, value=_tensor(np.zeros(1, np.float32)))
        loop_inputs += [hist0, hist0]
    results = outer.op("Loop", *loop_inputs, outputs=len(loop_inputs) - 2, body=graph)
    z_star, iters, res, conv = results[5:9]
    if anderson:
        z_star = outer.op("Reshape", z_star, outer.const([-1, *plan.state_shape], np.int64))
    return outer.nodes, [z_star, iters, res, conv]


def _anderson_mix(g: _Graph, G: str, F: str, fx: str, options: dict[str, float]) -> str:
    """``anderson_solve``'s extrapolation for the active rows. G, F: (A, u, n); fx: (A, n)."""
    gram = g.op("MatMul", G, g.op("Transpose", G, perm=[0, 2, 1]))  # (A, u, u)
    u = g.op("Shape", gram, start=1, end=2)
    eye = g.op("EyeLike", g.op("ConstantOfShape", g.op("Concat", u, u, axis=0),
                                value=_tensor(np.zeros(1, np.float32))))  # fmt: skip
    diag = g.op("ReduceSum", g.op("Mul", gram, eye), g.const([2], np.int64), keepdims=0)  # (A, u)
    scale = g.op("ReduceMin", diag, g.const([1], np.int64), keepdims=1)  # (A, 1)
    scale = g.op("Max", scale, g.const(np.finfo(np.float32).tiny))
    lam = g.op("Mul", scale, g.const(options["regularization"]))
    gram = g.op("Add", gram, g.op("Mul", eye, g.op("Unsqueeze", lam, g.const([2], np.int64))))
    inverse = g.op("Inverse", gram, domain="com.microsoft")
    weights = g.op("ReduceSum", inverse, g.const([2], np.int64), keepdims=1)  # (A, u, 1)
    alpha = g.op("Div", weights, g.op("ReduceSum", weights, g.const([1], np.int64), keepdims=1))
    axis1 = g.const([1], np.int64)
    mixed = g.op("ReduceSum", g.op("Mul", alpha, F), axis1, keepdims=0)  # (A, n)
    mixing = options["mixing"]
    if mixing != 1.0:
        X = g.op("Sub", F, G)  # past iterates x_i
        mixed_x = g.op("ReduceSum", g.op("Mul", alpha, X), axis1, keepdims=0)
        mixed = g.op("Add", mixed_x, g.op("Mul", g.const(mixing), g.op("Sub", mixed, mixed_x)))
    # A failed or overflowing extrapolation costs that sample a plain step, never a NaN state.
    bad = g.op("ReduceMax", g.op("Cast", _not_finite(g, mixed), to=1), axis1, keepdims=1)
    return g.op("Where", g.op("Greater", bad, g.const(0.0)), fx, mixed)


def _tensor(array: np.ndarray):
    from onnx import numpy_helper

    return numpy_helper.from_array(array)


def export_parts(model: ImplicitClassifier) -> dict[str, onnx.ModelProto]:
    """The separately exported parts of an adaptive model: ``prologue`` (x -> qx, z0), ``step``
    ((z, qx) -> fz) and ``epilogue`` ((z, qx) -> logits, extras), plus nothing of the solver.
    For benchmarks of a host-side solver loop (``bench/onnx_design.py``); the served file is
    :func:`build_onnx`'s."""
    plan = _plan(model)
    if not plan.iterative:
        raise ExportError(f"family {model.config.family!r} has a fixed depth: no solver parts")
    return _parts(plan, tuple(model.config.input.shape))


def _parts(plan: _Plan, input_shape: tuple[int, ...]) -> dict[str, onnx.ModelProto]:
    x = torch.rand(3, *input_shape)
    with torch.no_grad():
        qx, z0 = plan.prologue(x)
    return {
        "prologue": _export_part(plan.prologue, (x,), ["x"], ["qx", "z0"]),
        "step": _export_part(plan.step, (z0, qx), ["z", "qx"], ["fz"]),
        "epilogue": _export_part(plan.epilogue, (z0, qx), ["z", "qx"], ["logits", *plan.extras]),
    }


def build_onnx(model: ImplicitClassifier) -> onnx.ModelProto:
    """The whole-solve ONNX model of ``model`` (see the module docstring). No file is written."""
    import onnx
    from onnx import TensorProto as TP
    from onnx import helper

    plan = _plan(model)
    config = model.config
    names = _Names()
    main = _Graph(names)
    in_shape = list(config.input.shape)
    x = torch.rand(3, *in_shape)

    graph_inputs = [
        helper.make_tensor_value_info("x", TP.FLOAT, ["batch", *in_shape]),
        helper.make_tensor_value_info("tol", TP.DOUBLE, ["batch"]),
        helper.make_tensor_value_info("max_iter", TP.INT64, ["batch"]),
        helper.make_tensor_value_info("solver", TP.INT64, []),
    ]
    if plan.iterative:
        parts = _parts(plan, tuple(in_shape))
        prologue, step, epilogue = parts["prologue"], parts["step"], parts["epilogue"]
        qx_name, z0_name = main.inline(prologue, {"x": "x"}, "prologue")
        batch = main.op("Shape", "x", start=0, end=1)
        index = main.op("Range", main.const(0, np.int64),
                        main.op("Squeeze", batch, main.const([0], np.int64)),
                        main.const(1, np.int64))  # fmt: skip
        budgets = main.op("Concat", main.const([0], np.int64), "max_iter", axis=0)
        trip = main.op("ReduceMax", budgets, keepdims=0)  # the largest max_iter (0 if empty)
        cond = main.op("Greater", main.op("Size", index), main.const(0, np.int64))
        start = {"z0": z0_name, "qx": qx_name, "tol": "tol", "max_iter": "max_iter",
                 "index": index, "trip": trip, "cond": cond}  # fmt: skip
        branches = []
        for method in ("anderson", "picard"):
            nodes, results = _solver_loop(names, plan, step, method, start)
            elems = [TP.FLOAT, TP.INT64, TP.FLOAT, TP.BOOL]
            ranks = [1 + len(plan.state_shape), 1, 1, 1]
            branches.append(
                helper.make_graph(
                    nodes, f"{method}_branch", [],
                    [_value_info(o, e, r) for o, e, r in zip(results, elems, ranks, strict=True)],
                )
            )  # fmt: skip
        anderson = main.const(SOLVER_NAMES.index("anderson"), np.int64)
        is_anderson = main.op("Equal", "solver", anderson)
        z_star, iterations, residual, converged = main.op(
            "If", is_anderson, outputs=4, then_branch=branches[0], else_branch=branches[1]
        )
        logits, *extras = main.inline(epilogue, {"z": z_star, "qx": qx_name}, "epilogue")
    else:
        whole = _export_part(plan.whole, (x,), ["x"], ["logits", "residual", *plan.extras])
        logits, residual, *extras = main.inline(whole, {"x": "x"}, "model")
        batch = main.op("Shape", "x", start=0, end=1)
        iterations = main.op("Expand", main.const(plan.depth, np.int64), batch)
        converged = main.op("LessOrEqual", residual, main.const(np.inf))

    probabilities = main.op("Softmax", logits, axis=1)
    values = [logits, probabilities, iterations, residual, converged, *extras]
    out_names = [*OUTPUTS, *plan.extras]
    for value, name in zip(values, out_names, strict=True):
        main.nodes.append(helper.make_node("Identity", [value], [name]))
    elems = [TP.FLOAT, TP.FLOAT, TP.INT64, TP.FLOAT, TP.BOOL] + [TP.FLOAT] * len(plan.extras)
    classes = config.num_classes
    shapes = [["batch", classes], ["batch", classes], ["batch"], ["batch"], ["batch"]]
    shapes += [["batch"]] * len(plan.extras)
    graph_outputs = [
        helper.make_tensor_value_info(n, e, s)
        for n, e, s in zip(out_names, elems, shapes, strict=True)
    ]
    # ``solver`` has a default (an initializer of the same name makes the input optional).
    method = config.solver.method if config.solver.method in SOLVER_NAMES else SOLVER_NAMES[1]
    solver_init = _tensor(np.array(SOLVER_NAMES.index(method), np.int64))
    solver_init.name = "solver"
    graph = helper.make_graph(
        main.nodes, f"fpn_{config.family}", graph_inputs, graph_outputs,
        initializer=[*names.initializers, solver_init],
    )  # fmt: skip
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)],
        producer_name="fpn-export",
        producer_version=str(EXPORT_VERSION),
    )
    proto.ir_version = min(proto.ir_version, 10)  # readable by onnxruntime >= 1.18
    metadata = {
        "fpn.export_version": str(EXPORT_VERSION),
        "fpn.family": config.family,
        "fpn.solvers": ",".join(SOLVER_NAMES) if plan.iterative else "",
        "fpn.adaptive": "true" if plan.iterative else "false",
        "fpn.extras": ",".join(plan.extras),
        "fpn.damping": repr(plan.damping),
        "fpn.anderson": json.dumps(plan.anderson, sort_keys=True),
    }
    helper.set_model_props(proto, metadata)
    onnx.checker.check_model(proto)
    return proto


# --- checkpoints, fingerprints -----------------------------------------------------------------
def fingerprint(directory: str | Path) -> dict[str, str]:
    """sha256 of the weights file and of the model part of ``config.json`` (what the graph
    depends on; names, training notes and metrics may change without making it stale)."""
    directory = Path(directory)
    document = json.loads((directory / CONFIG_FILE).read_text())
    model_part = {k: v for k, v in document.items() if k not in ("name", "training", "metrics")}
    return {
        "fpn.weights_sha256": _sha256((directory / WEIGHTS_FILE).read_bytes()),
        "fpn.config_sha256": _sha256(json.dumps(model_part, sort_keys=True).encode()),
    }


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_metadata(path: str | Path) -> dict[str, str]:
    """The ``fpn.*`` metadata of an exported file (graph not loaded into a runtime)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def check_fresh(directory: str | Path, metadata: dict[str, str]) -> None:
    """Raise :class:`ExportError` when ``model.onnx`` was exported from other weights or config."""
    directory = Path(directory)
    current = fingerprint(directory)
    stale = [k for k, v in current.items() if metadata.get(k) != v]
    if stale:
        what = " and ".join(
            WEIGHTS_FILE if k == "fpn.weights_sha256" else CONFIG_FILE for k in stale
        )
        raise ExportError(
            f"{directory / ONNX_FILE}: stale, {what} changed since it was exported; "
            f"run `fpn-export --checkpoint {directory}` again"
        )


# --- verification against torch ----------------------------------------------------------------
NEAR_TIE = 0.02
RESIDUAL_NOISE = 1e-7
"""A sample whose solver stopped with a residual within 2% of its ``tol``, or within 1e-7 (the
resolution of a float32 relative residual: a few float32 epsilons), is a near-tie. A rounding
difference (onnxruntime's kernels sum in another order than torch's, as torch's own do between
batch sizes and thread counts) can move such a stop, and an Anderson residual that is not
monotone can then take a few more iterations to come back below ``tol``. Both answers are right
by SPEC §5; torch against itself (batch 1 vs 250) shows the same spread."""


def agreement(c: dict[str, np.ndarray], *, label_gap: float = 0.0) -> dict[str, Any]:
    """Summarise a :func:`compare` result under the parity rule: iterations within ±1 of torch
    except near-ties (:data:`NEAR_TIE`), labels equal except where torch's top-2 probabilities
    are within ``label_gap`` of each other."""
    diff = c["iterations_onnx"].astype(np.int64) - c["iterations_torch"]
    # The residual and convergence of whichever runtime stopped first.
    first = diff > 0
    residual = np.where(first, c["residual_torch"], c["residual_onnx"])
    converged = np.where(first, c["converged_torch"], c["converged_onnx"])
    near_tie = converged & (residual >= (1.0 - NEAR_TIE) * c["tol"] - RESIDUAL_NOISE)
    far = np.abs(diff) > 1
    mismatch = c["labels_torch"] != c["labels_onnx"]
    tied = c["top2_gap_torch"] <= label_gap
    return {
        "max_iteration_diff": int(np.abs(diff[~(far & near_tie)]).max(initial=0)),
        "near_ties": int((far & near_tie).sum()),
        "label_mismatches": int((mismatch & ~tied).sum()),
        "max_probability_diff": float(c["probability_diff"].max(initial=0.0)),
        "converged_mismatches": int((c["converged_torch"] != c["converged_onnx"]).sum()),
    }


@dataclass(frozen=True)
class Verification:
    """How an exported model compares with torch on ``n`` inputs (all solvers together)."""

    n: int
    solvers: tuple[str, ...]
    label_mismatches: int
    max_probability_diff: float
    max_iteration_diff: int
    near_ties: int
    converged_mismatches: int

    @property
    def ok(self) -> bool:
        return (
            self.label_mismatches == 0
            and self.max_probability_diff <= 1e-4
            and self.max_iteration_diff <= 1
            and self.near_ties <= max(1, self.n * len(self.solvers) // 100)
        )

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "solvers": list(self.solvers), "ok": self.ok}


def verification_inputs(shape: tuple[int, ...], n: int, seed: int = 0) -> np.ndarray:
    """``n`` inputs in [0, 1]: a mix of dense noise, sparse strokes on a dark background (like
    digits) and smoothed blobs, so the check covers more than one regime of the model."""
    rng = np.random.default_rng(seed)
    dense = rng.random((n, *shape), dtype=np.float32)
    sparse = dense * (rng.random((n, *shape)) < 0.2)
    blobs = np.clip(rng.normal(0.5, 0.3, (n, *shape)), 0, 1).astype(np.float32)
    kind = np.arange(n) % 3
    x = np.where((kind == 0).reshape(-1, *[1] * len(shape)), dense,
                 np.where((kind == 1).reshape(-1, *[1] * len(shape)), sparse, blobs))  # fmt: skip
    return np.ascontiguousarray(x, dtype=np.float32)


def onnx_session(model: str | Path | bytes, *, threads: int = 1, providers=None):
    """An onnxruntime session for an exported model (CPU unless ``providers`` says otherwise)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    source = str(model) if isinstance(model, Path | str) else model
    return ort.InferenceSession(
        source, sess_options=options, providers=providers or ["CPUExecutionProvider"]
    )


def run_onnx(session, x: np.ndarray, *, tol, max_iter, solver: str | None = None) -> dict:
    """Run an exported model: per-sample or scalar ``tol`` / ``max_iter``. Returns outputs by
    name (numpy)."""
    n = x.shape[0]
    feeds = {
        "x": np.ascontiguousarray(x, dtype=np.float32),
        "tol": np.broadcast_to(np.asarray(tol, np.float64), (n,)).copy(),
        "max_iter": np.broadcast_to(np.asarray(max_iter, np.int64), (n,)).copy(),
    }
    if solver in SOLVER_NAMES:  # a fixed-depth graph has no solver input
        feeds["solver"] = np.array(SOLVER_NAMES.index(solver), np.int64)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def compare(
    model: ImplicitClassifier, session, x: np.ndarray, *, tol, max_iter, solver: str
) -> dict[str, Any]:
    """torch ``predict`` against the ONNX session on ``x``: per-sample differences."""
    with torch.no_grad():
        ref = model.predict(
            torch.from_numpy(x),
            tol=torch.as_tensor(np.broadcast_to(np.asarray(tol, np.float64), (x.shape[0],)).copy()),
            max_iter=torch.as_tensor(
                np.broadcast_to(np.asarray(max_iter, np.int64), (x.shape[0],)).copy()
            ),
            solver=solver,
        )
    got = run_onnx(session, x, tol=tol, max_iter=max_iter, solver=solver)
    probabilities = ref.logits.float().softmax(1).numpy()
    top2 = np.sort(probabilities, axis=1)[:, -2:]
    result = {
        "tol": np.broadcast_to(np.asarray(tol, np.float64), (x.shape[0],)).copy(),
        "top2_gap_torch": top2[:, 1] - top2[:, 0],
        "labels_torch": probabilities.argmax(1),
        "labels_onnx": got["probabilities"].argmax(1),
        "probability_diff": np.abs(probabilities - got["probabilities"]).max(1),
        "iterations_torch": ref.stats.iterations.numpy(),
        "iterations_onnx": got["iterations"],
        "converged_torch": ref.stats.converged.numpy(),
        "converged_onnx": got["converged"],
        "residual_torch": ref.stats.residual.numpy(),
        "residual_onnx": got["residual"],
    }
    for name, value in ref.extras.items():
        result[f"{name}_torch"] = value.numpy()
        result[f"{name}_onnx"] = got[name]
    return result


def verify(
    model: ImplicitClassifier, onnx_model: str | Path | bytes, *, n: int = 300, seed: int = 0
) -> Verification:
    """Compare the exported model with torch on ``n`` synthetic inputs, with every solver, at the
    checkpoint's default ``tol`` and ``max_iter`` for half of them and per-sample random ones
    (tol log-uniform in [1e-5, 1e-2], max_iter in [1, default]) for the other half."""
    session = onnx_session(onnx_model)
    config = model.config
    x = verification_inputs(tuple(config.input.shape), n, seed)
    rng = np.random.default_rng(seed + 1)
    tol = np.full(n, config.solver.tol)
    max_iter = np.full(n, config.solver.max_iter, np.int64)
    half = n // 2
    tol[half:] = 10.0 ** rng.uniform(-5, -2, n - half)
    max_iter[half:] = rng.integers(1, config.solver.max_iter + 1, n - half)
    adaptive = not isinstance(model, ExplicitClassifier)
    solvers = SOLVER_NAMES if adaptive else (model.default_solver(),)
    totals = {"label_mismatches": 0, "near_ties": 0, "converged_mismatches": 0}
    worst = {"max_probability_diff": 0.0, "max_iteration_diff": 0}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for solver in solvers:
            c = compare(model, session, x, tol=tol, max_iter=max_iter, solver=solver)
            # Random inputs can tie the top two classes: such a label may flip with rounding.
            summary = agreement(c, label_gap=1e-4)
            for key in totals:
                totals[key] += summary[key]
            for key in worst:
                worst[key] = max(worst[key], summary[key])
    finally:
        torch.set_num_threads(threads)
    return Verification(n, tuple(solvers), **totals, **worst)


# --- the command's work ------------------------------------------------------------------------
@dataclass(frozen=True)
class ExportResult:
    path: Path
    bytes: int
    family: str
    adaptive: bool
    verification: Verification

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "bytes": self.bytes,
            "family": self.family,
            "adaptive": self.adaptive,
            "verification": self.verification.to_dict(),
        }


def export_checkpoint(directory: str | Path, *, samples: int = 300, seed: int = 0) -> ExportResult:
    """Export ``directory``'s model to ``directory/model.onnx``, verified against torch first.

    Nothing is written when the family cannot be exported or verification fails.
    """
    import onnx

    directory = Path(directory)
    checkpoint = load_checkpoint(directory)
    model = checkpoint.model.float().eval()
    check_exportable(model.config)
    proto = build_onnx(model)
    helper_props = {**fingerprint(directory), "fpn.name": checkpoint.name}
    for key, value in helper_props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    buffer = io.BytesIO()
    onnx.save_model(proto, buffer)
    data = buffer.getvalue()
    verification = verify(model, data, n=samples, seed=seed)
    if not verification.ok:
        raise ExportError(
            f"{directory / ONNX_FILE}: not written, the export does not match torch on "
            f"{verification.n} inputs: {verification.to_dict()}"
        )
    target = directory / ONNX_FILE
    _atomic_write(target, lambda p: p.write_bytes(data))
    return ExportResult(
        target, len(data), model.config.family, not isinstance(model, ExplicitClassifier),
        verification,
    )  # fmt: skip
