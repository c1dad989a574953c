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
starts at once goes on after a few turns of the event loop, or with the waiting ones if a burst is
arriving.
"""

from __future__ import annotations

import asyncio
import collections
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


# Requests that will wait go on once no request has arrived for GATE_QUIET_SECONDS, counted from
# the latest arrival (uvloop's timers tick in whole milliseconds: a 1 ms sleep may end at once), at
# most GATE_LIMIT_SECONDS after the first of them began to wait: about what a burst of a few hundred
# refusals takes to decide here. A request the engine starts at once joins them if requests arrive
# during its first GATE_TURNS turns of the event loop (a new connection's request is decided two
# turns after its bytes are read) or it arrived within GATE_BURST_SECONDS of the one before it.
GATE_QUIET_SECONDS = 0.003
GATE_BURST_SECONDS = 0.001
GATE_LIMIT_SECONDS = 0.2
GATE_TURNS = 3


class ArrivalGate:
    """Lets requests that will wait anyway go on only once arrivals pause (or after `limit`): one
    releaser lets them go one by one, in the order they came, a few turns of the event loop apart,
    and stops again as soon as a request arrives (a burst read in two parts, its second part held
    up by the first part's routes, used to find every waiting request gone); `limit` after it began
    it lets all go at once. Arrivals are the requests admission decided on (refused or admitted):
    memory hits are not counted, so a stream of them holds nothing back."""

    def __init__(
        self,
        quiet: float = GATE_QUIET_SECONDS,
        limit: float = GATE_LIMIT_SECONDS,
        burst: float = GATE_BURST_SECONDS,
        turns: int = GATE_TURNS,
    ) -> None:
        self.quiet = quiet
        self.limit = limit
        self.burst = burst
        self.turns = turns
        self.arrivals = 0
        # Event-loop times of the latest arrival and of the one before it.
        self._latest = self._before = -math.inf
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        self._releaser: asyncio.Task[None] | None = None  # runs while requests wait

    def arrived(self) -> None:
        self.arrivals += 1
        self._before, self._latest = self._latest, asyncio.get_running_loop().time()

    async def admitted(self, waits: bool) -> None:
        """An admitted request's arrival; then let the requests arriving meanwhile be decided first.
        If this one `waits` for the engine anyway, or arrived within `burst` of the one before it,
        or requests arrive during its `turns` turns of the event loop: until its turn to go. A
        request alone goes on after those turns. (A burst's first requests are the ones the engine
        starts at once: each going on to its render and tokenizing, 1-3 ms here, held every
        arrival behind it, and the burst's last refusals by 10-20 ms.)"""
        self.arrived()
        seen = self.arrivals
        in_burst = self._latest - self._before < self.burst
        await self._turns()
        if not waits and not in_burst and self.arrivals == seen:
            return
        loop = asyncio.get_running_loop()
        turn = loop.create_future()
        self._waiting.append(turn)
        if self._releaser is None:
            self._releaser = loop.create_task(self._release())
        await turn  # cancelled with its request (the client left): the releaser skips it

    async def _turns(self) -> None:
        for _ in range(self.turns):
            await asyncio.sleep(0)

    async def _release(self) -> None:
        loop = asyncio.get_running_loop()
        until = loop.time() + self.limit
        try:
            while self._waiting:
                now = loop.time()
                quiet_in = self._latest + self.quiet - now
                if now >= until:
                    break  # the finally lets them all go: a flood must not hold them longer
                if quiet_in > 0:
                    await asyncio.sleep(min(quiet_in, until - now))
                    continue
                turn = self._waiting.popleft()
                if turn.done():
                    continue
                turn.set_result(None)
                await self._turns()  # its route's first step; arrivals meanwhile are decided
        finally:
            self._releaser = None
            while self._waiting:  # the limit reached, or cancelled (the loop closing): all go on
                turn = self._waiting.popleft()
                if not turn.done():
                    turn.set_result(None)


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
