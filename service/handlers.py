"""The request logic behind both protocols, free of HTTP framework types.

Routes (``routes_v1``, ``routes_v2``) read bytes and headers and call a :class:`Handler` method;
the handler decodes and checks the request, queues its samples on the model's batcher, waits
for them and returns plain data. Every client mistake is raised as a
:class:`~service.errors.ServiceError`, before anything is queued, so a bad request never
reaches, and so never disturbs, a batch.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import io
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image
from pydantic import BaseModel, ValidationError

from . import __version__, jsonio
from .backends import UnsupportedModel
from .batcher import ItemResult, WorkItem
from .errors import (
    BatchTooLarge,
    InvalidInput,
    InvalidJSON,
    InvalidParameter,
    NotFound,
    NotReady,
    ServiceError,
    Unauthorized,
)
from .runtime import ModelRegistry, ModelRuntime, StartupError
from .schemas import PredictRequest, V2InferenceRequest, V2Parameters
from .settings import Settings

MAX_IMAGE_PIXELS = 4096 * 4096
IMAGE_FORMATS = ("PNG", "JPEG")

# V2 datatypes of our outputs, and numpy <-> V2 for extras and binary tensors.
V2_DTYPES = {
    np.dtype(np.float32): "FP32",
    np.dtype(np.float64): "FP64",
    np.dtype(np.int64): "INT64",
    np.dtype(np.int32): "INT32",
    np.dtype(np.uint8): "UINT8",
    np.dtype(np.bool_): "BOOL",
}
V2_INPUT_DTYPES = {"FP32": np.dtype("<f4"), "UINT8": np.dtype(np.uint8)}
CORE_OUTPUTS = ("probabilities", "label", "iterations", "residual", "converged")


@dataclass(frozen=True)
class Knobs:
    """A request's solver knobs after defaults and limits."""

    tol: float
    max_iter: int
    solver: str
    deadline_ms: float | None


@dataclass
class Reply:
    """A handler's answer: a JSON-able body, plus raw tensor bytes for V2's binary extension."""

    body: dict[str, Any]
    binary: list[bytes] = field(default_factory=list)


