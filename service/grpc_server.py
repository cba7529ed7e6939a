"""The Open Inference Protocol over gRPC (``inference.GRPCInferenceService``, SPEC §6).

A ``grpc.aio`` server on ``FPN_GRPC_PORT``, in the same process and event loop as the HTTP
server, started and stopped by the app's lifespan. Every RPC calls the same :class:`Handler` as
the HTTP V2 routes: same checks, limits, batcher and metrics (``endpoint="grpc_infer"``,
``code`` the HTTP status of the outcome). Errors are gRPC status codes carrying the message of
the HTTP error body:

==========================  ============================================
HTTP                        gRPC
==========================  ============================================
422 invalid input/parameter ``INVALID_ARGUMENT``
404 unknown model           ``NOT_FOUND``
413 request too large       ``RESOURCE_EXHAUSTED``
503 queue full / not ready  ``UNAVAILABLE``
==========================  ============================================

Parameters ``tol``, ``max_iter``, ``solver``, ``deadline_ms`` are read from the request's
parameter map (double, int64 or string values). The call's gRPC deadline caps the samples'
iterations like ``deadline_ms``; a call cancelled by its client (or past its deadline) is
cancelled in the scheduler and counted in ``fpn_requests_cancelled_total``. Outputs are
``raw_output_contents`` when the request used ``raw_input_contents`` (as Triton answers), else
typed contents.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import grpc

from . import codecs
from .errors import BodyTooLarge, ModelNotFound, NotReady, ServiceError
from .handlers import Handler
from .metrics import UNKNOWN_MODEL, Metrics
from .schemas import V2Parameters

log = logging.getLogger("fpn_serve.grpc")

ENDPOINT = "grpc_infer"
CLIENT_CLOSED = 499
DEADLINE_MARGIN_MS = 1.0
"""Taken off a call's deadline for the answer's trip back (encoding, the network)."""

STATUS_CODES = {
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    503: grpc.StatusCode.UNAVAILABLE,
}
"""HTTP status of a :class:`ServiceError` -> gRPC status code (anything else: ``INTERNAL``)."""


def status_code(error: ServiceError) -> grpc.StatusCode:
    return STATUS_CODES.get(error.status, grpc.StatusCode.INTERNAL)


def _set_parameter(parameters: Any, key: str, value: bool | int | float | str) -> None:
    if isinstance(value, bool):
        parameters[key].bool_param = value
    elif isinstance(value, int):
        parameters[key].int64_param = value
    elif isinstance(value, float):
        parameters[key].double_param = value
    else:
        parameters[key].string_param = str(value)


def _servicer(handler: Handler, metrics: Metrics, max_request_bytes: int) -> Any:
    """The GRPCInferenceService implementation (the generated modules are imported here, only
    where gRPC is served: see ``service.protocol``)."""
    from .protocol import open_inference_grpc_pb2 as pb
    from .protocol import open_inference_grpc_pb2_grpc as pb_grpc

    async def _abort(context: grpc.aio.ServicerContext, error: ServiceError) -> None:
        await context.abort(status_code(error), error.message)

    class Servicer(pb_grpc.GRPCInferenceServiceServicer):
        async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
            return pb.ServerLiveResponse(live=True)

        async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
            return pb.ServerReadyResponse(ready=handler.ready)

        async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                handler.v2_model_ready(request.name)
            except NotReady:
                return pb.ModelReadyResponse(ready=False)
            except ModelNotFound as exc:
                await _abort(context, exc)
            return pb.ModelReadyResponse(ready=True)

        async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
            return pb.ServerMetadataResponse(**handler.server_metadata())

        async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                meta = handler.v2_model_metadata(request.name)
            except ServiceError as exc:
                await _abort(context, exc)
            tensor = pb.ModelMetadataResponse.TensorMetadata
            return pb.ModelMetadataResponse(
                name=meta["name"],
                versions=meta["versions"],
                platform=meta["platform"],
                inputs=[tensor(**t) for t in meta["inputs"]],
                outputs=[tensor(**t) for t in meta["outputs"]],
            )

        async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
            received = time.perf_counter()
            name = request.model_name
            code = 500
            try:
                response = await self._infer(request, context, received)
                code = 200
                return response
            except ServiceError as exc:
                code = exc.status
                await _abort(context, exc)
            except asyncio.CancelledError:
                code = CLIENT_CLOSED
                handler.cancelled(name, ENDPOINT, "the gRPC call was cancelled or timed out")
                raise
            except Exception:
                log.exception("unexpected error in ModelInfer for model %r", name)
                await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")
            finally:
                if code != CLIENT_CLOSED:
                    model = handler.model_label(name) or UNKNOWN_MODEL
                    metrics.observe_request(model, ENDPOINT, code, time.perf_counter() - received)

        async def _infer(
            self, request: Any, context: grpc.aio.ServicerContext, received: float
        ) -> Any:
            size = request.ByteSize()
            if size > max_request_bytes:
                raise BodyTooLarge(
                    f"request is {size} bytes; the limit is {max_request_bytes} "
                    "(FPN_MAX_BODY_BYTES): send fewer samples per request"
                )
            runtime = handler.serving(request.model_name)
            x = codecs.decode_grpc_input(request, runtime.loaded_info.config.input)
            params = codecs.validate(
                V2Parameters, codecs.grpc_parameters(request.parameters), at="parameters"
            )
            requested = [output.name for output in request.outputs] or None
            remaining = context.time_remaining()
            outputs, knobs, result = await handler.infer_tensors(
                runtime, x, params, requested, received,
                deadline_ms=None if remaining is None else max(
                    remaining * 1000.0 - DEADLINE_MARGIN_MS, 1e-3
                ),
            )  # fmt: skip
            response = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
            for key, value in handler.v2_reply_parameters(knobs, result, received).items():
                _set_parameter(response.parameters, key, value)
            codecs.encode_grpc_outputs(response, outputs, raw=bool(request.raw_input_contents))
            return response

    return Servicer(), pb_grpc.add_GRPCInferenceServiceServicer_to_server


class GrpcServer:
    """The gRPC listener of one app: ``await start()`` in the lifespan, ``await stop(grace)``
    on shutdown (in-flight calls get ``grace`` seconds to finish)."""

    def __init__(self, handler: Handler, metrics: Metrics, host: str, port: int) -> None:
        self.handler = handler
        self.metrics = metrics
        self.address = f"{host}:{port}"
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._stopping: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Bind and serve; return the bound port. Raises RuntimeError when it cannot bind."""
        limit = self.handler.limits.max_body_bytes
        # gRPC's own cap sits above ours, so that an oversized request gets our message.
        cap = 2 * limit + 64 * 1024
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", cap),
                ("grpc.max_send_message_length", -1),
                ("grpc.so_reuseport", 0),
            ]
        )
        servicer, register = _servicer(self.handler, self.metrics, limit)
        register(servicer, server)
        try:
            port = server.add_insecure_port(self.address)
        except RuntimeError as exc:
            raise RuntimeError(f"cannot listen for gRPC on {self.address}: {exc}") from None
        if port == 0:
            raise RuntimeError(f"cannot listen for gRPC on {self.address} (FPN_GRPC_PORT)")
        await server.start()
        self._server, self.port = server, port
        log.info("gRPC (Open Inference Protocol) listening on %s", self.address)
        return port

    async def stop(self, grace: float) -> None:
        """Refuse new calls, give in-flight ones ``grace`` seconds, then cancel them (once:
        later calls wait for the same stop)."""
        if self._server is None:
            return
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._server.stop(grace))
        await asyncio.shield(self._stopping)
