"""Open Inference Protocol (KServe V2) routes, so standard V2 clients work unchanged.

Supports JSON tensors (``data`` flat or nested) and the binary tensor data extension
(``Inference-Header-Content-Length``) for inputs and outputs. The same protocol over gRPC is
``service.grpc_server``; both call the same handler.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from .routes_common import (
    BINARY_HEADER,
    errors,
    handler_of,
    instrumented,
    json_response,
    request_body,
)
from .schemas import (
    V2InferenceRequest,
    V2InferenceResponse,
    V2Live,
    V2ModelMetadata,
    V2Ready,
    V2ServerMetadata,
)

router = APIRouter(prefix="/v2", tags=["v2"])


@router.get("", response_model=V2ServerMetadata)
async def server_metadata(request: Request) -> Response:
    return json_response(handler_of(request).server_metadata())


@router.get("/health/live", response_model=V2Live)
async def live() -> Response:
    return json_response({"live": True})


@router.get(
    "/health/ready",
    response_model=V2Ready,
    responses={503: {"model": V2Ready, "description": "not ready (loading or draining)"}},
)
async def ready(request: Request) -> Response:
    if handler_of(request).ready:
        return json_response({"ready": True})
    return json_response({"ready": False}, 503, {"Retry-After": "1"})


@router.get("/models/{name}", response_model=V2ModelMetadata, responses=errors(404, 503))
async def model_metadata(name: str, request: Request) -> Response:
    return json_response(handler_of(request).v2_model_metadata(name))


@router.get("/models/{name}/ready", response_model=V2Ready, responses=errors(404, 503))
async def model_ready(name: str, request: Request) -> Response:
    return json_response(handler_of(request).v2_model_ready(name))


@router.post(
    "/models/{name}/infer",
    response_model=V2InferenceResponse,
    responses=errors(404, 413, 422, 503),
    openapi_extra=request_body(V2InferenceRequest),
)
async def infer(name: str, request: Request) -> Response:
    header_length = request.headers.get(BINARY_HEADER)

    async def work(handler, body, received):
        return await handler.infer(name, body, received, header_length)

    limit = handler_of(request).limits.max_body_bytes
    return await instrumented(request, "infer", name, work, body_limit=limit)
