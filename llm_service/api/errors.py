"""The one place that maps every error, ours or the framework's, to an HTTP response."""

from __future__ import annotations

from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llm_service.engines.base import EngineError, PromptTooLong
from llm_service.errors import (
    ErrorRenderer,
    InvalidRequest,
    ServiceError,
    render_error,
    renderer_for_path,
    to_service_error,
)

log = structlog.get_logger(__name__)


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
