"""The app factory: ``create_app(settings=None) -> FastAPI``.

Nothing heavy happens at import time or in the factory. The lifespan loads every checkpoint
(failing start-up with a message that names the file when one cannot be loaded), starts one
batcher per model, then warms the models in the background: ``/healthz`` answers at once,
``/readyz`` and predictions answer 503 until every model is warm. The gRPC listener
(``FPN_GRPC_PORT``) starts with the models and stops with them, in the same event loop.

Draining (SIGTERM, driven by ``fpn-serve``): :meth:`Drain.begin` turns readiness (``/readyz``, V2
readiness over HTTP and gRPC) false at once and makes every response carry
``Connection: close``, while the listeners stay open; the CLI then closes them. On shutdown
(after uvicorn has stopped accepting connections and drained the open ones) gRPC gets its
graceful stop, the service stops taking requests, solves what is still queued and releases the
models.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import __version__, routes_v1, routes_v2
from .errors import InternalError, InvalidParameter, MethodNotAllowed, NotFound, ServiceError
from .grpc_server import GrpcServer
from .handlers import Handler
from .interpreter import tune_for_serving
from .metrics import Metrics
from .routes_common import CLIENT_CLOSED, json_response
from .runtime import ModelRegistry
from .schemas import PredictRequest, V2InferenceRequest
from .settings import Settings

log = logging.getLogger("fpn_serve")


class Drain:
    """The app's shutdown state, shared by HTTP (middleware, readiness) and gRPC."""

    def __init__(self, handler: Handler, grace_seconds: float) -> None:
        self.handler = handler
        self.grace_seconds = grace_seconds
        self.grpc: GrpcServer | None = None

    @property
    def draining(self) -> bool:
        return self.handler.draining

    def begin(self) -> None:
        """Readiness false, ``Connection: close`` on every response; listeners stay open."""
        self.handler.draining = True  # may run in a signal handler: no logging here

    async def close_listeners(self) -> None:
        """Stop gRPC gracefully (in-flight calls get ``grace_seconds``); HTTP's listener is
        uvicorn's to close."""
        if self.grpc is not None:
            await self.grpc.stop(self.grace_seconds)


class ConnectionCloseWhileDraining:
    """ASGI middleware: while draining, every HTTP response carries ``Connection: close``, so a
    keep-alive client opens its next request elsewhere instead of racing the listener's close."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def closing_send(message: Message) -> None:
            if message["type"] == "http.response.start" and self.drain.draining:
                headers = [(k, v) for k, v in message.get("headers", []) if k != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, closing_send)


def create_app(
    settings: Settings | None = None,
    *,
    http_host: str = "127.0.0.1",
    grace_seconds: float = 30.0,
    tune_interpreter: bool = False,
) -> FastAPI:
    """Build the service for ``settings`` (default: from ``FPN_*`` environment variables).

    ``http_host``: the HTTP server's interface, where gRPC listens too unless ``FPN_GRPC_HOST``
    says otherwise; ``grace_seconds``: how long in-flight gRPC calls may take on shutdown;
    ``tune_interpreter``: once the models are loaded, apply the process-wide
    :func:`~service.interpreter.tune_for_serving` (``fpn-serve`` does: it owns its process).
    """
    settings = settings or Settings()
    metrics = Metrics()
    registry = ModelRegistry(settings, metrics)
    handler = Handler(settings, registry)
    drain = Drain(handler, grace_seconds)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            await registry.load_all()
            if tune_interpreter:
                tune_for_serving(gc_threshold=settings.gc_threshold,
                                 switch_interval_ms=settings.gil_switch_interval_ms)  # fmt: skip
            if settings.grpc_port:
                host = settings.grpc_host or http_host
                drain.grpc = GrpcServer(handler, metrics, host, settings.grpc_port)
                await drain.grpc.start()
        except Exception as exc:
            log.error("fpn-serve cannot start: %s", exc)
            await registry.close()
            raise
        warming = asyncio.create_task(registry.warm_all(), name="warm-up")
        try:
            yield
        finally:
            drain.begin()
            await drain.close_listeners()
            registry.closing = True
            if not warming.done():
                warming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await warming
            await registry.close()

    app = FastAPI(
        title="fpn-serve",
        version=__version__,
        description="Adaptive-depth predictions from fixed point networks.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.registry = registry
    app.state.handler = handler
    app.state.drain = drain
    app.add_middleware(ConnectionCloseWhileDraining, drain=drain)
    app.include_router(routes_v1.router)
    app.include_router(routes_v2.router)
    _install_error_handlers(app)
    _install_openapi(app)
    return app


def _error_response(error: ServiceError, headers: dict[str, str] | None = None) -> Response:
    return json_response(error.body(), error.status, {**error.headers, **(headers or {})} or None)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> Response:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        return _error_response(InvalidParameter(f"invalid request: {problems}"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        error: ServiceError
        if exc.status_code == 404:
            error = NotFound(f"no route {request.method} {request.url.path}; see /docs")
        elif exc.status_code == 405:
            allow = _allowed_methods(request) or (exc.headers or {}).get("Allow", "")
            error = MethodNotAllowed(
                f"{request.method} is not allowed on {request.url.path}; allowed: {allow}"
            )
            return _error_response(error, {"Allow": allow})
        else:
            error = ServiceError(str(exc.detail), status=exc.status_code, code="http_error")
        return _error_response(error)

    @app.exception_handler(ClientDisconnect)
    async def client_left(request: Request, exc: ClientDisconnect) -> Response:
        return Response(status_code=CLIENT_CLOSED)  # nobody is there to read it

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _error_response(InternalError("internal error; see the server log"))


def _allowed_methods(request: Request) -> str:
    """The methods the routes matching ``request``'s path accept (for a 405's ``Allow``)."""
    from starlette.routing import Match

    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches({**request.scope, "method": "GET"})
        if match != Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return ", ".join(sorted(methods))


def _nullable(schema: dict[str, Any], field: dict[str, Any]) -> dict[str, Any]:
    """``field``'s documentation with its non-null alternative replaced by ``schema``."""
    kept = {k: v for k, v in field.items() if k not in ("anyOf", "type")}
    return {**kept, "anyOf": [schema, {"type": "null"}]}


