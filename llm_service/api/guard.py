"""RequestGuard: the body size limit, drain refusals and cancel-on-disconnect, in front of every request
that carries a body."""

from __future__ import annotations

import asyncio
import contextlib

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llm_service.api.errors import error_response
from llm_service.errors import (
    InvalidRequest,
    PayloadTooLarge,
    ServiceError,
    ShuttingDown,
    renderer_for_path,
)
from llm_service.traffic.drain import RETRY_AFTER_SECONDS, Drain

# Methods without a body are cheap and never generate: they pass through untouched.
_PASS_THROUGH = frozenset({"GET", "HEAD", "OPTIONS"})


class RequestGuard:
    """ASGI middleware for requests with a body (every generation request).

    - A body over `max_body_bytes` gets 413 before it is parsed: at once from Content-Length, or as
      soon as a chunked body passes the limit (so a huge prompt never reaches the tokenizer).
    - While draining (after SIGTERM) new requests get 503 with Retry-After; requests in flight are
      counted so the drain can wait for them. Every response sent while draining carries
      `Connection: close`, so a client's next request opens a new connection, which the load balancer
      sends to another replica, instead of coming back on a kept-alive one.
    - When the client disconnects before the response is complete, the request's task is cancelled,
      which closes its generation and aborts the engine request (streamed or not).
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, drain: Drain) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope.get("method") in _PASS_THROUGH:
            await self.app(scope, receive, closing(send) if self.drain.draining else send)
            return
        if self.drain.draining:
            await self._refuse(scope, closing(send), ShuttingDown(
                "the service is shutting down; retry on another replica", retry_after=RETRY_AFTER_SECONDS
            ))
            return
        self.drain.enter()
        try:
            body = await self._read_body(scope, receive, send)
            if body is not None:
                await self._run(scope, body, receive, send)
        finally:
            self.drain.leave()

    async def _read_body(self, scope: Scope, receive: Receive, send: Send) -> bytes | None:
        """The whole body, or None when a response (413, 400) was sent or the client left."""
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                await self._refuse(scope, send, InvalidRequest("Content-Length is not a number"))
                return None
            if length > self.max_body_bytes:
                await self._refuse(scope, send, self._too_large())
                return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await self._refuse(scope, send, self._too_large())
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"request body is larger than {self.max_body_bytes} bytes (APP_MAX_BODY_BYTES)", param="body"
        )

    async def _run(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> None:
        """Run the app on the buffered body; cancel it if the client disconnects first."""
        disconnected = asyncio.Event()
        complete = False

        async def disconnect() -> Message:
            await disconnected.wait()
            return {"type": "http.disconnect"}

        replay = replaying(body, disconnect)

        async def send_tracked(message: Message) -> None:
            nonlocal complete
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                complete = True
            elif message["type"] == "http.response.start" and self.drain.draining:
                message = with_connection_close(message)
            await send(message)

        app_task = asyncio.ensure_future(self.app(scope, replay, send_tracked))

        async def watch() -> None:
            # After the body, the server's receive() returns only when the client disconnects or the
            # response is complete.
            while (await receive())["type"] != "http.disconnect":
                pass
            disconnected.set()
            if not complete:
                app_task.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            await asyncio.wait({app_task})
        finally:
            if not app_task.done():  # we are cancelled ourselves (server shutdown): so is the app
                app_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await app_task
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        if app_task.cancelled():
            return  # the client left: nobody to answer
        app_task.result()  # re-raise what the app raised

    @staticmethod
    async def _refuse(scope: Scope, send: Send, error: ServiceError) -> None:
        response = error_response(error, renderer_for_path(scope.get("path", "")))
        await response(scope, _no_receive, send)


def with_connection_close(start: Message) -> Message:
    """An `http.response.start` message with `Connection: close` (uvicorn then closes the connection
    once the response is sent)."""
    return {**start, "headers": [*start.get("headers", ()), (b"connection", b"close")]}


def closing(send: Send) -> Send:
    """`send` that marks the response `Connection: close`."""

    async def send_closing(message: Message) -> None:
        await send(with_connection_close(message) if message["type"] == "http.response.start" else message)

    return send_closing


def replaying(body: bytes, then: Receive) -> Receive:
    """A receive() that gives the buffered `body` as one message, then what `then` gives."""
    replayed = False

    async def receive() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await then()

    return receive


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}
