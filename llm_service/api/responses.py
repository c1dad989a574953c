"""OpenAPI documentation of the error envelopes and statuses every route can answer with."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    type: str = Field(description="Machine-readable error type, e.g. invalid_request_error, overloaded.")
    message: str = Field(description="What went wrong, for a human.")
    param: str | None = Field(description="The request field or header at fault, if any.")


class ErrorEnvelope(BaseModel):
    """The service's error envelope (/generate, /admin, /health)."""

    error: ErrorBody


class OpenAIErrorBody(ErrorBody):
    code: str | None = Field(description="As type (null for internal errors).")


class OpenAIErrorEnvelope(BaseModel):
    """OpenAI's error envelope (/v1)."""

    error: OpenAIErrorBody


_DESCRIPTIONS = {
    400: "Invalid request (bad field, body not valid JSON, prompt too long for the context)",
    401: "Missing or wrong API key (LLM_API_KEYS) or admin token",
    403: "The admin API is disabled (no APP_ADMIN_TOKEN)",
    404: "Unknown model slot",
    413: "Request body larger than APP_MAX_BODY_BYTES",
    429: "Admission bound reached (slot or service at capacity); retry after Retry-After",
    503: "Model loading, failed or out of memory budget, engine died, or the service is shutting down",
    504: "The request's timeout passed; its engine request was aborted",
}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}}

GENERATION_STATUSES = (400, 401, 404, 413, 429, 503, 504)


def error_responses(envelope: type[BaseModel], *statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` of a route: each status with the envelope's schema (and Retry-After where sent)."""
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {"model": envelope, "description": _DESCRIPTIONS[status]}
        if status in (429, 503):
            entry["headers"] = _RETRY_AFTER
        responses[status] = entry
    return responses


SSE_EVENT: dict[str, Any] = {
    "type": "object",
    "description": "One Server-Sent Event: `data: <JSON>`",
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"},
                   "retry": {"type": "integer"}},
    "required": ["data"],
}


def streaming_response(description: str) -> dict[int | str, dict[str, Any]]:
    """The 200 of a route that streams Server-Sent Events when the body asks for `stream: true`."""
    return {
        200: {
            "description": description,
            # The schema of one event (as OpenAPI 3.2's itemSchema and schemathesis read it): its `data`
            # is a JSON chunk, or `[DONE]` at the end of an OpenAI stream.
            "content": {"text/event-stream": {"schema": SSE_EVENT}},
        }
    }
