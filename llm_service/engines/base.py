"""Engine protocol: what the registry and the generation path need from an inference engine."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class ImageLimits:
    """What images a request may carry (LLM_IMAGE_*); the engine enforces them on what it fetches."""

    max_images: int = 4
    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 16_777_216
    fetch_hosts: tuple[str, ...] = ()  # empty: only data: URLs
    fetch_timeout_seconds: int = 5


@dataclass(frozen=True)
class ChatConfig:
    """How a slot renders chat and reads tool calls (as `vllm serve --chat-template --tool-call-parser`)."""

    chat_template: str | None = None  # a file path or the template itself; None: the model's own
    tool_parser: str | None = None  # a name in vLLM's tool parser registry; None: no tool calls
    # vLLM's --tool-strict-level: "parameter" makes every call follow its tool's JSON schema.
    tool_strict_level: str = "parameter"


@dataclass(frozen=True)
class AdapterConfig:
    """A LoRA adapter of a generate slot: the model name clients use, and its PEFT folder or Hub id."""

    name: str
    path: str


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
    images: ImageLimits = field(default_factory=ImageLimits)
    chat: ChatConfig = field(default_factory=ChatConfig)
    # "generate" (chat and completions), "embedding" (a pooling model behind /v1/embeddings) or
    # "rerank" (a cross-encoder behind /v1/rerank).
    kind: str = "generate"
    # What the sizing plan expects a start of this engine to take (an estimate; None: unknown).
    expected_load_seconds: float | None = None
    # LoRA: on when the slot lists adapters (vLLM's enable_lora); adapters are served by name.
    lora: bool = False
    adapters: tuple[AdapterConfig, ...] = ()
    max_loras: int = 1
    max_lora_rank: int = 16


@dataclass(frozen=True)
class EngineCapacity:
    """How much a loaded engine runs at once, as the engine itself reports it."""

    max_num_seqs: int  # sequences the scheduler batches at most
    kv_cache_tokens: int  # tokens the KV cache holds over all sequences
    max_model_len: int  # tokens one sequence may hold


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
    # Added to the logits of these token ids before sampling (OpenAI's logit_bias).
    logit_bias: dict[int, float] | None = None
    # Keep generating past the end-of-sequence token up to max_tokens (as vLLM; for load tests).
    ignore_eos: bool = False


@dataclass(frozen=True)
class PromptInput:
    """What the model is asked to continue, as the client gave it, before the engine renders it.

    Exactly one of `text`, `token_ids` and `messages` is set. `messages` are OpenAI chat messages
    (content a string or content parts, images as `image_url` parts); `images` are image URLs
    (data: or http(s)) that go with a `text` prompt, placed as the engine documents.
    """

    text: str | None = None
    token_ids: tuple[int, ...] | None = None
    messages: list[dict[str, Any]] | None = None
    images: tuple[str, ...] = ()
    # OpenAI's function tools, with messages only: [{"type": "function", "function": {...}}].
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None  # none, auto, required or {"type": "function", ...}
    parallel_tool_calls: bool | None = None


@dataclass(frozen=True)
class RenderedPrompt:
    """A prompt after rendering and tokenization, ready for one engine.

    `prompt_tokens` counts every token the model reads, image tokens included; `payload` is the
    engine's own input (vLLM's EngineInput), opaque to the rest of the service.
    """

    text: str
    prompt_tokens: int
    images: int = 0
    payload: Any = None


@dataclass(frozen=True)
class GenerationRequest:
    """One generation: a rendered prompt and its sampling options."""

    request_id: str
    prompt: RenderedPrompt
    sampling: SamplingOptions
    adapter: str | None = None  # a LoRA adapter of the slot, by name; None: the base model


@dataclass(frozen=True)
class TokenLogprob:
    """Log-probability of one generated token, with its top alternatives."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of one tool call of a choice: `id` and `name` come first, then `arguments` fragments."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(frozen=True)
class GenerationDelta:
    """New output for one choice since the previous delta.

    `completion_tokens` is cumulative for the choice; `finish_reason` is set on the last delta
    of the choice ("stop", "length", "abort", or "tool_calls" when the model called a tool);
    `text` is content only: tool-call markup comes parsed, as `tool_calls`.
    """

    index: int
    text: str
    completion_tokens: int
    prompt_tokens: int
    finish_reason: str | None = None
    logprobs: tuple[TokenLogprob, ...] = ()
    tool_calls: tuple[ToolCallDelta, ...] = ()