def _request_schemas(settings: Settings, solvers: list[str]) -> dict[str, dict[str, Any]]:
    """The request bodies as the service validates them: the limits of ``settings`` (SPEC §7)
    and the solvers the served models offer, on top of the pydantic models' own schemas."""
    limits = settings.limits
    components: dict[str, dict[str, Any]] = {}
    for model in (PredictRequest, V2InferenceRequest):
        doc = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(doc.pop("$defs", {}))
        components[model.__name__] = doc
    knobs = {
        "tol": {"type": "number", "minimum": limits.min_tol, "maximum": limits.max_tol},
        "max_iter": {"type": "integer", "minimum": 1, "maximum": limits.max_iter_limit},
    }
    if solvers:
        knobs["solver"] = {"type": "string", "enum": solvers}
    for name in ("PredictRequest", "V2Parameters"):
        properties = components[name]["properties"]
        for key, schema in knobs.items():
            properties[key] = _nullable(schema, properties[key])
    predict = components["PredictRequest"]["properties"]
    batch = {"minItems": 1, "maxItems": limits.max_batch_size}
    predict["inputs"] = _nullable({"type": "array", **batch}, predict["inputs"])
    predict["images"] = _nullable(
        {"type": "array", "items": {"type": "string", "minLength": 1}, **batch},
        predict["images"],
    )
    tensor = components["V2RequestInput"]["properties"]
    tensor["shape"] = {
        **tensor["shape"],
        "items": {"type": "integer", "minimum": 0},
        "minItems": 2,
        "description": "[N, *input shape] or [N, prod(input shape)], N >= 1",
    }
    inputs = components["V2InferenceRequest"]["properties"]["inputs"]
    inputs.update({"minItems": 1, "maxItems": 1, "description": "the one input tensor"})
    return components


def _install_openapi(app: FastAPI) -> None:
    """Add the request schemas that the hot-path routes read themselves to the OpenAPI doc."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description,
                routes=app.routes,
            )  # fmt: skip
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            registry: ModelRegistry = app.state.registry
            solvers = sorted(
                {s for m in registry.models.values() if m.info for s in m.info.solvers}
            )
            components.update(_request_schemas(app.state.settings, solvers))
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented override
