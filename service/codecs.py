"""Request and response codecs of every protocol, free of framework types.

- JSON bodies (parsing, pydantic validation as a 422) and native v1 inputs: raw intensity arrays
  and base64 PNG/JPEG images.
- Open Inference Protocol (V2) tensors: JSON ``data`` (flat or nested), the binary tensor data
  extension over HTTP, typed ``contents`` and ``raw_input_contents`` over gRPC.
- The V2 output schema (:func:`v2_output_schema`: names, datatypes, shapes), stated once and used
  by the HTTP and gRPC model metadata and by every output encoder.

Every client mistake is raised as a :class:`~service.errors.ServiceError` (422).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from pydantic import BaseModel, ValidationError

from . import jsonio
from .batcher import ItemResult
from .errors import InvalidInput, InvalidJSON, InvalidParameter

MAX_IMAGE_PIXELS = 4096 * 4096
IMAGE_FORMATS = ("PNG", "JPEG")

# numpy <-> V2 datatypes, for outputs and binary tensors.
V2_DTYPES: dict[np.dtype, str] = {
    np.dtype(np.float32): "FP32",
    np.dtype(np.float64): "FP64",
    np.dtype(np.int64): "INT64",
    np.dtype(np.int32): "INT32",
    np.dtype(np.uint8): "UINT8",
    np.dtype(np.bool_): "BOOL",
}
NUMPY_DTYPES = {name: dtype.newbyteorder("<") for dtype, name in V2_DTYPES.items()}
V2_INPUT_DTYPES: dict[str, np.dtype] = {"FP32": np.dtype("<f4"), "UINT8": np.dtype(np.uint8)}
"""Input datatypes: FP32 raw intensities in [0, 1], or UINT8 pixels (scaled by the checkpoint)."""


# --- the V2 output schema ----------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    """One V2 tensor: name, datatype, shape (-1: the batch dimension)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


CORE_OUTPUTS = ("probabilities", "label", "iterations", "residual", "converged")


def v2_output_schema(
    classes: int, extra_outputs: Mapping[str, tuple[np.dtype, Sequence[int]]]
) -> list[TensorSpec]:
    """Every output a model answers, in answer order: the five core outputs, then the family's
    extras (``extra_outputs``: name -> (dtype, per-sample shape), as seen at warm-up)."""
    core = [
        TensorSpec("probabilities", "FP32", (-1, classes)),
        TensorSpec("label", "INT64", (-1,)),
        TensorSpec("iterations", "INT32", (-1,)),
        TensorSpec("residual", "FP32", (-1,)),
        TensorSpec("converged", "BOOL", (-1,)),
    ]
    extras = [
        TensorSpec(name, V2_DTYPES.get(np.dtype(dtype), "FP32"), (-1, *rest))
        for name, (dtype, rest) in sorted(extra_outputs.items())
    ]
    return core + extras


def v2_output(result: ItemResult, spec: TensorSpec) -> np.ndarray:
    """The array of output ``spec`` for ``result``, in the schema's datatype."""
    if spec.name == "probabilities":
        array = result.probabilities
    elif spec.name == "label":
        array = result.probabilities.argmax(axis=1)
    elif spec.name in ("iterations", "residual", "converged"):
        array = getattr(result, spec.name)
    else:
        array = np.asarray(result.extras[spec.name])
    return np.ascontiguousarray(array, dtype=NUMPY_DTYPES[spec.datatype])


def select_outputs(schema: list[TensorSpec], names: Sequence[str] | None) -> list[TensorSpec]:
    """The requested outputs (checked before solving); every one when ``names`` is None."""
    if names is None:
        return schema
    by_name = {spec.name: spec for spec in schema}
    unknown = [name for name in names if name not in by_name]
    if unknown:
        raise InvalidParameter(f"unknown output {unknown[0]!r}; available: {list(by_name)}")
    return [by_name[name] for name in names]


# --- JSON ---------------------------------------------------------------------------------------
def parse_json(body: bytes) -> dict[str, Any]:
    """A JSON object from a request body (422 ``invalid_json`` otherwise)."""
    if not body:
        raise InvalidJSON("empty request body: send a JSON object")
    try:
        document = jsonio.loads(body)
    except (jsonio.JSONDecodeError, ValueError, UnicodeDecodeError) as exc:
        raise InvalidJSON(f"request body is not valid JSON ({exc})") from None
    if not isinstance(document, dict):
        raise InvalidJSON("request body must be a JSON object")
    return document


