"""The admission policy: pure decisions over a snapshot of a slot's load, the engine's capacity and its drain rate.

A request is admitted by the work it brings (sequences and the KV tokens they may fill), not by
its count: whatever the engine can start at once is admitted; beyond that a request queues when
the queue ahead is expected to drain (at the engine's measured rate) before the request's
deadline, and is refused now with 429 and a Retry-After otherwise. Explicit count bounds
(LLM_MAX_PENDING_*) still apply where set. IMPLEMENTATION.md ("Admission") gives the reasoning.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from llm_service.engines.base import EngineCapacity

# A refusal without a measured drain rate is momentary: a running request ends within about a second.
RETRY_AFTER_SECONDS = 1.0


@dataclass(frozen=True)
class Work:
    """What one request asks of an engine: sequences, and the KV tokens they may fill at most
    ((prompt + max_tokens) x n for a generation; the inputs' tokens for embeddings and rerank)."""

    sequences: int
    tokens: int

    def __add__(self, other: Work) -> Work:
        return Work(self.sequences + other.sequences, self.tokens + other.tokens)

    def __sub__(self, other: Work) -> Work:
        return Work(self.sequences - other.sequences, self.tokens - other.tokens)


NO_WORK = Work(0, 0)


@dataclass(frozen=True)
class DrainRate:
    """What a slot's engine releases per second while it is busy (measured from finished requests)."""

    tokens_per_second: float
    sequences_per_second: float


@dataclass(frozen=True)
class AdmissionLimits:
    """The bounds of the policy, from the settings (0 = no explicit bound)."""

    per_slot: int = 0  # sequences running in the engine plus waiting for it, per slot
    total: int = 0  # the same over every slot
    # Before a drain rate is measured: the work a slot holds (running plus queued) may reach this
    # many times what its engine runs at once.
    per_batch: float = 2.0
    before_load: int = 64  # per-slot bound while the slot's engine capacity is unknown


@dataclass(frozen=True)
class SlotLoad:
    """What admission knows about one slot at one moment."""

    pending: int = 0  # sequences admitted and not finished: waiting for a load, queued or running
    held: Work = NO_WORK  # work given to the engine (running or queued in it)
    capacity: EngineCapacity | None = None  # None before the slot's first load
    drain: DrainRate | None = None  # None before a request has finished on the slot


@dataclass(frozen=True)
class Refusal:
    """Why a request is refused, for the client, the refusal metric and Retry-After."""

    reason: str  # "slot", "total" (a count bound) or "queue" (could not start before its deadline)
    message: str
    limit: int
    retry_after: float = RETRY_AFTER_SECONDS


def fits_at_once(capacity: EngineCapacity, held: Work, work: Work) -> bool:
    """Whether the engine can run `work` now beside `held`: room in its KV cache and its batch."""
    total = held + work
    return total.tokens <= capacity.kv_cache_tokens and total.sequences <= capacity.max_num_seqs


def requests_at_once(kv_cache_tokens: int, max_num_seqs: int, tokens_per_request: int) -> int:
    """How many requests of `tokens_per_request` tokens (prompt plus output) an engine runs at once."""
    return max(0, min(max_num_seqs, kv_cache_tokens // max(1, tokens_per_request)))


def queue_seconds(load: SlotLoad, work: Work) -> float | None:
    """Expected seconds until `work` can start on the slot: 0 when it fits now, None when unknown
    (no capacity or no measured drain rate yet). The held work beyond what the engine holds at once
    has to drain first, at the measured rate, in tokens and in sequences."""
    capacity = load.capacity
    if capacity is None:
        return None
    if fits_at_once(capacity, load.held, work):
        return 0.0
    if load.drain is None:
        return None
    total = load.held + work
    seconds = 0.0
    excess_tokens = total.tokens - capacity.kv_cache_tokens
    if excess_tokens > 0:
        seconds = excess_tokens / max(load.drain.tokens_per_second, 1e-9)
    excess_sequences = total.sequences - capacity.max_num_seqs
    if excess_sequences > 0:
        seconds = max(seconds, excess_sequences / max(load.drain.sequences_per_second, 1e-9))
    return seconds


class AdmissionPolicy:
    """Pure decisions: on arrival, the count bounds; once the request's work is known, the engine's
    capacity and the queue's expected drain against the request's deadline."""

    def __init__(self, limits: AdmissionLimits) -> None:
        self.limits = limits

    def slot_bound(self, load: SlotLoad) -> int | None:
        """The count bound of a slot: explicit, or before its first load; None: bounded by work."""
        if self.limits.per_slot > 0:
            return self.limits.per_slot
        if load.capacity is None:
            return self.limits.before_load
        return None

    def arrival_refusal(self, slot: str, sequences: int, loads: Mapping[str, SlotLoad]) -> Refusal | None:
        """None to let `sequences` more wait for `slot`'s engine, else why not (count bounds only)."""
        load = loads[slot]
        bound = self.slot_bound(load)
        # A single request heavier than a bound still runs when the slot is idle.
        if bound is not None and load.pending and load.pending + sequences > bound:
            return Refusal(
                "slot",
                f"model {slot!r} is at capacity ({load.pending} of {bound} requests running or waiting); "
                "retry shortly",
                bound,
            )
        total = sum(other.pending for other in loads.values())
        if self.limits.total > 0 and total and total + sequences > self.limits.total:
            return Refusal(
                "total",
                f"the service is at capacity ({total} of {self.limits.total} requests running or waiting); "
                "retry shortly",
                self.limits.total,
            )
        return None

    def work_refusal(self, slot: str, work: Work, load: SlotLoad, seconds_left: float) -> Refusal | None:
        """None to give `work` to the slot's engine (now or queued), else why not. `seconds_left`
        is the time to the request's deadline (math.inf: none)."""
        capacity = load.capacity
        # An idle slot runs anything that passed validation; an unknown engine is bounded by count.
        if capacity is None or load.held.sequences == 0:
            return None
        wait = queue_seconds(load, work)
        if wait is None:  # no drain rate measured yet: a queue of `per_batch` engine-fulls at most
            total = load.held + work
            token_bound = int(self.limits.per_batch * capacity.kv_cache_tokens)
            sequence_bound = int(self.limits.per_batch * capacity.max_num_seqs)
            if total.tokens <= token_bound and total.sequences <= sequence_bound:
                return None
            return Refusal(
                "queue",
                f"model {slot!r} is at capacity ({load.held.tokens} tokens of {load.held.sequences} requests "
                f"running or queued; it holds {capacity.kv_cache_tokens} at once); retry shortly",
                token_bound,
            )
        if wait < seconds_left:
            return None
        return Refusal(
            "queue",
            f"model {slot!r} is busy: this request would start in about {wait:.0f} s, after its timeout "
            f"({max(0.0, seconds_left):.0f} s left); retry later",
            capacity.kv_cache_tokens,
            retry_after=max(RETRY_AFTER_SECONDS, math.ceil(wait)),
        )
