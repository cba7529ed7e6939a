"""The whole-solve ONNX model: prologue, the family's solver loops, epilogue, in one graph.

``x`` goes through the prologue once (``Q(x)`` and ``z0``); the integer ``solver`` input picks one
loop per solver the family runs (nested ``If`` nodes, in the order of ``model.solvers()``,
recorded in the ``fpn.solvers`` metadata); the epilogue reads out ``z*``. The interface is
:mod:`models.onnx.runtime`'s docstring.
"""

from __future__ import annotations

import json
from dataclasses import fields
from typing import TYPE_CHECKING

import numpy as np

from ..implicit import ImplicitClassifier
from ..solvers import Anderson, Picard, Stepper
from .graph import Graph, Names, tensor, value_info
from .loops import LoopStart, solver_loop
from .parts import OPSET, export_parts
from .plan import ExportPlan, plan_export
from .runtime import (
    DEFAULT_SOLVER_KEY,
    EXPORT_VERSION,
    EXTRAS_KEY,
    OUTPUTS,
    SOLVERS_KEY,
    VERSION_KEY,
)

if TYPE_CHECKING:  # pragma: no cover
    import onnx


def build_onnx(model: ImplicitClassifier) -> onnx.ModelProto:
    """The whole-solve ONNX model of ``model`` (float32, eval mode). No file is written."""
    import onnx
    from onnx import TensorProto as TP
    from onnx import helper

    plan = plan_export(model)
    config = model.config
    in_shape = list(config.input.shape)
    names = Names()
    main = Graph(names)
    parts = export_parts(plan, tuple(in_shape))

    context, z0 = main.inline(parts["prologue"], {"x": "x"}, "prologue")
    batch = main.op("Shape", "x", start=0, end=1)
    count = main.op("Squeeze", batch, main.const([0], np.int64))
    index = main.op("Range", main.const(0, np.int64), count, main.const(1, np.int64))
    start = LoopStart(z0, context, "tol", "max_iter", index, batch)
    nodes, (z_star, iterations, residual, converged) = _select_solver(
        names, plan, parts["step"], start, list(enumerate(plan.solvers.values()))
    )
    main.nodes.extend(nodes)
    logits, *extras = main.inline(parts["epilogue"], {"z": z_star, "qx": context}, "epilogue")
    probabilities = main.op("Softmax", logits, axis=1)

    out_names = [*OUTPUTS, *plan.extras]
    values = [logits, probabilities, iterations, residual, converged, *extras]
    for value, name in zip(values, out_names, strict=True):
        main.nodes.append(helper.make_node("Identity", [value], [name]))
    classes = config.num_classes
    elems = [TP.FLOAT, TP.FLOAT, TP.INT64, TP.FLOAT, TP.BOOL] + [TP.FLOAT] * len(plan.extras)
    shapes: list[list[str | int]] = [["batch", classes]] * 2
    shapes += [["batch"]] * (3 + len(plan.extras))
    graph_inputs = [
        helper.make_tensor_value_info("x", TP.FLOAT, ["batch", *in_shape]),
        helper.make_tensor_value_info("tol", TP.DOUBLE, ["batch"]),
        helper.make_tensor_value_info("max_iter", TP.INT64, ["batch"]),
        helper.make_tensor_value_info("solver", TP.INT64, []),
    ]
    graph_outputs = [
        helper.make_tensor_value_info(n, e, s)
        for n, e, s in zip(out_names, elems, shapes, strict=True)
    ]
    # ``solver`` is optional: an initializer of the same name is its default.
    default = tensor(np.array(list(plan.solvers).index(plan.default_solver), np.int64))
    default.name = "solver"
    graph = helper.make_graph(
        main.nodes, f"fpn_{config.family}", graph_inputs, graph_outputs,
        initializer=[*names.initializers, default],
    )  # fmt: skip
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)],
        producer_name="fpn-export",
        producer_version=str(EXPORT_VERSION),
    )
    proto.ir_version = min(proto.ir_version, 10)  # readable by onnxruntime >= 1.18
    helper.set_model_props(proto, _metadata(plan))
    onnx.checker.check_model(proto)
    return proto


def _select_solver(
    names: Names,
    plan: ExportPlan,
    step: onnx.ModelProto,
    start: LoopStart,
    solvers: list[tuple[int, Stepper]],
) -> tuple[list[onnx.NodeProto], list[str]]:
    """Nodes running the loop of the stepper whose index equals the ``solver`` input (the last
    one for any other value): ``If`` nodes nested over ``solvers``. Returns (nodes,
    [z*, iterations, residual, converged])."""
    from onnx import TensorProto as TP
    from onnx import helper

    index, stepper = solvers[0]
    nodes, results = solver_loop(names, stepper, step, plan.state_shape, start)
    if len(solvers) == 1:
        return nodes, results
    other_nodes, other_results = _select_solver(names, plan, step, start, solvers[1:])
    elems = [TP.FLOAT, TP.INT64, TP.FLOAT, TP.BOOL]
    ranks = [1 + len(plan.state_shape), 1, 1, 1]

    def branch(body: list[onnx.NodeProto], outputs: list[str], stem: str) -> onnx.GraphProto:
        infos = [value_info(o, e, r) for o, e, r in zip(outputs, elems, ranks, strict=True)]
        return helper.make_graph(body, names.new(stem), [], infos)

    g = Graph(names)
    chosen = g.op("Equal", "solver", g.const(index, np.int64))
    outputs = g.op(
        "If", chosen, outputs=4,
        then_branch=branch(nodes, results, f"{stepper.name}_branch"),
        else_branch=branch(other_nodes, other_results, "other_solvers"),
    )  # fmt: skip
    return g.nodes, list(outputs)


def _metadata(plan: ExportPlan) -> dict[str, str]:
    """The ``fpn.*`` properties a runtime reads (fingerprints and name are added on export)."""
    picard = next((s for s in plan.solvers.values() if isinstance(s, Picard)), Picard())
    anderson = next((s for s in plan.solvers.values() if isinstance(s, Anderson)), None)
    knobs = {f.name: getattr(anderson, f.name) for f in fields(anderson)} if anderson else {}
    return {
        VERSION_KEY: str(EXPORT_VERSION),
        "fpn.family": plan.family,
        SOLVERS_KEY: ",".join(plan.solvers),
        DEFAULT_SOLVER_KEY: plan.default_solver,
        "fpn.adaptive": "true" if plan.adaptive else "false",
        EXTRAS_KEY: ",".join(plan.extras),
        "fpn.damping": repr(picard.damping),
        "fpn.anderson": json.dumps(knobs, sort_keys=True),
    }