def validate(model: type[BaseModel], document: dict[str, Any], *, at: str = "") -> Any:
    """``model`` validated from ``document`` (422 ``invalid_parameter`` listing the problems);
    ``at``: where ``document`` sits in the request, to name the fields as JSON does."""
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in ([at] if at else []) + list(e['loc'])) or 'body'}: "
            f"{e['msg']}"
            for e in exc.errors()
        )
        raise InvalidParameter(f"invalid request: {problems}") from None


# --- native v1 inputs ---------------------------------------------------------------------------
def decode_array(raw: Any, shape: tuple[int, ...], *, what: str) -> np.ndarray:
    """A JSON array of raw intensities -> (N, *shape) float32, checked.

    Accepted layouts: (N, *shape), (N, H, W) for one-channel images, (N, prod(shape)).

    >>> decode_array([[0.0, 0.5, 1.0, 0.25]], (1, 2, 2), what="inputs").shape
    (1, 1, 2, 2)
    """
    try:
        array = np.asarray(raw)
    except (ValueError, TypeError):
        raise InvalidInput(f"{what} must be a rectangular (not ragged) array of numbers") from None
    if array.dtype.kind not in "fiu":
        raise InvalidInput(f"{what} must hold numbers only (found {_kind(array)})")
    return check_intensities(array.astype(np.float32, copy=False), shape, what=what)


def check_intensities(array: np.ndarray, shape: tuple[int, ...], *, what: str) -> np.ndarray:
    """Reshape to (N, *shape) and check finiteness and the [0, 1] range."""
    n = array.shape[0] if array.ndim else 0
    numel = math.prod(shape)
    layouts = [(n, *shape), (n, numel)]
    if len(shape) == 3 and shape[0] == 1:
        layouts.append((n, *shape[1:]))
    if array.ndim < 2 or n == 0 or array.shape not in layouts:
        expected = " or ".join(str(list(("N", *s[1:]))).replace("'", "") for s in layouts)
        raise InvalidInput(f"{what} has shape {list(array.shape)}; expected {expected} (N >= 1)")
    if not np.isfinite(array).all():
        raise InvalidInput(f"{what} contains NaN or Inf")
    if array.min() < 0.0 or array.max() > 1.0:
        raise InvalidInput(
            f"{what} must be raw intensities in [0, 1] (found values in "
            f"[{array.min():g}, {array.max():g}]); the service normalises them"
        )
    return np.ascontiguousarray(array.reshape(n, *shape))


def _kind(array: np.ndarray) -> str:
    return {"b": "booleans", "U": "strings", "O": "nulls or mixed values"}.get(
        array.dtype.kind, str(array.dtype)
    )


def decode_images(images: list[str], shape: tuple[int, ...]) -> np.ndarray:
    """Base64 PNG/JPEG -> (N, *shape) float32 in [0, 1]: converted to the model's channels
    (L or RGB) and resized (bilinear) to its height and width. Colours are not inverted."""
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise InvalidInput(f"this model takes inputs of shape {list(shape)}, not images")
    if not images:
        raise InvalidInput("images is empty")
    channels, height, width = shape
    out = np.empty((len(images), *shape), dtype=np.float32)
    for i, text in enumerate(images):
        if text.startswith("data:"):
            text = text.partition(",")[2]
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInput(f"images[{i}] is not valid base64") from None
        try:
            with Image.open(io.BytesIO(raw)) as image:
                if image.format not in IMAGE_FORMATS:
                    raise InvalidInput(f"images[{i}] is {image.format}; send PNG or JPEG")
                if image.width * image.height > MAX_IMAGE_PIXELS:
                    raise InvalidInput(f"images[{i}] is {image.width}x{image.height}; too large")
                image = image.convert("L" if channels == 1 else "RGB")
                if image.size != (width, height):
                    image = image.resize((width, height), Image.Resampling.BILINEAR)
                pixels = np.asarray(image, dtype=np.float32) / 255.0
        except InvalidInput:
            raise
        except Exception as exc:  # PIL raises many types for broken files
            raise InvalidInput(f"images[{i}] cannot be decoded as PNG or JPEG ({exc})") from None
        out[i] = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
    return out


