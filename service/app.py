"""The app factory: ``create_app(settings=None) -> FastAPI``.

Nothing heavy happens at import time or in the factory. The lifespan loads every checkpoint
(failing start-up with a message that names the file when one cannot be loaded), starts one
batcher per model, then warms the models in the background: ``/healthz`` answers at once,
``/readyz`` and predictions answer 503 until every model is warm. On shutdown (after uvicorn has
stopped accepting connections and drained the open ones) the service stops taking requests,
solves what is still queued and releases the models.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import __version__, routes_v1, routes_v2
from .errors import InternalError, InvalidParameter, MethodNotAllowed, NotFound, ServiceError
from .handlers import Handler
from .metrics import Metrics
from .routes_common import json_response
from .runtime import ModelRegistry
from .schemas import PredictRequest, V2InferenceRequest
from .settings import Settings

log = logging.getLogger("fpn_serve")


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the service for ``settings`` (default: from ``FPN_*`` environment variables)."""
    settings = settings or Settings()
    metrics = Metrics()
    registry = ModelRegistry(settings, metrics)
    handler = Handler(settings, registry)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            await registry.load_all()
        except Exception as exc:
            log.error("fpn-serve cannot start: %s", exc)
            await registry.close()
            raise
        warming = asyncio.create_task(registry.warm_all(), name="warm-up")
        try:
            yield
        finally:
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
    app.include_router(routes_v1.router)
    app.include_router(routes_v2.router)
    _install_error_handlers(app)
    _install_openapi(app)
    return app


def _error_response(error: ServiceError) -> Response:
    return json_response(error.body(), error.status, error.headers or None)


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
        if exc.status_code == 404:
            error = NotFound(f"no route {request.method} {request.url.path}; see /docs")
        elif exc.status_code == 405:
            error = MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}")
        else:
            error = ServiceError(str(exc.detail), status=exc.status_code, code="http_error")
        return _error_response(error)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _error_response(InternalError("internal error; see the server log"))


def _install_openapi(app: FastAPI) -> None:
    """Add the request schemas that the hot-path routes read themselves to the OpenAPI doc."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description,
                routes=app.routes,
            )  # fmt: skip
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (PredictRequest, V2InferenceRequest):
                doc = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(doc.pop("$defs", {}))
                components[model.__name__] = doc
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
