"""The fast path of the generation routes: what is decided at once, before FastAPI's routing.

Two kinds of request cost almost nothing to answer and are most of the traffic when it matters:
a hit in this replica's memory tier (repeated questions), and a request admission refuses (a
flood). Through FastAPI's router, dependencies and the request guard's task each spent
several times what its answer costs (bench/hit_path.py, bench/flood.py). This middleware
validates the body with the route's own model, builds the route's own GenerationSpec and asks
`GenerationService.answer_now`; a request it cannot answer at once (anything else, and
anything malformed, unauthorised or streamed from the cache) goes on unchanged to the routes,
which answer exactly as before. Nothing is counted or traced twice: `answer_now` counts only
what it answers.

In a burst, a request admission lets through to wait (the engine cannot start it at once) lets the
burst's later arrivals be decided first (`ArrivalGate`): its route's first step (rendering,
tokenising, handing it to the engine) costs a few milliseconds of the event loop, while a refusal
costs a fraction of one, and the request would wait for the engine anyway. A request the engine
starts at once goes on after one turn of the event loop, or with the waiting ones if a burst is
arriving.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from llm_service.api.accounting import record_of
from llm_service.api.deps import Resources
from llm_service.api.errors import error_response
from llm_service.api.guard import replaying
from llm_service.api.timeouts import timeout_of
from llm_service.errors import ServiceError, renderer_for_path
from llm_service.serving.generation import GenerationResult, GenerationSpec
from llm_service.traffic.drain import Drain
from llm_service.traffic.request_record import RequestRecord


@dataclass(frozen=True)
class FastRoute:
    """A generation route as the fast path sees it: its body model, how the route turns a body
    into a spec (body, request id, Cache-Control header, deadline, record), and how it renders a result."""

    model: type[BaseModel]
    spec: Callable[[Any, str, str | None, float, RequestRecord], GenerationSpec]
    render: Callable[[GenerationResult, Any], dict[str, Any]]


# A waiting request yields in steps of GATE_STEP_SECONDS while requests keep arriving, at most
# GATE_LIMIT_SECONDS in all: about what a burst of a few hundred refusals takes to decide here.
GATE_STEP_SECONDS = 0.001
GATE_LIMIT_SECONDS = 0.2


class ArrivalGate:
    """Lets requests that will wait anyway go on only once arrivals pause (or after `limit`): the
    first such request watches the arrivals, the ones after it wait for it and go on with it, in
    the order they came (one timer however many wait). Arrivals are the requests admission decided
    on (refused or admitted): memory hits are not counted, so a stream of them holds nothing back."""

    def __init__(self, step: float = GATE_STEP_SECONDS, limit: float = GATE_LIMIT_SECONDS) -> None:
        self.step = step
        self.limit = limit
        self.arrivals = 0
        # Event-loop times of the latest arrival and of the one before it.
        self._latest = self._before = -math.inf
        self._passage: asyncio.Future[None] | None = None  # set when the waiting requests go on

    def arrived(self) -> None:
        self.arrivals += 1
        self._before, self._latest = self._latest, asyncio.get_running_loop().time()

    async def admitted(self, waits: bool) -> None:
        """An admitted request's arrival; then let the requests arriving meanwhile be decided first.
        If this one `waits` for the engine anyway, or arrived within a step of the one
        before it (a burst), or requests arrive during one turn of the event loop: until a whole
        step passes with no arrival, or `limit` after the first of the burst began to wait. A
        request alone goes on after the one turn. (A burst's first requests are the ones the engine
        starts at once: each going on to its render and tokenizing, 1-3 ms here, held every
        arrival behind it, and the burst's last refusals by 10-20 ms.)"""
        self.arrived()
        seen = self.arrivals
        in_burst = self._latest - self._before < self.step
        await asyncio.sleep(0)
        if not waits and not in_burst and self.arrivals == seen:
            return
        if self._passage is not None:
            await asyncio.shield(self._passage)  # the watcher leaving (or cancelled) lets it go
            return
        self._passage = asyncio.get_running_loop().create_future()
        try:
            await self._watch()
        finally:
            passage, self._passage = self._passage, None
            passage.set_result(None)

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        until = loop.time() + self.limit
        seen = -1
        while seen != self.arrivals and loop.time() < until:
            seen = self.arrivals
            await asyncio.sleep(self.step)


class FastPath:
    """ASGI middleware in front of the request guard for the routes in `routes` (POST)."""

    def __init__(self, app: ASGIApp, routes: Mapping[str, FastRoute], max_body_bytes: int, drain: Drain) -> None:
        self.app = app
        self.routes = routes
        self.max_body_bytes = max_body_bytes
        self.drain = drain
        self.gate = ArrivalGate()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.routes.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        resources: Resources | None = getattr(scope["app"].state, "resources", None)
        if route is None or resources is None or self.drain.draining:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"")
        if not length.isdigit() or int(length) > self.max_body_bytes:  # the guard answers (413, chunked)
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left: nobody to answer
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            response = await _answer_now(route, resources, scope, headers, body)
        except ServiceError as exc:  # counted and traced by answer_now
            self.gate.arrived()  # refused
            response = error_response(exc, renderer_for_path(scope["path"]))
        if response is not None:  # a memory hit: no engine, not an arrival the gate counts
            await response(scope, receive, send)
            return
        reservation = record_of(scope).reservation
        try:
            if reservation is not None:
                await self.gate.admitted(reservation.waits)
            await self.app(scope, replaying(body, receive), send)
        finally:  # what admission reserved for it and its route never adopted (a 400, a client gone)
            if reservation is not None:
                reservation.release()


async def _answer_now(
    route: FastRoute, resources: Resources, scope: Scope, headers: dict[bytes, bytes], body: bytes
) -> Response | None:
    """The response when the request is answered at once; None to let the route serve it."""
    if not _authorised(resources, headers):
        return None
    record = record_of(scope)
    try:
        parsed = route.model.model_validate(json.loads(body))
        timeout = timeout_of(_header(headers, b"x-request-timeout"), resources.settings.llm, record.arrived)
        request_id = scope["state"]["request_id"]
        spec = route.spec(parsed, request_id, _header(headers, b"cache-control"),
                          timeout.deadline(getattr(parsed, "timeout", None)), record)
    except (ValueError, ValidationError, ServiceError, KeyError):
        return None  # the route answers with its own error
    # A stream is never answered from the cache here (the route streams it); it may be refused.
    stream = bool(getattr(parsed, "stream", False))
    result = await resources.generation.answer_now(spec, hit=not stream)  # raises Overloaded
    if result is None:
        return None
    return JSONResponse(route.render(result, parsed), headers=result.headers())


def _authorised(resources: Resources, headers: dict[bytes, bytes]) -> bool:
    keys = resources.api_keys
    if not keys.required:
        return True
    if keys.accepts(_header(headers, b"x-api-key")):
        return True
    scheme, _, credentials = (_header(headers, b"authorization") or "").partition(" ")
    return scheme.lower() == "bearer" and keys.accepts(credentials)


def _header(headers: dict[bytes, bytes], name: bytes) -> str | None:
    value = headers.get(name)
    return None if value is None else value.decode("latin-1")
