"""Open Inference Protocol (KServe V2) routes, so standard V2 clients work unchanged.

Supports JSON tensors (``data`` flat or nested) and the binary tensor data extension
(``Inference-Header-Content-Length``) for inputs and outputs.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from .routes_common import BINARY_HEADER, handler_of, instrumented, json_response, read_body
from .routes_v1 import ERRORS, request_body
from .schemas import V2InferenceRequest, V2InferenceResponse, V2ModelMetadata

router = APIRouter(prefix="/v2", tags=["v2"])


@router.get("")
async def server_metadata(request: Request) -> Response:
    return json_response(handler_of(request).server_metadata())


@router.get("/health/live")
async def live() -> Response:
    return json_response({"live": True})


@router.get("/health/ready")
async def ready(request: Request) -> Response:
    if handler_of(request).ready:
        return json_response({"ready": True})
    return json_response({"ready": False}, 503, {"Retry-After": "1"})


@router.get("/models/{name}", response_model=V2ModelMetadata, responses={404: ERRORS[404]})
async def model_metadata(name: str, request: Request) -> Response:
    return json_response(handler_of(request).v2_model_metadata(name))


@router.get("/models/{name}/ready", responses={404: ERRORS[404], 503: ERRORS[503]})
async def model_ready(name: str, request: Request) -> Response:
    return json_response(handler_of(request).v2_model_ready(name))


@router.post(
    "/models/{name}/infer",
    response_model=V2InferenceResponse,
    responses=ERRORS,
    openapi_extra=request_body(V2InferenceRequest),
)
async def infer(name: str, request: Request) -> Response:
    limit = request.app.state.settings.max_body_bytes
    header_length = request.headers.get(BINARY_HEADER)

    async def work(handler, received):
        body = await read_body(request, limit)
        return await handler.infer(name, body, received, header_length)

    return await instrumented(request, "infer", name, work)
