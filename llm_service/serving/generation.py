"""The one generation path every API surface uses: slot, prompt, limits, engine, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import structlog

from llm_service.cache.controls import CacheControl
from llm_service.cache.local import MEMORY
from llm_service.cache.store import CachePlan
from llm_service.engines.base import (
    ChatConfig,
    Engine,
    GenerationDelta,
    GenerationRequest,
    InvalidImage,
    PromptInput,
    PromptTooLong,
    SamplingOptions,
    TokenLogprob,
    ToolCallDelta,
)
from llm_service.errors import DeadlineExceeded, InvalidRequest, ServiceError, outcome_of, to_service_error
from llm_service.observability.metrics import Metrics
from llm_service.observability.tracing import NO_TRACE, NoTracer, Trace, Tracer
from llm_service.registry import ModelRegistry, Slot
from llm_service.serving.coalesce import Coalescer
from llm_service.serving.images import NO_IMAGES, RequestImages, find_images, inspect_images
from llm_service.traffic.admission import AdmissionController, Work
from llm_service.traffic.deadlines import before_deadline, deadline_passed
from llm_service.traffic.request_record import RequestRecord

log = structlog.get_logger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class GenerationSpec:
    """What a client asked for, before the slot's engine is involved."""

    request_id: str
    slot: str  # slot name or model id
    sampling: SamplingOptions  # max_tokens 0 = "default, capped by the context"
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    cache: CacheControl = field(default_factory=CacheControl)
    token_ids: tuple[int, ...] | None = None  # a prompt given as token ids (/v1/completions)
    images: tuple[str, ...] = ()  # image URLs that go with `prompt`
    tools: list[dict[str, Any]] | None = None  # OpenAI function tools, with messages
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    record: RequestRecord = field(default_factory=RequestRecord)  # the HTTP request's, for its count
    deadline: float | None = None  # event-loop time the request must end by (None: no deadline)
    adapter: str | None = None  # the LoRA adapter `slot` names (set when the model name is resolved)

    def prompt_input(self) -> PromptInput:
        """What the engine renders."""
        return PromptInput(
            text=self.prompt, token_ids=self.token_ids, messages=self.messages, images=self.images,
            tools=self.tools, tool_choice=self.tool_choice, parallel_tool_calls=self.parallel_tool_calls,
        )


@dataclass
class ToolCall:
    """One complete tool call of a choice, folded from its deltas."""

    id: str
    name: str
    arguments: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"id": self.id, "name": self.name, "arguments": self.arguments}


@dataclass
class Choice:
    index: int
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)

    def add_tool_calls(self, deltas: tuple[ToolCallDelta, ...]) -> None:
        """Fold call pieces: the first piece of a call brings its id and name, later ones arguments."""
        for delta in deltas:
            while len(self.tool_calls) <= delta.index:
                self.tool_calls.append(ToolCall(id="", name=""))
            call = self.tool_calls[delta.index]
            call.id = delta.id or call.id
            call.name = delta.name or call.name
            call.arguments += delta.arguments

    def trace_output(self) -> str:
        """What a trace records as this choice's output: its text, or its tool calls."""
        if not self.tool_calls:
            return self.text
        return json.dumps({"content": self.text or None, "tool_calls": [c.as_dict() for c in self.tool_calls]})


@dataclass
class GenerationResult:
    """A finished generation, every choice complete."""

    request_id: str
    slot: str
    model_id: str
    prompt: str
    choices: list[Choice]
    prompt_tokens: int = 0
    time_to_first_token: float | None = None
    total_time: float = 0.0
    cached: bool = False
    cache_tier: str | None = None  # a hit's tier: "memory" (this replica's) or "redis"
    coalesced: bool = False  # shared an identical in-flight request's generation
    trace_id: str | None = None

    def add(self, delta: GenerationDelta) -> None:
        """Fold one delta into its choice."""
        while len(self.choices) <= delta.index:
            self.choices.append(Choice(index=len(self.choices)))
        choice = self.choices[delta.index]
        choice.text += delta.text
        choice.completion_tokens = delta.completion_tokens
        choice.logprobs.extend(delta.logprobs)
        choice.add_tool_calls(delta.tool_calls)
        if delta.finish_reason is not None:
            choice.finish_reason = delta.finish_reason
        self.prompt_tokens = delta.prompt_tokens

    def headers(self) -> dict[str, str]:
        """Response headers every surface sends with this result."""
        headers = {"X-Cache": self.cache_header()}
        if self.trace_id:
            headers["X-Trace-ID"] = self.trace_id
        return headers

    def cache_header(self) -> str:
        """X-Cache: HIT-MEMORY, HIT-REDIS, COALESCED or MISS."""
        if self.cached:
            return f"HIT-{(self.cache_tier or 'redis').upper()}"
        return "COALESCED" if self.coalesced else "MISS"

    @property
    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.choices)


