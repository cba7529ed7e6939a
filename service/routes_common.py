"""HTTP plumbing shared by the v1 and V2 routes: body limits, JSON responses, request metrics,
client disconnects, and the OpenAPI pieces every route documents."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect

from . import jsonio
from .errors import BodyTooLarge, InvalidInput, ServiceError
from .handlers import Handler, Reply
from .metrics import UNKNOWN_MODEL, Metrics
from .schemas import ErrorResponse

JSON = "application/json"
BINARY_HEADER = "Inference-Header-Content-Length"
CLIENT_CLOSED = 499  # nginx's "client closed the connection": never sent, never counted


# --- OpenAPI ------------------------------------------------------------------------------------
def _error(description: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {"model": ErrorResponse, "description": description}
    if headers:
        doc["headers"] = {
            name: {"description": text, "schema": {"type": "string"}}
            for name, text in headers.items()
        }
    return doc


ERRORS: dict[int, dict[str, Any]] = {
    401: _error(
        "missing or wrong admin token", {"WWW-Authenticate": "Bearer: how to authenticate"}
    ),
    404: _error("unknown model"),
    409: _error("the model on disk cannot be loaded (the served one keeps serving)"),
    413: _error("body over FPN_MAX_BODY_BYTES"),
    422: _error("invalid JSON, input or parameter"),
    503: _error("queue full or not ready", {"Retry-After": "seconds to wait before retrying"}),
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` entries of these error statuses."""
    return {status: ERRORS[status] for status in statuses}


def request_body(model: type) -> dict[str, Any]:
    """OpenAPI for a body that the route reads itself (no per-element validation)."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}
            },
        }
    }


# --- responses ----------------------------------------------------------------------------------
def handler_of(request: Request) -> Handler:
    return request.app.state.handler


def json_response(
    body: object, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
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
    first by its Content-Length, then while streaming (chunked uploads have none).

    Raises ``ClientDisconnect`` when the client goes away before the body is complete.
    """
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


async def _disconnected(request: Request) -> None:
    """Return when the client has gone away (call once the body has been read).

    uvicorn answers ``receive()`` with ``http.disconnect`` when the connection is lost, or once
    the response is complete, so this never outlives the request.
    """
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def instrumented(
    request: Request,
    endpoint: str,
    name: str,
    work: Callable[[Handler, bytes, float], Awaitable[Reply]],
    body_limit: int | None = None,
) -> Response:
    """Read the body (when ``body_limit`` is given), run ``work(handler, body, received)`` and
    count the request and its duration, labelled by the status code it ends with.

    A client that goes away, while its body is read or while its request waits or is solved,
    cancels the request: its samples are dropped by the scheduler, it is counted in
    ``fpn_requests_cancelled_total`` (not in ``fpn_requests_total``) and nothing is answered.
    """
    received = time.perf_counter()
    handler = handler_of(request)
    metrics: Metrics = request.app.state.metrics
    code = 500
    try:
        try:
            body = await read_body(request, body_limit) if body_limit is not None else b""
        except ClientDisconnect:
            code = CLIENT_CLOSED
            handler.cancelled(name, endpoint, "the client disconnected while sending its body")
            return Response(status_code=CLIENT_CLOSED)
        task = asyncio.ensure_future(work(handler, body, received))
        if body_limit is None:
            reply = await task
        else:  # a request with a body is one worth cancelling when its client leaves
            watcher = asyncio.ensure_future(_disconnected(request))
            try:
                await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                task.cancel()
                raise
            finally:
                watcher.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                code = CLIENT_CLOSED
                handler.cancelled(name, endpoint, "the client disconnected")
                return Response(status_code=CLIENT_CLOSED)
            reply = task.result()
        response = reply_response(reply)
        code = 200
        return response
    except ServiceError as exc:
        code = exc.status
        raise
    except asyncio.CancelledError:  # the server task itself was cancelled (shutdown timeout)
        code = CLIENT_CLOSED
        raise
    finally:
        if code != CLIENT_CLOSED:
            model = handler.model_label(name) or UNKNOWN_MODEL
            metrics.observe_request(model, endpoint, code, time.perf_counter() - received)
