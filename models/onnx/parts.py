"""One part of a model (prologue, step or epilogue) from torch to ONNX.

torch's dynamo exporter writes each part as its own graph with a dynamic batch dimension; the
graph builder (:mod:`models.onnx.graph`) then inlines them around the solver loops.
"""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from .plan import ExportPlan

if TYPE_CHECKING:  # pragma: no cover
    import onnx

OPSET = 20


def export_parts(plan: ExportPlan, input_shape: tuple[int, ...]) -> dict[str, onnx.ModelProto]:
    """The plan's three parts as ONNX models: ``prologue`` (x -> context, z0), ``step``
    ((z, context) -> fz) and ``epilogue`` ((z, context) -> logits, extras). Also what a
    host-side solver loop runs (``bench/onnx_design.py``)."""
    x = torch.rand(3, *input_shape)
    with torch.no_grad():
        context, z0 = plan.prologue(x)
    io = ["z", "qx"]
    return {
        "prologue": export_part(plan.prologue, (x,), ["x"], ["qx", "z0"]),
        "step": export_part(plan.step, (z0, context), io, ["fz"]),
        "epilogue": export_part(plan.epilogue, (z0, context), io, ["logits", *plan.extras]),
    }


def export_part(
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
    if program is None:  # only the legacy exporter (dynamo=False) returns nothing
        raise RuntimeError("torch.onnx.export(dynamo=True) returned no ONNX program")
    proto = program.model_proto
    if proto.functions:
        proto = onnx.inliner.inline_local_functions(proto)
    transposed_conv_as_conv(proto.graph)
    return proto


def transposed_conv_as_conv(graph: onnx.GraphProto) -> None:
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
