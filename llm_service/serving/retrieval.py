"""What the retrieval services (embeddings, rerank) share: their slot by kind, and a trace per request."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

from llm_service.engines.base import Engine
from llm_service.errors import InvalidRequest, outcome_of, to_service_error
from llm_service.observability.tracing import Trace, Tracer
from llm_service.registry import ModelRegistry, Slot
from llm_service.traffic.admission import Admission, AdmissionController, Work
from llm_service.traffic.request_record import RequestRecord

# The setting that turns a retrieval slot on, named in the 400 for a model of the wrong kind.
MODEL_SETTING = {"embedding": "LLM_MODEL_EMBEDDING", "rerank": "LLM_MODEL_RERANK"}


def slots_of_kind(registry: ModelRegistry, kind: str) -> list[str]:
    return [name for name in registry.slot_names if registry.slot(name).config.kind == kind]


def check_kind(registry: ModelRegistry, slot: Slot, model: str, kind: str) -> None:
    """400 unless `slot` (the one `model` names) serves `kind`."""
    if slot.config.kind != kind:
        served = slots_of_kind(registry, kind)
        article = "an" if kind[0] in "aeiou" else "a"
        raise InvalidRequest(
            f"model {model!r} is a {slot.config.kind} model, not {article} {kind} model; "
            f"{kind} models: {', '.join(served) if served else f'none (set {MODEL_SETTING[kind]})'}",
            param="model",
        )


def find_slot(registry: ModelRegistry, model: str, kind: str) -> Slot:
    """The slot `model` names; a model id that slots of several kinds serve (the demo's
    all-MiniLM-L6-v2 in both `embedding` and `rerank`) means the one of `kind`."""
    slot = registry.find(model)
    if slot.config.kind == kind or model == slot.name:
        return slot
    for name in slots_of_kind(registry, kind):
        other = registry.slot(name)
        if model == other.config.model_id or model in other.config.aliases:
            return other
    return slot


def start_request(
    registry: ModelRegistry,
    tracer: Tracer,
    *,
    model: str,
    kind: str,
    request_id: str,
    record: RequestRecord | None,
    input: Any,
    parameters: dict[str, Any],
) -> tuple[Slot, Trace]:
    """The slot of a retrieval request and its started trace. The slot goes into the request's
    record first, so a request refused for the slot's kind counts under that slot."""
    slot = find_slot(registry, model, kind)
    if record is not None:
        record.slot = slot.name
    check_kind(registry, slot, model, kind)
    trace = tracer.start_retrieval(
        request_id=request_id,
        slot=slot.name,
        model_id=slot.config.model_id,
        operation=kind,
        input=input,
        parameters=parameters,
    )
    return slot, trace


@dataclass
class TraceSummary:
    """What a retrieval request's trace ends with; the service fills it in as it goes."""

    tokens: int = 0
    cache: str = "bypass"
    details: dict[str, Any] = field(default_factory=dict)


@contextmanager
def traced(trace: Trace) -> Iterator[TraceSummary]:
    """End `trace` once when the block ends: success, or the error the client sees (or cancelled)."""
    summary = TraceSummary()
    outcome, error = "success", None
    try:
        yield summary
    except Exception as exc:
        service_error = to_service_error(exc)
        outcome = outcome_of(service_error)
        error = service_error.message
        service_error.trace_id = trace.trace_id
        raise
    except BaseException:
        outcome, error = "cancelled", "the client went away"
        raise
    finally:
        trace.end(
            outputs=[],
            prompt_tokens=summary.tokens,
            completion_tokens=0,
            time_to_first_token=None,
            cache=summary.cache,
            outcome=outcome,
            error=error,
            details=summary.details,
        )


@asynccontextmanager
async def admitted_engine(
    registry: ModelRegistry, admission: AdmissionController | None, slot: str, least: Work, deadline: float | None
) -> AsyncIterator[tuple[Engine, Admission | None]]:
    """The slot's engine, held for the block, after admission on arrival (429 at once past a count
    bound, or when even `least`, a lower bound of the request's work, could not start before
    `deadline`); the Admission (None without admission control) then takes the request's work."""
    async with AsyncExitStack() as stack:
        admitted = None
        if admission is not None:
            admitted = await stack.enter_async_context(admission.admit(slot, least, deadline))
        engine = await stack.enter_async_context(registry.acquire(slot))
        yield engine, admitted
