"""The uvicorn server of `python -m llm_service`: on SIGTERM it drains before it stops."""

from __future__ import annotations

import asyncio
import signal
import socket
from types import FrameType

import uvicorn
from fastapi import FastAPI
from uvicorn.config import Config

from llm_service.traffic.drain import Drain

# Connections still open once the drain is over (or its grace expired) get this long to close.
CLOSE_TIMEOUT_SECONDS = 5


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM starts a drain instead of an immediate shutdown.

    The drain (see drain.py) turns readiness to 503 and refuses new requests with 503 while those
    in flight finish; once none is left, or after `grace` seconds, the usual shutdown follows (the
    app's lifespan then stops the engines). A second SIGTERM, or SIGINT, stops at once.
    """

    def __init__(self, config: Config, drain: Drain, grace: float) -> None:
        super().__init__(config)
        self.drain = drain
        self.grace = grace
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig != signal.SIGTERM or self.drain.draining or self._loop is None:
            super().handle_exit(sig, frame)
            return
        self._captured_signals.append(sig)
        # A signal handler interrupts the loop's thread: hand the work to the loop itself.
        self._loop.call_soon_threadsafe(self._begin_drain)

    def _begin_drain(self) -> None:
        self.drain.begin()
        self._drain_task = asyncio.get_running_loop().create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        await self.drain.wait_idle(self.grace)
        self.should_exit = True


def run(app: FastAPI, drain: Drain, host: str, port: int, grace: float, keep_alive: int) -> None:
    """Serve `app` until SIGTERM (drained) or SIGINT; idle connections stay open `keep_alive` seconds."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        # uvicorn's default of 5 s equals httpx's (and the openai SDK's) idle expiry: a client that
        # waits about 5 s between requests may send on a connection as the server closes it, and gets
        # "Server disconnected without sending a response". Ours outlasts the clients' and proxies'.
        timeout_keep_alive=keep_alive,
        # Our request_finished line carries the request id; uvicorn's would be a second line per
        # request (and vLLM's logging set-up re-enables a logger we disable).
        access_log=False,
        timeout_graceful_shutdown=CLOSE_TIMEOUT_SECONDS,
    )
    DrainingServer(config, drain, grace).run()
