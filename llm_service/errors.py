"""Domain exceptions and the one place that maps every error to an HTTP response."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llm_service.engines.base import EngineDead, EngineError, PromptTooLong

log = structlog.get_logger(__name__)


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


def _renderer_for(request: Request) -> ErrorRenderer:
    return renderer_for_path(request.url.path)


def error_response(error: ServiceError, renderer: ErrorRenderer = render_error) -> JSONResponse:
    headers = {}
    if error.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(error.retry_after)))
    if error.trace_id:
        headers["X-Trace-ID"] = error.trace_id
    return JSONResponse(renderer(error), status_code=error.status_code, headers=headers)


def _body_problem(err: dict[str, Any], body: object = None) -> str | None:
    """The message for a body that is not a JSON object at all (its errors have no field)."""
    loc = tuple(err.get("loc", ()))
    if err.get("type") == "json_invalid":
        reason = (err.get("ctx") or {}).get("error", "JSON decode error")
        position = loc[1] if len(loc) > 1 and isinstance(loc[1], int) else None
        where = ""
        if position is not None and isinstance(body, str):
            line = body.count("\n", 0, position) + 1
            column = position - (body.rfind("\n", 0, position) + 1) + 1
            where = f" at line {line} column {column} (character {position})"
        elif position is not None:
            where = f" (at character {position})"
        return f"the request body is not valid JSON: {reason}{where}"
    if loc == ("body",) and err.get("type") in ("model_attributes_type", "dict_type"):
        return "the request body must be a JSON object (send it with Content-Type: application/json)"
    return None


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts = []
    first_param = None
    for err in exc.errors():
        problem = _body_problem(err, exc.body)
        if problem is not None:
            parts.append(problem)
            continue
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        # A model-level validator names its field in ctx["param"] (it has no location).
        param = ".".join(loc) or (err.get("ctx") or {}).get("param")
        first_param = first_param or param
        parts.append(f"{param}: {err.get('msg')}" if param else str(err.get("msg")))
    return "; ".join(parts) or "invalid request", first_param


def install_error_handlers(app: FastAPI) -> None:
    """Render every error, ours or the framework's, in one JSON envelope."""

    async def service_error(request: Request, exc: Exception) -> JSONResponse:
        error = to_service_error(exc)
        if error.status_code >= 500:
            log.warning("request_failed", error_type=error.error_type, error=error.message)
        return error_response(error, _renderer_for(request))

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        message, param = _validation_message(exc)
        return error_response(InvalidRequest(message, param=param), _renderer_for(request))

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        error = ServiceError(str(exc.detail))
        error.status_code = exc.status_code
        error.error_type = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        response = error_response(error, _renderer_for(request))
        response.headers.update(exc.headers or {})  # e.g. Allow of a 405
        return response

    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled_error", path=request.url.path)
        return error_response(ServiceError("internal error"), _renderer_for(request))

    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(PromptTooLong, service_error)
    app.add_exception_handler(EngineError, service_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected_error)
