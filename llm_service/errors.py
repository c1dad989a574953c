"""The service's error types (each with its HTTP status and type) and their JSON envelopes.

No web framework here: api/errors.py turns them into responses, the one place that does."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llm_service.engines.base import EngineDead, EngineError, PromptTooLong


class ServiceError(Exception):
    """An error with an HTTP status, a machine-readable type and a human message."""

    status_code = 500
    error_type = "internal_error"
    trace_id: str | None = None  # the failed request's trace, sent back as X-Trace-ID

    def __init__(self, message: str, *, param: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after


class InvalidRequest(ServiceError):
    status_code = 400
    error_type = "invalid_request_error"


class Unauthorized(ServiceError):
    status_code = 401
    error_type = "unauthorized"


class Forbidden(ServiceError):
    status_code = 403
    error_type = "forbidden"


class ModelNotFound(ServiceError):
    status_code = 404
    error_type = "model_not_found"


class ModelUnavailable(ServiceError):
    """The slot is loading, failed, or cannot fit in the memory budget right now."""

    status_code = 503
    error_type = "model_unavailable"


class CacheUnavailable(ServiceError):
    """The response cache's store could not be reached for an operation that needs it (a purge)."""

    status_code = 503
    error_type = "cache_unavailable"


class Overloaded(ServiceError):
    status_code = 429
    error_type = "overloaded"


class EngineFailure(ServiceError):
    status_code = 503
    error_type = "engine_error"


class PayloadTooLarge(ServiceError):
    status_code = 413
    error_type = "request_too_large"


class DeadlineExceeded(ServiceError):
    """The request's timeout passed; its engine request was aborted."""

    status_code = 504
    error_type = "timeout"


class ShuttingDown(ServiceError):
    """The process is draining before it exits; other replicas take new requests."""

    status_code = 503
    error_type = "shutting_down"


def outcome_of(error: ServiceError) -> str:
    """A failed request's outcome in metrics and traces: "error" (5xx) or "invalid" (4xx)."""
    return "error" if error.status_code >= 500 else "invalid"


def to_service_error(exc: BaseException) -> ServiceError:
    """Translate any exception into the ServiceError the client sees."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, PromptTooLong):
        return InvalidRequest(str(exc), param="max_tokens")
    if isinstance(exc, EngineDead):
        return EngineFailure(f"the model's engine died and will be restarted: {exc}", retry_after=5)
    if isinstance(exc, EngineError):
        return EngineFailure(f"the model's engine failed: {exc}", retry_after=1)
    if isinstance(exc, ValueError):
        return InvalidRequest(str(exc))
    return ServiceError("internal error")


# An API surface renders errors in its own envelope: ours by default, OpenAI's under /v1.
ErrorRenderer = Callable[[ServiceError], dict[str, Any]]


def render_error(error: ServiceError) -> dict[str, Any]:
    """The service's own error envelope."""
    return {"error": {"type": error.error_type, "message": error.message, "param": error.param}}


def render_openai_error(error: ServiceError) -> dict[str, Any]:
    """OpenAI's error envelope: {"error": {"message", "type", "param", "code"}}."""
    return {
        "error": {
            "message": error.message,
            "type": error.error_type,
            "param": error.param,
            "code": error.error_type if error.status_code != 500 else None,
        }
    }


def renderer_for_path(path: str) -> ErrorRenderer:
    """The envelope of the surface `path` belongs to."""
    return render_openai_error if path.startswith("/v1/") else render_error
