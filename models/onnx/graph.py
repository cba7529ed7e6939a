"""Writing ONNX graphs by hand: unique value names, nodes, constants, inlined parts.

The solver loops (:mod:`models.onnx.loops`) and the whole-solve model (:mod:`models.onnx.build`)
are built with these; torch writes only the model's parts (:mod:`models.onnx.parts`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..solvers import EPS
from .runtime import ExportError

if TYPE_CHECKING:  # pragma: no cover
    import onnx


class Graph:
    """Nodes of one (sub)graph. Value names are unique across the whole model (``names``)."""

    def __init__(self, names: Names, *, local: bool = False) -> None:
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


class Names:
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


def not_finite(g: Graph, value: str) -> str:
    return g.op("Or", g.op("IsNaN", value), g.op("IsInf", value))


def relative_residual(g: Graph, fz: str, z: str, diff: str | None = None) -> str:
    """SPEC §5's residual in the graph: (A, ...) x 2 -> (A,) float32, the formula of
    :func:`models.solvers.relative_residual` op for op (a test feeds both the same states).
    ``diff``: ``fz − z`` when the caller has it already (same shape as ``fz``)."""
    fz_flat = g.op("Flatten", fz, axis=1)
    diff = g.op("Flatten", diff if diff is not None else g.op("Sub", fz, z), axis=1)
    axes = g.const([1], np.int64)
    norm = g.op("ReduceL2", fz_flat, axes, keepdims=0)
    res = g.op("Div", g.op("ReduceL2", diff, axes, keepdims=0), g.op("Max", norm, g.const(EPS)))
    return g.op("Where", not_finite(g, norm), g.const(np.nan), res)


def value_info(name: str, elem: int, rank: int | None):
    from onnx import helper

    shape = None if rank is None else [None] * rank
    return helper.make_tensor_value_info(name, elem, shape)


def tensor(array: np.ndarray) -> onnx.TensorProto:
    from onnx import numpy_helper

    return numpy_helper.from_array(array)
