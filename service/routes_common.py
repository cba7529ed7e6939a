"""HTTP plumbing shared by the v1 and V2 routes: body limits, JSON responses, request metrics."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from fastapi import Request
from fastapi.responses import Response

from . import jsonio
from .errors import BodyTooLarge, InvalidInput, ServiceError
from .handlers import Handler, Reply
from .metrics import UNKNOWN_MODEL, Metrics

JSON = "application/json"
BINARY_HEADER = "Inference-Header-Content-Length"


def handler_of(request: Request) -> Handler:
    return request.app.state.handler


def json_response(body: object, status: int = 200, headers: dict[str, str] | None = None):
    return Response(jsonio.dumps(body), status_code=status, headers=headers, media_type=JSON)


def reply_response(reply: Reply) -> Response:
    if not reply.binary:
        return json_response(reply.body)
    header = jsonio.dumps(reply.body)
    return Response(
        b"".join([header, *reply.binary]),
        media_type="application/octet-stream",
        headers={BINARY_HEADER: str(len(header))},
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 before parsing when it exceeds ``limit`` bytes:
    first by its Content-Length, then while streaming (chunked uploads have none)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise InvalidInput("Content-Length is not an integer") from None
        if size > limit:
            raise BodyTooLarge(_too_large(size, limit))
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(_too_large(size, limit, at_least=True))
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, limit: int, at_least: bool = False) -> str:
    what = f"at least {size}" if at_least else str(size)
    return (
        f"request body is {what} bytes; the limit is {limit} (FPN_MAX_BODY_BYTES): "
        "send fewer samples per request"
    )


async def instrumented(
    request: Request,
    endpoint: str,
    name: str,
    work: Callable[[Handler, float], Awaitable[Reply]],
) -> Response:
    """Run ``work(handler, received)``; count the request and its duration in the metrics,
    labelled by the status code it ends with (errors included, 499 when the client left)."""
    received = time.perf_counter()
    handler = handler_of(request)
    code = 500
    try:
        response = reply_response(await work(handler, received))
        code = 200
        return response
    except ServiceError as exc:
        code = exc.status
        raise
    except asyncio.CancelledError:
        code = 499
        raise
    finally:
        metrics: Metrics = request.app.state.metrics
        model = handler.model_label(name) or UNKNOWN_MODEL
        metrics.observe_request(model, endpoint, code, time.perf_counter() - received)