class GenerationStream:
    """An opened generation: iterate for deltas; `result` is complete once iteration ends.

    Opening it (GenerationService.open) already acquired the engine and received the first
    delta, so every error a client can get as an HTTP status has happened by then.
    """

    def __init__(
        self,
        service: GenerationService,
        result: GenerationResult,
        trace: Trace = NO_TRACE,
        record: RequestRecord | None = None,
        deadline: float | None = None,
    ) -> None:
        self.result = result
        self.deadline = deadline
        self.trace = trace
        self.cache_status = "bypass"  # hit, miss, coalesced or bypass (for the trace)
        self.ran_engine = False
        self._request = record  # None for a generation shared by coalesced requests (each reader's counts)
        self._error: str | None = None
        self._service = service
        # What the stream holds (the slot, the admission, the deltas), made with the first: a refusal
        # on arrival or a memory hit holds nothing, and an empty stack's exit costs a tenth of a refusal.
        self._stack: contextlib.AsyncExitStack | None = None
        self._deltas: AsyncIterator[GenerationDelta] | None = None
        self._first: GenerationDelta | None = None
        self._started = time.perf_counter()
        self._outcome = "cancelled"
        self._closed = False

    async def enter(self, context: contextlib.AbstractAsyncContextManager[T]) -> T:
        """Hold `context` (the slot, the admission) until the stream closes."""
        return await self._holding().enter_async_context(context)

    async def start(self, engine: Engine, request: GenerationRequest) -> None:
        """Start the engine's generation and wait for its first delta."""
        self.ran_engine = True
        await self.replay(engine.generate(request))

    async def replay(self, deltas: AsyncIterator[GenerationDelta]) -> None:
        """Serve `deltas` (the engine's, a cache entry's, or a shared generation's); wait for the first."""
        self._holding().push_async_callback(_aclose, deltas)
        self._deltas = deltas
        self._first = await anext(deltas, None)

    def _holding(self) -> contextlib.AsyncExitStack:
        if self._stack is None:
            self._stack = contextlib.AsyncExitStack()
        return self._stack

    def __aiter__(self) -> AsyncIterator[GenerationDelta]:
        return self._iterate()

    async def finish(self, deltas: list[GenerationDelta]) -> None:
        """Complete the stream from deltas already at hand (a memory-tier hit) and close it."""
        for delta in deltas:
            self._record(delta)
        self._outcome = "success"
        await self.aclose()

    async def _iterate(self) -> AsyncIterator[GenerationDelta]:
        try:
            if self._first is not None:
                first, self._first = self._first, None
                self._record(first)
                yield first
            while self._deltas is not None:
                try:
                    async with asyncio.timeout_at(self.deadline):
                        delta = await anext(self._deltas, None)
                except TimeoutError as exc:
                    raise self._service.deadline_passed(self.result.slot) from exc
                if delta is None:
                    break
                self._record(delta)
                yield delta
            self._outcome = "success"
        except Exception as exc:
            error = to_service_error(exc)
            await self.fail(error, exc)
            if error is exc:
                raise
            raise error from exc
        finally:
            await self.aclose()

    def _record(self, delta: GenerationDelta) -> None:
        if self.result.time_to_first_token is None:
            self.result.time_to_first_token = time.perf_counter() - self._started
        self.result.add(delta)

    async def fail(self, error: ServiceError, cause: BaseException | None = None) -> None:
        """Close a failed stream; the slot's context sees the cause (a dead engine, say; None: the
        error itself)."""
        self._outcome = outcome_of(error)
        self._error = error.message
        if self._request is not None:
            self._request.failed(error.status_code)
        await self.aclose(error if cause is None else cause)

    async def aclose(self, cause: BaseException | None = None) -> None:
        """Release the engine (aborting the request if unfinished) and record metrics once."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._stack is None:
                pass  # nothing held
            elif cause is None:
                await self._stack.aclose()
            else:
                await self._stack.__aexit__(type(cause), cause, cause.__traceback__)
        finally:
            result = self.result
            result.total_time = time.perf_counter() - self._started
            self._service.record(result, self._outcome, self.ran_engine)
            self.trace.end(
                outputs=[c.trace_output() for c in result.choices],
                prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens,
                time_to_first_token=result.time_to_first_token,
                cache=self.cache_status,
                outcome=self._outcome,
                error=self._error,
            )


async def _aclose(iterator: AsyncIterator[Any]) -> None:
    closer = getattr(iterator, "aclose", None)
    if closer is not None:
        await closer()


class GenerationService:
    """Turns a GenerationSpec into engine work on a slot the registry hands out."""

    def __init__(
        self,
        registry: ModelRegistry,
        metrics: Metrics,
        default_max_tokens: int,
        coalescer: Coalescer | None = None,
        tracer: Tracer | None = None,
        admission: AdmissionController | None = None,
    ) -> None:
        self.registry = registry
        self.admission = admission  # None: no admission bounds
        self.metrics = metrics
        self.default_max_tokens = default_max_tokens
        self.coalescer = coalescer  # None: no response cache, no coalescing
        self.tracer = tracer or NoTracer()
        # cache_key_extra of each slot's chat configuration, made once: the same for all its requests.
        self._chat_key_material: dict[ChatConfig, dict[str, Any] | None] = {}

    async def open(self, spec: GenerationSpec) -> GenerationStream:
        """Acquire the slot, render and check the prompt, start the engine, await the first delta.

        Raises ServiceError subclasses: ModelNotFound, ModelUnavailable, InvalidRequest,
        Overloaded, DeadlineExceeded, EngineFailure.
        """
        slot, adapter = self.registry.find_model(spec.slot)
        spec = dataclasses.replace(spec, adapter=adapter)
        spec.record.slot = slot.name
        # The deadline covers everything up to the first delta, waiting for a load included.
        async with before_deadline(spec.deadline, self.metrics, slot.name):
            return await self._open(spec, slot.name)

    def _slot_key_material(self, chat: ChatConfig) -> dict[str, Any] | None:
        """cache_key_extra(chat), computed on a slot's first cacheable request and kept."""
        try:
            return self._chat_key_material[chat]
        except KeyError:
            material = self._chat_key_material[chat] = cache_key_extra(chat)
            return material

    def deadline_passed(self, slot: str) -> DeadlineExceeded:
        """The error of a request past its deadline (its engine request is aborted by then)."""
        return deadline_passed(self.metrics, slot)

    async def _open(self, spec: GenerationSpec, slot_name: str) -> GenerationStream:
        slot = self.registry.slot(slot_name)
        _check_kind(slot)
        images = await inspect_images(spec.messages, spec.images, slot.config.images)
        stream = self._stream(spec, slot, images)
        # The key needs only the request and the slot's configuration: a hit loads no model.
        coalescer = self.coalescer
        plan = self._plan(spec, slot, images)
        if coalescer is None or plan is None:
            return await self._opened(stream, self._start(stream, spec))
        return await self._opened(stream, self._serve(stream, spec, coalescer, plan))

    async def answer_now(self, spec: GenerationSpec, hit: bool = True) -> GenerationResult | None:
        """What can be decided for a request at once, awaiting nothing: its answer from this
        replica's memory tier, or its refusal by admission (raises Overloaded, 429) when it will
        need the engine. None when neither: nothing was counted or traced, serve it with `open`
        or `complete` (an unknown slot, images, a miss that Redis or an identical generation in
        flight may answer, a request admission lets wait: its least work is then reserved in
        `spec.record.reservation` for the route's admit to adopt; release it if it never does).
        `hit` False: a cacheable request is not answered here at all (a stream, which its route
        renders)."""
        try:
            slot = self.registry.find(spec.slot)
        except ServiceError:
            return None
        if slot.config.kind != "generate" or spec.images or find_images(spec.messages):
            return None
        plan = self._plan(spec, slot, NO_IMAGES)
        if plan is not None and plan.read:
            if not hit:
                return None
            entry = self.coalescer.memory_hit(plan, slot.name) if self.coalescer is not None else None
            if entry is None:
                return None
            spec.record.slot = slot.name
            stream = self._stream(spec, slot, NO_IMAGES)
            stream.result.cached, stream.result.cache_tier, stream.cache_status = True, MEMORY, "hit"
            stream.result.prompt = entry.prompt
            await stream.finish(entry.deltas())
            return stream.result
        if self.admission is None:
            return None
        least = self._least_work(slot.name, spec.sampling)
        try:
            # Held until the route's admit adopts it: requests of a burst decided meanwhile count it.
            spec.record.reservation = self.admission.reserve(slot.name, least, spec.deadline)
        except ServiceError as exc:
            spec.record.slot = slot.name
            stream = self._stream(spec, slot, NO_IMAGES)
            exc.trace_id = stream.result.trace_id
            await stream.fail(exc)  # counted and traced as the route's refusal would be
            raise
        return None

    def _stream(self, spec: GenerationSpec, slot: Slot, images: RequestImages) -> GenerationStream:
        """The request's stream, its result and its trace (started)."""
        result = GenerationResult(spec.request_id, slot.name, slot.config.model_id, prompt="", choices=[])
        trace = self.tracer.start(
            request_id=spec.request_id,
            slot=slot.name,
            model_id=slot.config.model_id,
            input=_trace_input(spec, images),
            sampling=spec.sampling,
            adapter=spec.adapter,
        )
        if spec.adapter is not None:
            self.metrics.adapter_requests.labels(model=slot.name, adapter=spec.adapter).inc()
        result.trace_id = trace.trace_id
        return GenerationStream(self, result, trace, spec.record, deadline=spec.deadline)

    def _plan(self, spec: GenerationSpec, slot: Slot, images: RequestImages) -> CachePlan | None:
        """How the cache takes part in the request (None: it does not)."""
        if self.coalescer is None or not images.cacheable:
            return None
        return self.coalescer.policy.plan(
            spec.cache, spec.sampling, spec.prompt, images.summarised_messages or spec.messages, slot.config,
            extra=_key_extra(spec, images, self._slot_key_material(slot.config.chat)),
        )

    async def _serve(
        self, stream: GenerationStream, spec: GenerationSpec, coalescer: Coalescer, plan: CachePlan
    ) -> None:
        """A cacheable request: from the cache, from an identical request's generation, or from
        a new generation that identical requests arriving meanwhile share."""
        result = stream.result

        async def open_engine() -> GenerationStream:
            shared_result = dataclasses.replace(result, choices=[], trace_id=None)
            # The engine's work is counted once, here; each reader's request is its own.
            shared = GenerationStream(self, shared_result)
            await self._opened(shared, self._start(shared, spec))
            return shared

        served = await coalescer.serve(plan, result.slot, result.model_id, open_engine)
        result.cached = served.cached
        result.cache_tier = served.tier
        result.coalesced = served.cache_status == "coalesced"
        stream.cache_status = served.cache_status
        await stream.replay(served.deltas)
        result.prompt = served.prompt

    async def _start(self, stream: GenerationStream, spec: GenerationSpec) -> None:
        """Admit the request, acquire the slot, render and check the prompt, start the engine."""
        slot = stream.result.slot
        admission = None
        if self.admission is not None:  # refused at once (429) past a count bound, or by its least work
            admission = await stream.enter(self.admission.admit(
                slot, self._least_work(slot, spec.sampling), spec.deadline, spec.record.reservation
            ))
        engine = await stream.enter(self.registry.acquire(slot))
        try:
            rendered = await engine.render(spec.prompt_input())
        except InvalidImage as exc:
            raise InvalidRequest(str(exc), param="images" if spec.images else "messages") from exc
        except PromptTooLong as exc:
            raise InvalidRequest(str(exc), param="messages" if spec.messages is not None else "prompt") from exc
        except ValueError as exc:
            param = "messages" if spec.messages is not None else "prompt"
            raise InvalidRequest(f"cannot render the prompt: {exc}", param=param) from exc
        stream.result.prompt = rendered.text
        sampling = self._bounded(engine, rendered.prompt_tokens, spec.sampling)
        if admission is not None:  # refused at once (429) when it could not start before its deadline
            work = Work(sampling.n, sampling.n * (rendered.prompt_tokens + sampling.max_tokens))
            admission.start(work, engine.capacity(), spec.deadline)
        # The client's request id may repeat (X-Request-ID); the engine's must be unique.
        engine_request_id = f"{spec.request_id}-{secrets.token_hex(4)}"
        await stream.start(engine, GenerationRequest(engine_request_id, rendered, sampling, adapter=spec.adapter))

    async def _opened(self, stream: GenerationStream, opening: Awaitable[None]) -> GenerationStream:
        """Await `opening`; on failure close the stream (releasing the slot) and raise a ServiceError."""
        try:
            await opening
        except Exception as exc:
            error = to_service_error(exc)
            error.trace_id = stream.result.trace_id
            await stream.fail(error, exc)
            if error is exc:
                raise
            raise error from exc
        except BaseException:  # cancelled (the client left): still release the slot
            await stream.aclose()
            raise
        return stream

    async def complete(self, spec: GenerationSpec) -> GenerationResult:
        """Run a generation to the end."""
        stream = await self.open(spec)
        async for _ in stream:
            pass
        return stream.result

    def _least_work(self, slot: str, sampling: SamplingOptions) -> Work:
        """A lower bound of a request's work before its prompt is rendered: at least one prompt token
        plus max_tokens (or the default max_tokens, or the context, whichever is less) per choice."""
        tokens = sampling.max_tokens or min(self.default_max_tokens, self.registry.slot(slot).config.max_model_len)
        return Work(sampling.n, sampling.n * tokens)

    def _bounded(self, engine: Engine, prompt_tokens: int, sampling: SamplingOptions) -> SamplingOptions:
        """Fill in the default max_tokens and check the prompt (image tokens included) fits the context."""
        limit = engine.config.max_model_len
        max_tokens = sampling.max_tokens
        if max_tokens <= 0:
            max_tokens = max(1, min(self.default_max_tokens, limit - prompt_tokens))
        if prompt_tokens + max_tokens > limit:
            raise PromptTooLong(prompt_tokens, max_tokens, limit)
        if max_tokens == sampling.max_tokens:
            return sampling
        return dataclasses.replace(sampling, max_tokens=max_tokens)

    def record(self, result: GenerationResult, outcome: str, ran_engine: bool) -> None:
        """Count the engine's work, if it ran, in the metrics (requests count in RequestAccounting)."""
        m, slot = self.metrics, result.slot
        if not ran_engine:
            return
        m.engine_generations.labels(model=slot).inc()
        m.prompt_tokens.labels(model=slot).inc(result.prompt_tokens)
        m.tokens_generated.labels(model=slot).inc(result.completion_tokens)
        m.inference_duration.labels(model=slot).observe(result.total_time)
        if result.time_to_first_token is not None:
            m.time_to_first_token.labels(model=slot).observe(result.time_to_first_token)
        log.info(
            "generation_finished",
            slot=slot,
            outcome=outcome,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            ttft=_round(result.time_to_first_token),
            seconds=_round(result.total_time),
        )


