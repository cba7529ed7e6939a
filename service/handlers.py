"""The request logic behind every protocol, free of HTTP and gRPC framework types.

Routes (``routes_v1``, ``routes_v2``) and the gRPC servicer (``grpc_server``) read bytes,
headers or messages and call a :class:`Handler` method; the handler decodes and checks the
request (``codecs``), queues its samples on the model's scheduler, waits for them and returns
plain data. Every client mistake is raised as a :class:`~service.errors.ServiceError`, before
anything is queued, so a bad request never reaches, and so never disturbs, a batch. A request
whose caller goes away (an HTTP disconnect, a cancelled gRPC call) is cancelled: its future is
cancelled, so the scheduler drops its samples, and it is counted in
``fpn_requests_cancelled_total``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import __version__, codecs
from .backends import ModelInfo, UnsupportedModel
from .batcher import ItemResult, WorkItem
from .codecs import TensorSpec
from .errors import (
    BatchTooLarge,
    InvalidInput,
    InvalidParameter,
    NotFound,
    NotReady,
    ServiceError,
    Unauthorized,
)
from .runtime import ModelRegistry, ModelRuntime, StartupError
from .schemas import PredictRequest, V2InferenceRequest, V2Parameters
from .settings import Settings

log = logging.getLogger("fpn_serve")


class Cancelled(Exception):
    """The caller went away before its answer was ready; nothing is sent back."""


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
        self.limits = settings.limits
        self.registry = registry
        self.draining = False  # set on SIGTERM: readiness turns false, requests still served

    # --- health and metadata ------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """Every model loaded and warm, and the process not draining before shutdown."""
        return self.registry.ready and not self.draining

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
            "limits": self.limits.as_dict(),
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

    def _info(self, runtime: ModelRuntime) -> ModelInfo:
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
        info = runtime.loaded_info
        request = codecs.validate(PredictRequest, codecs.parse_json(body))
        if (request.inputs is None) == (request.images is None):
            raise InvalidInput("give exactly one of 'inputs' (raw [0, 1] arrays) and 'images'")
        if request.inputs is not None:
            x = codecs.decode_array(request.inputs, info.config.input.shape, what="inputs")
        else:
            x = codecs.decode_images(request.images, info.config.input.shape)
        knobs = self._knobs(runtime, request.tol, request.max_iter, request.solver,
                            request.deadline_ms)  # fmt: skip
        result = await self._solve(runtime, x, knobs, received)
        classes = info.config.classes
        top_k = min(request.top_k, len(classes)) if request.top_k else 0
        predictions = codecs.predictions(result, classes, top_k, request.return_probabilities)
        return Reply(
            {
                "model": name,
                "predictions": predictions,
                "solver": {"method": knobs.solver, "tol": knobs.tol, "max_iter": knobs.max_iter},
                "batch": {"id": result.batch_id, "size": result.batch_size},
                "timing_ms": codecs.timing(result, received),
            }
        )

    # --- Open Inference Protocol (V2), shared by HTTP and gRPC --------------------------------
    def server_metadata(self) -> dict[str, Any]:
        return {"name": "fpn-serve", "version": __version__, "extensions": ["binary_tensor_data"]}

    def v2_model_metadata(self, name: str) -> dict[str, Any]:
        runtime = self.registry.get(name)
        info = self._info(runtime)
        return {
            "name": name,
            "versions": [],
            "platform": f"fpn-serve/{self.settings.backend}",
            "inputs": [
                {"name": "input", "datatype": "FP32", "shape": [-1, *info.config.input.shape]}
            ],
            "outputs": [spec.as_dict() for spec in self.output_schema(runtime)],
            "parameters": {
                "family": info.config.family,
                "classes": list(info.config.classes),
                "tol": info.config.solver.tol,
                "max_iter": info.config.solver.max_iter,
                "solver": info.config.solver.method,
            },
        }

    def output_schema(self, runtime: ModelRuntime) -> list[TensorSpec]:
        """The model's V2 outputs (core outputs, then the family's extras seen at warm-up)."""
        info = self._info(runtime)
        return codecs.v2_output_schema(len(info.config.classes), runtime.extra_outputs)

    def v2_model_ready(self, name: str) -> dict[str, Any]:
        """Ready when the model serves and the process is not draining (404 unknown, else 503)."""
        self._serving(name)
        if self.draining:
            raise NotReady(f"model {name!r} is not ready (draining before shutdown)")
        return {"name": name, "ready": True}

    async def infer(
        self, name: str, body: bytes, received: float, header_length: str | None = None
    ) -> Reply:
        """V2 over HTTP: JSON tensors, or the binary tensor data extension."""
        runtime = self._serving(name)
        json_part, binary = codecs.split_binary(body, header_length)
        request = codecs.validate(V2InferenceRequest, codecs.parse_json(json_part))
        if len(request.inputs) != 1:
            raise InvalidInput(f"model {name!r} takes one input tensor, got {len(request.inputs)}")
        x = codecs.decode_v2_json_input(request.inputs[0], binary, runtime.loaded_info.config.input)
        params = request.parameters or V2Parameters()
        binary_default = params.binary_data_output
        requested = None
        if request.outputs is not None:
            requested = [o.name for o in request.outputs]
            as_binary = {
                o.name: bool((o.parameters or {}).get("binary_data", binary_default))
                for o in request.outputs
            }
        outputs, knobs, result = await self.infer_tensors(runtime, x, params, requested, received)
        entries, chunks = codecs.encode_v2_json_outputs(
            [
                (spec, array, as_binary[spec.name] if requested else binary_default)
                for spec, array in outputs
            ]
        )
        reply: dict[str, Any] = {"model_name": name}
        if request.id is not None:
            reply["id"] = request.id
        reply["parameters"] = self.v2_reply_parameters(knobs, result, received)
        reply["outputs"] = entries
        return Reply(reply, chunks)

    async def infer_tensors(
        self,
        runtime: ModelRuntime,
        x: np.ndarray,
        params: V2Parameters,
        requested: list[str] | None,
        received: float,
        *,
        deadline_ms: float | None = None,
    ) -> tuple[list[tuple[TensorSpec, np.ndarray]], Knobs, ItemResult]:
        """Solve ``x`` for a V2 request (either protocol); return its outputs as (spec, array),
        every one in the schema's order when ``requested`` is None. ``deadline_ms``: the
        transport's own deadline (a gRPC deadline), combined with the parameter's."""
        wanted = None if requested is None else codecs.select_outputs(
            self.output_schema(runtime), requested
        )  # fmt: skip
        budget = params.deadline_ms
        if deadline_ms is not None:
            budget = deadline_ms if budget is None else min(budget, deadline_ms)
        knobs = self._knobs(runtime, params.tol, params.max_iter, params.solver, budget)
        result = await self._solve(runtime, x, knobs, received)
        if wanted is None:  # everything: the core outputs and whatever extras the family gave
            extras = {k: (np.asarray(v).dtype, np.shape(v)[1:]) for k, v in result.extras.items()}
            wanted = codecs.v2_output_schema(len(runtime.loaded_info.config.classes), extras)
        return [(spec, codecs.v2_output(result, spec)) for spec in wanted], knobs, result

    def v2_reply_parameters(
        self, knobs: Knobs, result: ItemResult, received: float
    ) -> dict[str, Any]:
        """The response ``parameters`` of a V2 answer: the solver that ran, batch and timing."""
        return {
            "solver": knobs.solver,
            "tol": knobs.tol,
            "max_iter": knobs.max_iter,
            "batch_id": result.batch_id,
            "batch_size": result.batch_size,
            **{f"{k}_ms": v for k, v in codecs.timing(result, received).items()},
        }

    def serving(self, name: str) -> ModelRuntime:
        """The runtime serving ``name``: 404 when unknown, 503 until it is ready."""
        return self._serving(name)

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

    # --- cancellation -------------------------------------------------------------------------
    def cancelled(self, name: str, endpoint: str, why: str) -> None:
        """Count a request whose caller went away (one log line, no traceback)."""
        model = self.model_label(name) or ""
        self.registry.metrics.requests_cancelled.labels(model, endpoint).inc()
        log.info("request cancelled on %s (%s): %s", endpoint, model or "unknown model", why)

    # --- shared -------------------------------------------------------------------------------
    def _knobs(
        self,
        runtime: ModelRuntime,
        tol: float | None,
        max_iter: int | None,
        solver: str | None,
        deadline_ms: float | None,
    ) -> Knobs:
        info = runtime.loaded_info
        defaults, limits = info.config.solver, self.limits
        tol = defaults.tol if tol is None else float(tol)
        max_iter = defaults.max_iter if max_iter is None else int(max_iter)
        solver = info.default_solver if solver is None else solver
        for problem in (limits.tol_problem(tol), limits.max_iter_problem(max_iter)):
            if problem is not None:
                raise InvalidParameter(problem)
        if solver not in info.solvers:
            raise InvalidParameter(f"unknown solver {solver!r}; available: {list(info.solvers)}")
        if deadline_ms is not None and not (deadline_ms > 0 and math.isfinite(deadline_ms)):
            raise InvalidParameter("deadline_ms must be a positive number of milliseconds")
        return Knobs(tol, max_iter, solver, deadline_ms)

    async def _solve(
        self, runtime: ModelRuntime, x: np.ndarray, knobs: Knobs, received: float
    ) -> ItemResult:
        problem = self.limits.batch_problem(x.shape[0])
        if problem is not None:
            raise BatchTooLarge(problem)
        deadline = None if knobs.deadline_ms is None else received + knobs.deadline_ms / 1000.0
        item = WorkItem(x, knobs.tol, knobs.max_iter, knobs.solver, deadline)
        future = runtime.loaded_scheduler.submit(item)
        try:
            return await future
        except asyncio.CancelledError:
            # The caller went away: the scheduler drops a cancelled item (from the queue, and
            # from the running solve at its next iteration).
            future.cancel()
            raise
