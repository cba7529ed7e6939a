"""One error tree (SPEC §7): every failure a client can cause is a :class:`ServiceError` with an
HTTP status, a stable machine-readable ``code`` and a message that says what to fix.

The app turns each into ``{"error": code, "message": message}``; nothing else reaches a client
(unexpected exceptions become a 500 ``internal`` body without a stack trace). Non-convergence is
not an error: it is ``converged: false`` in a 200 response.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base: ``status`` (HTTP), ``code`` (stable string), ``message``, optional extra headers."""

    status: int = 500
    code: str = "internal"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, str]:
        return {"error": self.code, "message": self.message}


class InvalidJSON(ServiceError):
    status, code = 422, "invalid_json"


class InvalidInput(ServiceError):
    """Wrong shape, dtype, NaN/Inf, values outside [0, 1], undecodable image."""

    status, code = 422, "invalid_input"


class InvalidParameter(ServiceError):
    """``tol``, ``max_iter``, ``solver``, ``deadline_ms``, ``top_k`` outside what is allowed."""

    status, code = 422, "invalid_parameter"


class BatchTooLarge(ServiceError):
    status, code = 422, "batch_too_large"


class ModelNotFound(ServiceError):
    status, code = 404, "model_not_found"


class NotFound(ServiceError):
    status, code = 404, "not_found"


class MethodNotAllowed(ServiceError):
    status, code = 405, "method_not_allowed"


class BodyTooLarge(ServiceError):
    status, code = 413, "body_too_large"


class Unavailable(ServiceError):
    """503 with ``Retry-After`` (seconds)."""

    status = 503

    def __init__(self, message: str, *, retry_after: int = 1, code: str | None = None) -> None:
        super().__init__(message, code=code, headers={"Retry-After": str(max(1, retry_after))})


class QueueFull(Unavailable):
    code = "queue_full"


class NotReady(Unavailable):
    code = "not_ready"


class Unauthorized(ServiceError):
    status, code = 401, "unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class InternalError(ServiceError):
    status, code = 500, "internal"