class Handler:
    """Does the work of every endpoint; one per app."""

    def __init__(self, settings: Settings, registry: ModelRegistry) -> None:
        self.settings = settings
        self.registry = registry

    # --- health and metadata ------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.registry.ready

    def readiness(self) -> dict[str, Any]:
        models = {
            name: ("ready" if m.ready else m.error or "loading")
            for name, m in self.registry.models.items()
        }
        return {"ready": self.ready, "models": models}

    def model_label(self, name: str) -> str | None:
        """``name`` when it is a served model (a safe metrics label), else None."""
        return name if name in self.registry.models else None

    def list_models(self) -> dict[str, Any]:
        return {"models": [self._summary(m) for m in self.registry.models.values()]}

    def model_metadata(self, name: str) -> dict[str, Any]:
        runtime = self.registry.get(name)
        info = self._info(runtime)
        return {
            **self._summary(runtime),
            "config": info.config.to_dict(),
            "solver_defaults": {
                "method": info.config.solver.method,
                "tol": info.config.solver.tol,
                "max_iter": info.config.solver.max_iter,
            },
            "solvers": list(info.solvers),
            "limits": {
                "min_tol": self.settings.min_tol,
                "max_tol": 1.0,
                "max_iter_limit": self.settings.max_iter_limit,
                "max_batch_size": self.settings.max_batch_size,
                "max_body_bytes": self.settings.max_body_bytes,
            },
            "training": info.training,
            "metrics": info.metrics,
            "extra_outputs": sorted(runtime.extra_outputs),
        }

    def _summary(self, runtime: ModelRuntime) -> dict[str, Any]:
        info = runtime.info
        return {
            "name": runtime.name,
            "family": info.config.family if info else None,
            "device": info.device if info else None,
            "backend": self.settings.backend,
            "input_shape": list(info.config.input.shape) if info else None,
            "classes": list(info.config.classes) if info else None,
            "ready": runtime.ready,
        }

    def _info(self, runtime: ModelRuntime):
        if runtime.info is None:
            raise NotReady(f"model {runtime.name!r} is still loading")
        return runtime.info

    def _serving(self, name: str) -> ModelRuntime:
        """The runtime for ``name``: 404 when unknown, 503 until it is ready."""
        runtime = self.registry.get(name)
        if not runtime.ready or self.registry.closing:
            state = "shutting down" if self.registry.closing else (runtime.error or "warming up")
            raise NotReady(f"model {name!r} is not ready ({state}); retry shortly")
        return runtime

    # --- native v1 ----------------------------------------------------------------------------
    async def predict(self, name: str, body: bytes, received: float) -> Reply:
        runtime = self._serving(name)
        info = runtime.info
        request = _validate(PredictRequest, _parse_json(body))
        if (request.inputs is None) == (request.images is None):
            raise InvalidInput("give exactly one of 'inputs' (raw [0, 1] arrays) and 'images'")
        if request.inputs is not None:
            x = decode_array(request.inputs, info.config.input.shape, what="inputs")
        else:
            x = decode_images(request.images, info.config.input.shape)
        knobs = self._knobs(runtime, request.tol, request.max_iter, request.solver,
                            request.deadline_ms)  # fmt: skip
        result = await self._solve(runtime, x, knobs, received)
        classes = info.config.classes
        top_k = min(request.top_k, len(classes)) if request.top_k else 0
        predictions = _predictions(result, classes, top_k, request.return_probabilities)
        return Reply(
            {
                "model": name,
                "predictions": predictions,
                "solver": {"method": knobs.solver, "tol": knobs.tol, "max_iter": knobs.max_iter},
                "batch": {"id": result.batch_id, "size": result.batch_size},
                "timing_ms": _timing(result, received),
            }
        )

    # --- Open Inference Protocol (V2) ---------------------------------------------------------
    def server_metadata(self) -> dict[str, Any]:
        return {"name": "fpn-serve", "version": __version__, "extensions": ["binary_tensor_data"]}

    def v2_model_metadata(self, name: str) -> dict[str, Any]:
        runtime = self.registry.get(name)
        info = self._info(runtime)
        shape, classes = list(info.config.input.shape), len(info.config.classes)
        outputs = [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, classes]},
            {"name": "label", "datatype": "INT64", "shape": [-1]},
            {"name": "iterations", "datatype": "INT32", "shape": [-1]},
            {"name": "residual", "datatype": "FP32", "shape": [-1]},
            {"name": "converged", "datatype": "BOOL", "shape": [-1]},
        ]
        outputs += [
            {"name": k, "datatype": V2_DTYPES.get(dtype, "FP32"), "shape": [-1, *rest]}
            for k, (dtype, rest) in sorted(runtime.extra_outputs.items())
        ]
        return {
            "name": name,
            "versions": [],
            "platform": f"fpn-serve/{self.settings.backend}",
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, *shape]}],
            "outputs": outputs,
            "parameters": {
                "family": info.config.family,
                "classes": list(info.config.classes),
                "tol": info.config.solver.tol,
                "max_iter": info.config.solver.max_iter,
                "solver": info.config.solver.method,
            },
        }

    def v2_model_ready(self, name: str) -> dict[str, Any]:
        self._serving(name)
        return {"name": name, "ready": True}

    async def infer(
        self, name: str, body: bytes, received: float, header_length: str | None = None
    ) -> Reply:
        runtime = self._serving(name)
        info = runtime.info
        json_part, binary = _split_binary(body, header_length)
        request = _validate(V2InferenceRequest, _parse_json(json_part))
        if len(request.inputs) != 1:
            raise InvalidInput(f"model {name!r} takes one input tensor, got {len(request.inputs)}")
        x = decode_v2_input(request.inputs[0], binary, info.config.input)
        params = request.parameters or V2Parameters()
        knobs = self._knobs(runtime, params.tol, params.max_iter, params.solver, params.deadline_ms)
        wanted = _wanted_outputs(request, runtime, params.binary_data_output)
        result = await self._solve(runtime, x, knobs, received)
        if wanted is None:  # everything: the five outputs and whatever extras the family gave
            names = [*CORE_OUTPUTS, *sorted(result.extras)]
            wanted = [(n, params.binary_data_output) for n in names]
        outputs, chunks = [], []
        for output_name, as_binary in wanted:
            array = _v2_output(result, output_name)
            entry: dict[str, Any] = {
                "name": output_name,
                "datatype": V2_DTYPES[array.dtype],
                "shape": list(array.shape),
            }
            if as_binary:
                raw = np.ascontiguousarray(array).tobytes()
                entry["parameters"] = {"binary_data_size": len(raw)}
                chunks.append(raw)
            else:
                entry["data"] = array.ravel().tolist()
            outputs.append(entry)
        reply: dict[str, Any] = {"model_name": name}
        if request.id is not None:
            reply["id"] = request.id
        timing = _timing(result, received)
        reply["parameters"] = {
            "solver": knobs.solver,
            "tol": knobs.tol,
            "max_iter": knobs.max_iter,
            "batch_id": result.batch_id,
            "batch_size": result.batch_size,
            **{f"{k}_ms": v for k, v in timing.items()},
        }
        reply["outputs"] = outputs
        return Reply(reply, chunks)

    # --- admin --------------------------------------------------------------------------------
    async def reload(self, name: str, authorization: str | None) -> Reply:
        token = self.settings.admin_token
        if token is None:
            raise NotFound("the admin API is disabled (set FPN_ADMIN_TOKEN to enable it)")
        scheme, _, supplied = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            supplied.strip().encode(), token.get_secret_value().encode()
        ):
            raise Unauthorized("missing or wrong admin token: send 'Authorization: Bearer <token>'")
        runtime = self.registry.get(name)
        self._info(runtime)
        started = time.perf_counter()
        try:
            info = await runtime.reload()
        except (StartupError, UnsupportedModel) as exc:
            raise ServiceError(str(exc), status=409, code="reload_failed") from None
        return Reply(
            {
                "model": name,
                "reloaded": True,
                "family": info.config.family,
                "metrics": info.metrics,
                "seconds": round(time.perf_counter() - started, 3),
            }
        )

    # --- shared -------------------------------------------------------------------------------
    def _knobs(
        self,
        runtime: ModelRuntime,
        tol: float | None,
        max_iter: int | None,
        solver: str | None,
        deadline_ms: float | None,
    ) -> Knobs:
        defaults, s = runtime.info.config.solver, self.settings
        tol = defaults.tol if tol is None else float(tol)
        max_iter = defaults.max_iter if max_iter is None else int(max_iter)
        solver = runtime.info.default_solver if solver is None else solver
        if not s.min_tol <= tol <= 1.0:
            raise InvalidParameter(f"tol {tol:g} is outside [{s.min_tol:g}, 1] (FPN_MIN_TOL)")
        if not 1 <= max_iter <= s.max_iter_limit:
            raise InvalidParameter(
                f"max_iter {max_iter} is outside [1, {s.max_iter_limit}] (FPN_MAX_ITER_LIMIT)"
            )
        if solver not in runtime.info.solvers:
            raise InvalidParameter(
                f"unknown solver {solver!r}; available: {list(runtime.info.solvers)}"
            )
        if deadline_ms is not None and not (deadline_ms > 0 and math.isfinite(deadline_ms)):
            raise InvalidParameter("deadline_ms must be a positive number of milliseconds")
        return Knobs(tol, max_iter, solver, deadline_ms)

    async def _solve(
        self, runtime: ModelRuntime, x: np.ndarray, knobs: Knobs, received: float
    ) -> ItemResult:
        if x.shape[0] > self.settings.max_batch_size:
            raise BatchTooLarge(
                f"{x.shape[0]} samples in one request; at most {self.settings.max_batch_size} "
                "(FPN_MAX_BATCH_SIZE): split the request"
            )
        deadline = None if knobs.deadline_ms is None else received + knobs.deadline_ms / 1000.0
        item = WorkItem(x, knobs.tol, knobs.max_iter, knobs.solver, deadline)
        return await runtime.scheduler.submit(item)