def _check_kind(slot: Slot) -> None:
    if slot.config.kind != "generate":
        kind = slot.config.kind
        raise InvalidRequest(f"model {slot.name!r} is a {kind} model, it does not generate", param="model")


def _trace_input(spec: GenerationSpec, images: RequestImages) -> Any:
    """The request's input as traces record it: images by size and hash, never their bytes."""
    if spec.messages is not None:
        return images.summarised_messages or spec.messages
    if spec.token_ids is not None:
        return {"token_ids": list(spec.token_ids)}
    if images is not NO_IMAGES:
        return {"prompt": spec.prompt, "images": images.summaries()}
    return spec.prompt


def _key_extra(
    spec: GenerationSpec, images: RequestImages, slot_material: dict[str, Any] | None
) -> dict[str, Any] | None:
    """Cache key material beyond prompt and messages: token ids, images beside a prompt, tools,
    and the slot's (`slot_material`, its cache_key_extra: the chat template and tool parser change
    the prompt and the parsed output)."""
    extra: dict[str, Any] = {}
    if spec.token_ids is not None:
        extra["token_ids"] = list(spec.token_ids)
    if spec.images:
        extra["images"] = images.summaries()
    if spec.tools:
        extra["tools"] = {"tools": spec.tools, "choice": spec.tool_choice, "parallel": spec.parallel_tool_calls}
    if spec.adapter is not None:
        extra["adapter"] = spec.adapter  # another adapter, or the base model, answers differently
    return {**extra, **(slot_material or {})} or None


def cache_key_extra(chat: ChatConfig) -> dict[str, Any] | None:
    """Key material of a plain text request on a slot: its chat template and tool parser, when not
    the default. A template file counts by its content too: an edited file keeps its path."""
    if chat == ChatConfig():
        return None
    material: dict[str, Any] = {"chat": dataclasses.asdict(chat)}
    template = _template_file(chat.chat_template)
    if template is not None:
        material["chat_template_sha256"] = hashlib.sha256(template.read_bytes()).hexdigest()
    return material


def _template_file(template: str | None) -> Path | None:
    """The chat template's file, None when it is the model's own or given inline."""
    if template is None or "\n" in template or "{" in template:
        return None
    try:
        path = Path(template)
        return path if path.is_file() else None
    except OSError:  # a name too long for the file system: an inline template
        return None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


