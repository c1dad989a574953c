"""What handling one HTTP request learned (its slot, an in-band failure), read when its response ends."""

from __future__ import annotations

from dataclasses import dataclass

from llm_service.traffic.admission import Reservation


@dataclass
class RequestRecord:
    """What handling one request learned, read when its response ends."""

    # Event-loop time it arrived (None outside a generation endpoint): its deadline counts from here,
    # for the fast path and its route alike.
    arrived: float | None = None
    slot: str | None = None  # the slot it named, once known
    failure: int | None = None  # status of an error that ended it after the response began (in-band)
    # Work admission holds for it since the fast path let it through, until its route's admit adopts it.
    reservation: Reservation | None = None

    def failed(self, status_code: int) -> None:
        self.failure = status_code