class EngineError(Exception):
    """The engine failed while serving a request (not the request's fault)."""


class EngineDead(EngineError):
    """The engine is gone and must be restarted; every later request to it would fail."""


class PromptTooLong(ValueError):
    """The prompt plus max_tokens does not fit the slot's max_model_len."""

    def __init__(self, prompt_tokens: int, max_tokens: int | None, max_model_len: int) -> None:
        # max_tokens None: the prompt alone is too long (the engine stopped counting past the limit).
        super().__init__(
            f"prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds the "
            f"model's context length of {max_model_len} tokens"
            if max_tokens is not None
            else f"prompt (more than {max_model_len} tokens) exceeds the model's context length of "
            f"{max_model_len} tokens"
        )
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.max_model_len = max_model_len


class InvalidImage(ValueError):
    """An image the engine cannot fetch, decode or take; the message says which one and why."""


@runtime_checkable
class Embedder(Protocol):
    """What an engine of an embedding slot adds: tokenize inputs, then embed many as one batch."""

    async def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text as the model reads it (special tokens included)."""

    async def embed(self, request_id: str, inputs: list[list[int]], dimensions: int | None) -> list[list[float]]:
        """One vector per input, all submitted to the engine at once. Raises ValueError for
        inputs or dimensions the model cannot take, EngineDead/EngineError as generate() does."""


@dataclass(frozen=True)
class PairScore:
    """A (query, document) pair's relevance score and the tokens the model read for the pair."""

    score: float
    tokens: int


@runtime_checkable
class Reranker(Protocol):
    """What an engine of a rerank slot adds: score many (query, document) pairs as one batch."""

    async def rerank(self, request_id: str, query: str, documents: list[str]) -> list[PairScore]:
        """One score per document, in order, all pairs submitted to the engine at once. Raises
        ValueError for a pair the model cannot take (longer than max_model_len) before any pair
        runs, EngineDead/EngineError as generate() does."""


@runtime_checkable
class Engine(Protocol):
    """An inference engine serving one model in this process."""

    config: EngineConfig

    async def start(self) -> None:
        """Load the model; returns when the engine accepts requests. Raises on failure."""

    async def render(self, prompt: PromptInput) -> RenderedPrompt:
        """Render (chat template, images) and tokenize a prompt once, off the event loop.

        Raises ValueError (InvalidImage for an image) for a prompt the model cannot take.
        """

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        """Yield deltas until every choice has finished.

        Closing the iterator early aborts the request in the engine.
        Raises EngineDead if the engine died, EngineError for other engine failures,
        ValueError for a request the engine rejects.
        """

    async def abort(self, request_id: str) -> None:
        """Stop a running request; a no-op if it is not running."""

    async def add_adapter(self, adapter: AdapterConfig) -> None:
        """Load a LoRA adapter into the started engine. Raises ValueError if it cannot be loaded."""

    async def remove_adapter(self, name: str) -> None:
        """Unload a LoRA adapter; a no-op for an unknown name."""

    def capacity(self) -> EngineCapacity:
        """What the loaded engine batches (read-only; valid after start)."""

    def num_requests(self) -> int:
        """Requests the engine itself holds right now (running or queued in it), by its own count."""

    def kv_cache_usage(self) -> float | None:
        """The share (0..1) of the engine's KV cache in use at its last step, by its own count (None: not
        known yet, or the engine does not report it)."""

    def memory_footprint(self) -> int | None:
        """Bytes of its device the started engine was measured to hold right after its start (its
        processes' memory where NVML gives it per process, else the device's used memory after its
        start minus before); None where nothing measures it (the CPU, or before start)."""

    async def check_health(self) -> None:
        """Return if the engine is alive; raise EngineDead otherwise."""

    def on_dead(self, callback: Callable[[EngineDead], None]) -> None:
        """Have `callback` called once, on the event loop, when the started engine dies on its own
        (never after shutdown()), so that its death is noticed at once rather than at a poll."""

    async def shutdown(self) -> None:
        """Stop the engine and free its memory (ends its processes). Idempotent."""