def predictions(
    result: ItemResult, classes: tuple[str, ...], top_k: int, probabilities: bool
) -> list[dict[str, Any]]:
    """The native v1 ``predictions`` list of a result."""
    probs = result.probabilities
    labels = probs.argmax(axis=1)
    scores = probs[np.arange(len(labels)), labels].tolist()
    iterations = result.iterations.tolist()
    residuals = [r if math.isfinite(r) else None for r in result.residual.tolist()]
    converged = result.converged.tolist()
    extras = {k: np.asarray(v).tolist() for k, v in result.extras.items()}
    out = []
    for i, label in enumerate(labels.tolist()):
        p: dict[str, Any] = {"label": label, "class": classes[label], "score": scores[i]}
        if top_k:
            order = np.argsort(-probs[i], kind="stable")[:top_k].tolist()
            p["top_k"] = [
                {"label": j, "class": classes[j], "score": float(probs[i, j])} for j in order
            ]
        if probabilities:
            p["probabilities"] = probs[i].tolist()
        p["iterations"] = iterations[i]
        p["residual"] = residuals[i]
        p["converged"] = converged[i]
        for key, values in extras.items():
            p[key if key not in p else f"extra_{key}"] = values[i]
        out.append(p)
    return out


def timing(result: ItemResult, received: float) -> dict[str, float]:
    """Milliseconds queued, solving, and in total since ``received`` (perf_counter seconds)."""
    return {
        "queue": round(result.queue_seconds * 1e3, 3),
        "solve": round(result.solve_seconds * 1e3, 3),
        "total": round((time.perf_counter() - received) * 1e3, 3),
    }