# --- decoding -----------------------------------------------------------------------------------
def _parse_json(body: bytes) -> Any:
    if not body:
        raise InvalidJSON("empty request body: send a JSON object")
    try:
        document = jsonio.loads(body)
    except (jsonio.JSONDecodeError, ValueError, UnicodeDecodeError) as exc:
        raise InvalidJSON(f"request body is not valid JSON ({exc})") from None
    if not isinstance(document, dict):
        raise InvalidJSON("request body must be a JSON object")
    return document


def _validate(model: type[BaseModel], document: dict[str, Any]):
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()
        )
        raise InvalidParameter(f"invalid request: {problems}") from None


def decode_array(raw: Any, shape: tuple[int, ...], *, what: str) -> np.ndarray:
    """A JSON array of raw intensities -> (N, *shape) float32, checked.

    Accepted layouts: (N, *shape), (N, H, W) for one-channel images, (N, prod(shape)).
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


def _split_binary(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """V2 binary tensor extension: the JSON header comes first, its length in a header."""
    if header_length is None:
        return body, b""
    try:
        n = int(header_length)
    except ValueError:
        raise InvalidInput("Inference-Header-Content-Length must be an integer") from None
    if not 0 < n <= len(body):
        raise InvalidInput(f"Inference-Header-Content-Length {n} does not fit the body")
    return body[:n], body[n:]


def decode_v2_input(tensor, binary: bytes, spec) -> np.ndarray:
    """One V2 input tensor (FP32 raw intensities or UINT8 pixels) -> (N, *shape) float32."""
    dtype = V2_INPUT_DTYPES.get(tensor.datatype.upper())
    if dtype is None:
        raise InvalidInput(f"datatype {tensor.datatype!r} is not supported; send FP32 or UINT8")
    shape = tensor.shape
    if not shape or any(d < 0 for d in shape):
        raise InvalidInput(f"shape {shape} must be a list of non-negative sizes")
    count = math.prod(shape)
    size = (tensor.parameters or {}).get("binary_data_size")
    if size is not None:
        if size != len(binary) or size != count * dtype.itemsize:
            raise InvalidInput(
                f"binary_data_size {size} does not match shape {shape} x {tensor.datatype} "
                f"or the {len(binary)} bytes sent"
            )
        array = np.frombuffer(binary, dtype=dtype)
    else:
        if tensor.data is None:
            raise InvalidInput(f"input {tensor.name!r} has no data")
        try:
            array = np.asarray(tensor.data)
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
        array = array.astype(np.float32) * np.float32(spec.scale)
    return check_intensities(array.astype(np.float32, copy=False), spec.shape, what="input")


def _wanted_outputs(
    request, runtime: ModelRuntime, binary_default: bool
) -> list[tuple[str, bool]] | None:
    """(name, binary) of each requested output, checked before solving; None: all of them."""
    if request.outputs is None:
        return None
    available = [*CORE_OUTPUTS, *sorted(runtime.extra_outputs)]
    wanted = []
    for output in request.outputs:
        if output.name not in available:
            raise InvalidParameter(f"unknown output {output.name!r}; available: {available}")
        flag = (output.parameters or {}).get("binary_data", binary_default)
        wanted.append((output.name, bool(flag)))
    return wanted


# --- encoding -----------------------------------------------------------------------------------
def _v2_output(result: ItemResult, name: str) -> np.ndarray:
    if name == "probabilities":
        return result.probabilities.astype(np.float32, copy=False)
    if name == "label":
        return result.probabilities.argmax(axis=1).astype(np.int64)
    if name == "iterations":
        return result.iterations.astype(np.int32)
    if name == "residual":
        return result.residual.astype(np.float32, copy=False)
    if name == "converged":
        return result.converged.astype(np.bool_, copy=False)
    array = np.asarray(result.extras[name])
    return array if array.dtype in V2_DTYPES else array.astype(np.float32)


def _predictions(
    result: ItemResult, classes: tuple[str, ...], top_k: int, probabilities: bool
) -> list[dict[str, Any]]:
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


def _timing(result: ItemResult, received: float) -> dict[str, float]:
    return {
        "queue": round(result.queue_seconds * 1e3, 3),
        "solve": round(result.solve_seconds * 1e3, 3),
        "total": round((time.perf_counter() - received) * 1e3, 3),
    }
