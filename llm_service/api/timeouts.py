"""Request deadlines: LLM_REQUEST_TIMEOUT_SECONDS, the X-Request-Timeout header and the `timeout` body field."""

from __future__ import annotations

import asyncio
import math
from typing import Annotated

from fastapi import Depends, Header

from llm_service.api.deps import RequestRecordDep, SettingsDep
from llm_service.config.settings import LLMSettings
from llm_service.errors import InvalidRequest

HEADER = "X-Request-Timeout"


class RequestTimeout:
    """The timeout a request gets: the smallest of its header and body field, else the default; every
    value within (0, maximum]. `deadline()` is the event loop's time the request must end by: its
    timeout after it arrived (`arrived`, event-loop time; None: now)."""

    def __init__(self, header: float | None, default: float, maximum: float, arrived: float | None = None) -> None:
        self.header = header
        self.default = default
        self.maximum = maximum
        self.arrived = arrived

    def seconds(self, body_timeout: float | None = None) -> float:
        if body_timeout is not None:
            _check(body_timeout, self.maximum, "timeout")
        given = [t for t in (self.header, body_timeout) if t is not None]
        return min(given) if given else self.default

    def deadline(self, body_timeout: float | None = None) -> float:
        since = self.arrived if self.arrived is not None else asyncio.get_running_loop().time()
        return since + self.seconds(body_timeout)


def _check(value: float, maximum: float, param: str) -> None:
    if not math.isfinite(value) or value <= 0 or value > maximum:
        raise InvalidRequest(f"{param} must be more than 0 and at most {maximum:g} seconds", param=param)


async def request_timeout(
    settings: SettingsDep,
    record: RequestRecordDep,
    x_request_timeout: Annotated[
        str | None,
        Header(description="Seconds this request may take (waiting for a model load included); "
               "past it the client gets 504. At most LLM_MAX_REQUEST_TIMEOUT_SECONDS."),
    ] = None,
) -> RequestTimeout:
    return timeout_of(x_request_timeout, settings.llm, record.arrived)


def timeout_of(x_request_timeout: str | None, llm: LLMSettings, arrived: float | None) -> RequestTimeout:
    """The request's timeout from its X-Request-Timeout header (InvalidRequest when malformed), counted
    from its arrival."""
    header: float | None = None
    if x_request_timeout is not None:
        try:
            header = float(x_request_timeout)
        except ValueError:
            raise InvalidRequest(f"{HEADER} must be a number of seconds", param=HEADER) from None
        _check(header, llm.max_request_timeout_seconds, HEADER)
    return RequestTimeout(header, llm.request_timeout_seconds, llm.max_request_timeout_seconds, arrived)


RequestTimeoutDep = Annotated[RequestTimeout, Depends(request_timeout)]