# --- V2 tensors ---------------------------------------------------------------------------------
def split_binary(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """V2 binary tensor extension over HTTP: the JSON header comes first, its length in the
    ``Inference-Header-Content-Length`` header; the tensors' bytes follow."""
    if header_length is None:
        return body, b""
    try:
        n = int(header_length)
    except ValueError:
        raise InvalidInput("Inference-Header-Content-Length must be an integer") from None
    if not 0 < n <= len(body):
        raise InvalidInput(f"Inference-Header-Content-Length {n} does not fit the body")
    return body[:n], body[n:]


def decode_v2_tensor(
    datatype: str,
    shape: Sequence[int],
    input_spec: Any,
    *,
    data: Any = None,
    raw: bytes | None = None,
    name: str = "input",
) -> np.ndarray:
    """One V2 input tensor -> (N, *input.shape) float32 in [0, 1], checked.

    ``datatype`` FP32 (raw intensities) or UINT8 (pixels, scaled by the checkpoint's
    ``input_spec.scale``); the values come as ``raw`` little-endian bytes (binary extension, gRPC
    raw contents) or as ``data``, any array-like (JSON, flat or nested; gRPC typed contents).
    """
    dtype = V2_INPUT_DTYPES.get(datatype)
    if dtype is None:
        raise InvalidInput(f"datatype {datatype!r} is not supported; send FP32 or UINT8")
    shape = [int(d) for d in shape]
    if not shape or any(d < 0 for d in shape):
        raise InvalidInput(f"shape {shape} must be a list of non-negative sizes")
    count = math.prod(shape)
    if raw is not None:
        if len(raw) != count * dtype.itemsize:
            raise InvalidInput(
                f"input {name!r}: {len(raw)} bytes do not match shape {shape} x {datatype} "
                f"({count * dtype.itemsize} bytes)"
            )
        array = np.frombuffer(raw, dtype=dtype).copy()  # writable: backends may wrap it
    else:
        if data is None:
            raise InvalidInput(f"input {name!r} has no data")
        try:
            array = np.asarray(data)
        except (ValueError, TypeError):
            raise InvalidInput("data must be a flat or nested (rectangular) array") from None
        if array.dtype.kind not in "fiu":
            raise InvalidInput(f"data must hold numbers only (found {_kind(array)})")
        if dtype == np.uint8:
            if array.dtype.kind == "f" and not np.array_equal(array, np.round(array)):
                raise InvalidInput("UINT8 data must be integers in [0, 255]")
            if array.size and (array.min() < 0 or array.max() > 255):
                raise InvalidInput("UINT8 data must be integers in [0, 255]")
    if array.size != count:
        raise InvalidInput(f"data has {array.size} values; shape {shape} needs {count}")
    array = array.reshape(shape)
    if dtype == np.uint8:
        array = array.astype(np.float32) * np.float32(input_spec.scale)
    return check_intensities(array.astype(np.float32, copy=False), input_spec.shape, what="input")


def decode_v2_json_input(tensor: Any, binary: bytes, input_spec: Any) -> np.ndarray:
    """A V2 JSON input tensor (``schemas.V2RequestInput``), its values in ``data`` or, with
    ``parameters.binary_data_size``, in ``binary`` (the bytes after the JSON header)."""
    size = (tensor.parameters or {}).get("binary_data_size")
    if size is not None and size != len(binary):
        raise InvalidInput(
            f"binary_data_size {size} does not match the {len(binary)} bytes sent after the "
            "JSON header"
        )
    return decode_v2_tensor(
        tensor.datatype, tensor.shape, input_spec,
        data=tensor.data, raw=binary if size is not None else None, name=tensor.name,
    )  # fmt: skip


def encode_v2_json_outputs(
    outputs: list[tuple[TensorSpec, np.ndarray, bool]],
) -> tuple[list[dict[str, Any]], list[bytes]]:
    """V2 JSON ``outputs`` entries, plus the bytes of those sent with the binary extension:
    ``outputs`` is (spec, array, as_binary) per output."""
    entries, chunks = [], []
    for spec, array, as_binary in outputs:
        entry: dict[str, Any] = {
            "name": spec.name,
            "datatype": spec.datatype,
            "shape": list(array.shape),
        }
        if as_binary:
            raw = array.tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = array.ravel().tolist()
        entries.append(entry)
    return entries, chunks


# --- gRPC (Open Inference Protocol protobuf messages) --------------------------------------------
# Which InferTensorContents field carries each datatype (typed contents).
GRPC_CONTENTS = {
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "BOOL": "bool_contents",
}


def grpc_parameter(parameter: Any) -> bool | int | float | str | None:
    """The value of an ``InferParameter`` (whichever of its oneof fields is set)."""
    choice = parameter.WhichOneof("parameter_choice")
    return None if choice is None else getattr(parameter, choice)


def grpc_parameters(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """A protobuf parameter map -> plain values."""
    return {key: grpc_parameter(value) for key, value in parameters.items()}


def decode_grpc_input(request: Any, input_spec: Any) -> np.ndarray:
    """The one input tensor of a ``ModelInferRequest`` (typed ``contents`` or
    ``raw_input_contents``) -> (N, *input.shape) float32 in [0, 1], checked."""
    if len(request.inputs) != 1:
        raise InvalidInput(
            f"model {request.model_name!r} takes one input tensor, got {len(request.inputs)}"
        )
    tensor = request.inputs[0]
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise InvalidInput(
                f"raw_input_contents has {len(request.raw_input_contents)} entries for one input"
            )
        if tensor.HasField("contents"):
            raise InvalidInput("send either raw_input_contents or contents, not both")
        return decode_v2_tensor(
            tensor.datatype, tensor.shape, input_spec,
            raw=request.raw_input_contents[0], name=tensor.name,
        )  # fmt: skip
    field = {"FP32": "fp32_contents", "UINT8": "uint_contents"}.get(tensor.datatype)
    if field is None:  # decode_v2_tensor explains what is supported
        return decode_v2_tensor(tensor.datatype, tensor.shape, input_spec, data=[])
    values = getattr(tensor.contents, field)
    if not values:
        raise InvalidInput(
            f"input {tensor.name!r} has no data: fill contents.{field} or raw_input_contents"
        )
    dtype = np.float32 if field == "fp32_contents" else np.int64
    return decode_v2_tensor(
        tensor.datatype, tensor.shape, input_spec,
        data=np.fromiter(values, dtype=dtype, count=len(values)), name=tensor.name,
    )  # fmt: skip


def encode_grpc_outputs(
    response: Any, outputs: list[tuple[TensorSpec, np.ndarray]], *, raw: bool
) -> None:
    """Append ``outputs`` to a ``ModelInferResponse``: as ``raw_output_contents`` (little-endian
    bytes, BOOL one byte each) when ``raw``, else as typed contents."""
    for spec, array in outputs:
        tensor = response.outputs.add(name=spec.name, datatype=spec.datatype, shape=array.shape)
        if raw:
            response.raw_output_contents.append(array.tobytes())
        else:
            getattr(tensor.contents, GRPC_CONTENTS[spec.datatype]).extend(array.ravel().tolist())
