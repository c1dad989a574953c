"""Counts every request to a generation endpoint once, by slot, outcome and final HTTP status."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from fastapi import APIRouter
from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llm_service.traffic.request_record import RequestRecord

# nginx's "client closed request": the client left before the response ended.
CLIENT_CLOSED = 499
UNKNOWN_SLOT = "unknown"  # the model label of a request rejected before it named a known slot
# Values of llm_requests_total{status}, one per class of final HTTP status.
REQUEST_STATUSES = (
    "success", "invalid", "unauthorized", "not_found", "overloaded", "cancelled", "unavailable", "error",
)
_SCOPE_KEY = "request_record"


def record_of(scope: Scope) -> RequestRecord:
    """The request's record (a fresh, uncounted one outside a generation endpoint)."""
    record = scope.get("state", {}).get(_SCOPE_KEY)
    return record if isinstance(record, RequestRecord) else RequestRecord()


def final_code(status: int | None, completed: bool, failure: int | None) -> int:
    """The status a request ended with: the HTTP status sent, the status of an error sent
    in-band after a 200 began, or CLIENT_CLOSED when the response never ended."""
    if status is None or not completed:
        return CLIENT_CLOSED
    if status < 400 and failure is not None:
        return failure
    return status


def status_label(code: int) -> str:
    """The llm_requests_total{status} value of a final status code."""
    if code == CLIENT_CLOSED:
        return "cancelled"
    if code < 400:
        return "success"
    named = {401: "unauthorized", 403: "unauthorized", 404: "not_found", 429: "overloaded", 503: "unavailable"}
    if code in named:
        return named[code]
    return "invalid" if code < 500 else "error"


def generation_paths(routers: Iterable[APIRouter]) -> frozenset[str]:
    """Paths of the POST routes of `routers`: the endpoints that generate."""
    return frozenset(
        route.path
        for router in routers
        for route in router.routes
        if isinstance(route, APIRoute) and "POST" in route.methods
    )


class RequestAccounting:
    """ASGI middleware for the generation endpoints: counts each request in llm_requests_total
    when its response ends (whatever rejected it: validation, an unknown slot, admission, the
    engine) and gives every such response an X-Cache header (MISS unless the handler set one)."""

    def __init__(self, app: ASGIApp, paths: frozenset[str]) -> None:
        self.app = app
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        record = RequestRecord(arrived=asyncio.get_running_loop().time())
        scope.setdefault("state", {})[_SCOPE_KEY] = record
        status: int | None = None
        counted = False

        def count(code: int) -> None:
            nonlocal counted
            if not counted:
                counted = True
                self._count(scope, record, code)

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = message["headers"] = list(message.get("headers", ()))
                if not any(name.lower() == b"x-cache" for name, _ in headers):
                    headers.append((b"x-cache", b"MISS"))
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                # Counted before the last byte leaves: a client that reads /metrics next sees it.
                count(final_code(status, True, record.failure))
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        except Exception:
            if status is None:  # the server's error handler answers 500
                count(final_code(500, True, record.failure))
            raise
        finally:
            count(final_code(status, False, record.failure))

    @staticmethod
    def _count(scope: Scope, record: RequestRecord, code: int) -> None:
        resources = getattr(scope["app"].state, "resources", None)
        if resources is None:  # no lifespan: nothing to count in
            return
        resources.metrics.requests.labels(
            model=record.slot or UNKNOWN_SLOT, status=status_label(code), code=str(code)
        ).inc()
