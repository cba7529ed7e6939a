"""Native v1 API, health and metrics (SPEC §6): HTTP only, the work is in the handler."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from .metrics import CONTENT_TYPE
from .routes_common import errors, handler_of, instrumented, json_response, request_body
from .schemas import (
    ModelList,
    ModelMetadata,
    NotReadyResponse,
    PredictRequest,
    PredictResponse,
    Readiness,
    ReloadResponse,
    Status,
)

router = APIRouter()


@router.get("/healthz", tags=["health"], response_model=Status)
async def healthz() -> Response:
    """200 while the process is up."""
    return json_response({"status": "ok"})


@router.get(
    "/readyz",
    tags=["health"],
    response_model=Readiness,
    responses={503: {"model": NotReadyResponse, "description": "loading, warming or draining"}},
)
async def readyz(request: Request) -> Response:
    """200 once every model is loaded and warmed; 503 (with Retry-After) before and while
    shutting down."""
    handler = handler_of(request)
    state = handler.readiness()
    if state["ready"]:
        return json_response(state)
    why = "draining before shutdown" if handler.draining else "models are loading or warming up"
    body = {"error": "not_ready", "message": why, **state}
    return json_response(body, 503, {"Retry-After": "1"})


@router.get(
    "/metrics",
    tags=["health"],
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE.split(";")[0]: {"schema": {"type": "string"}}}}},
)
async def metrics(request: Request) -> Response:
    """Prometheus text format (SPEC §8)."""
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)


@router.get("/v1/models", tags=["v1"], response_model=ModelList)
async def list_models(request: Request) -> Response:
    """Every served model: name, family, device, backend, input shape, classes."""
    return json_response(handler_of(request).list_models())


@router.get(
    "/v1/models/{name}", tags=["v1"], response_model=ModelMetadata, responses=errors(404, 503)
)
async def model_metadata(name: str, request: Request) -> Response:
    """Config, solver defaults, limits and training metrics of one model."""
    return json_response(handler_of(request).model_metadata(name))


@router.post(
    "/v1/models/{name}/predict",
    tags=["v1"],
    response_model=PredictResponse,
    responses=errors(404, 413, 422, 503),
    openapi_extra=request_body(PredictRequest),
)
async def predict(name: str, request: Request) -> Response:
    """Classify a batch with per-request ``tol`` / ``max_iter`` (adaptive depth)."""

    async def work(handler, body, received):
        return await handler.predict(name, body, received)

    limit = handler_of(request).limits.max_body_bytes
    return await instrumented(request, "predict", name, work, body_limit=limit)


@router.post(
    "/v1/models/{name}/reload",
    tags=["admin"],
    response_model=ReloadResponse,
    responses={
        **errors(401, 409, 503),
        404: {**errors(404)[404], "description": "unknown model, or no FPN_ADMIN_TOKEN set"},
    },
)
async def reload(name: str, request: Request) -> Response:
    """Reload a model from disk (``Authorization: Bearer $FPN_ADMIN_TOKEN``; 404 when no
    token is configured, 401 when it is missing or wrong)."""
    authorization = request.headers.get("authorization")

    async def work(handler, body, received):
        return await handler.reload(name, authorization)

    return await instrumented(request, "reload", name, work)
