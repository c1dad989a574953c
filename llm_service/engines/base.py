"""Engine protocol: what the registry and the generation path need from an inference engine."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class EngineConfig:
    """Everything needed to start one engine for one slot."""

    slot: str
    model_id: str
    max_model_len: int
    memory_share: float
    device: str  # "cuda" or "cpu"
    enforce_eager: bool
    tensor_parallel_size: int = 1
    revision: str | None = None
    extra_args: dict[str, Any] = field(default_factory=dict)
    # Why the slot cannot load on this device (from the sizing plan); None when it can.
    unloadable: str | None = None
    # Other names a client may use for this slot's model (the deployment guide's ids).
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class EngineCapacity:
    """How much a loaded engine runs at once, as the engine itself reports it."""

    max_num_seqs: int  # sequences the scheduler batches at most
    kv_cache_tokens: int  # tokens the KV cache holds over all sequences
    max_model_len: int  # tokens one sequence may hold

    @property
    def batch(self) -> int:
        """Sequences the engine can run at once even if each fills the context (as vLLM's own
        "maximum concurrency" figure): the smaller of max_num_seqs and what the KV cache holds."""
        return max(1, min(self.max_num_seqs, self.kv_cache_tokens // max(1, self.max_model_len)))


@dataclass(frozen=True)
class SamplingOptions:
    """Sampling parameters, engine-neutral. None means the engine's default."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    n: int = 1
    # Number of top log-probabilities to return per token (0 = the sampled token only);
    # None = no log-probabilities.
    logprobs: int | None = None
    # Structured output: a JSON schema, or {} for "any JSON object".
    json_schema: dict[str, Any] | None = None


@dataclass(frozen=True)
class GenerationRequest:
    """One generation: a rendered prompt (text) and its sampling options."""

    request_id: str
    prompt: str
    sampling: SamplingOptions


@dataclass(frozen=True)
class TokenLogprob:
    """Log-probability of one generated token, with its top alternatives."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class GenerationDelta:
    """New output for one choice since the previous delta.

    `completion_tokens` is cumulative for the choice; `finish_reason` is set on the last delta
    of the choice ("stop", "length" or "abort").
    """

    index: int
    text: str
    completion_tokens: int
    prompt_tokens: int
    finish_reason: str | None = None
    logprobs: tuple[TokenLogprob, ...] = ()


class EngineError(Exception):
    """The engine failed while serving a request (not the request's fault)."""


class EngineDead(EngineError):
    """The engine is gone and must be restarted; every later request to it would fail."""


class PromptTooLong(ValueError):
    """The prompt plus max_tokens does not fit the slot's max_model_len."""

    def __init__(self, prompt_tokens: int, max_tokens: int, max_model_len: int) -> None:
        super().__init__(
            f"prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds the "
            f"model's context length of {max_model_len} tokens"
        )
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.max_model_len = max_model_len


@runtime_checkable
class Engine(Protocol):
    """An inference engine serving one model in this process."""

    config: EngineConfig

    async def start(self) -> None:
        """Load the model; returns when the engine accepts requests. Raises on failure."""

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        """Render chat messages to a prompt with the model's chat template (generation prompt added)."""

    def count_tokens(self, prompt: str) -> int:
        """Number of tokens the prompt encodes to (as the engine will count them)."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        """Yield deltas until every choice has finished.

        Closing the iterator early aborts the request in the engine.
        Raises EngineDead if the engine died, EngineError for other engine failures,
        ValueError for a request the engine rejects.
        """

    async def abort(self, request_id: str) -> None:
        """Stop a running request; a no-op if it is not running."""

    def capacity(self) -> EngineCapacity:
        """What the loaded engine batches (read-only; valid after start)."""

    def num_requests(self) -> int:
        """Requests the engine itself holds right now (running or queued in it), by its own count."""

    async def check_health(self) -> None:
        """Return if the engine is alive; raise EngineDead otherwise."""

    def on_dead(self, callback: Callable[[EngineDead], None]) -> None:
        """Have `callback` called once, on the event loop, when the started engine dies on its own
        (never after shutdown()), so that its death is noticed at once rather than at a poll."""

    async def shutdown(self) -> None:
        """Stop the engine and free its memory (ends its processes). Idempotent."""
