"""A small deterministic engine for fast unit tests of everything around the real one."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

from llm_service.engines.base import (
    AdapterConfig,
    EngineCapacity,
    EngineConfig,
    EngineDead,
    GenerationDelta,
    GenerationRequest,
    InvalidImage,
    PairScore,
    PromptInput,
    PromptTooLong,
    RenderedPrompt,
    TokenLogprob,
    ToolCallDelta,
)


class FakeEngine:
    """Echoes a canned answer word by word; counts starts, generations and shutdowns.

    `start_delay`, `shutdown_delay` and `token_delay` stretch time so tests can overlap requests;
    `max_num_seqs` and `kv_cache_tokens` are the capacity it reports;
    `fail_start` makes start() raise; `die_after_tokens` or `kill()` make it behave like a
    dead engine (kill() also signals its death, as vLLM's engine-dead notification does);
    `image_tokens` is what one image costs (None: the model takes no images). A prompt's tokens
    are its words.
    """

    def __init__(
        self,
        config: EngineConfig,
        *,
        start_delay: float = 0.0,
        shutdown_delay: float = 0.0,
        token_delay: float = 0.0,
        fail_start: Exception | None = None,
        die_after_tokens: int | None = None,
        image_tokens: int | None = None,
        start_gate: asyncio.Event | None = None,
        max_num_seqs: int = 8,
        kv_cache_tokens: int = 65536,
        measured_bytes: int | None = None,
    ) -> None:
        self.config = config
        self.start_delay = start_delay
        self.shutdown_delay = shutdown_delay
        self.token_delay = token_delay
        self.fail_start = fail_start
        self.die_after_tokens = die_after_tokens
        self.image_tokens = image_tokens
        self.start_gate = start_gate  # when set, start() also waits for it (tests hold a load open)
        self.started = False
        self.dead = False
        self.adapters = {adapter.name for adapter in config.adapters}
        self.shutdowns = 0
        self.generations = 0
        self.aborted: list[str] = []
        self.max_num_seqs = max_num_seqs
        self.kv_cache_tokens = kv_cache_tokens
        self.measured_bytes = measured_bytes  # what memory_footprint() reports once started (a simulated GPU)
        self.running: set[str] = set()
        self.request_ids: list[str] = []
        self.embed_batches: list[int] = []  # size of each embed() call
        self.rerank_batches: list[int] = []  # documents of each rerank() call
        self._on_dead: Callable[[EngineDead], None] | None = None

    async def start(self) -> None:
        await asyncio.sleep(self.start_delay)
        if self.start_gate is not None:
            await self.start_gate.wait()
        if self.fail_start is not None:
            raise self.fail_start
        self.started = True

    async def render(self, prompt: PromptInput) -> RenderedPrompt:
        images = len(prompt.images)
        if prompt.messages is not None:
            parts = []
            for m in prompt.messages:
                content = m.get("content") or ""
                if isinstance(content, list):
                    images += sum(1 for part in content if part.get("type") == "image_url")
                    content = " ".join(part["text"] for part in content if part.get("type") == "text")
                parts.append(f"<|{m['role']}|>{content}\n")
            text = "".join(parts) + "<|assistant|>"
        elif prompt.token_ids is not None:
            text = " ".join(f"t{token}" for token in prompt.token_ids)
        else:
            text = prompt.text or ""
        if images and self.image_tokens is None:
            raise InvalidImage(f"model {self.config.model_id} takes no images")
        tokens = len(text.split()) + images * (self.image_tokens or 0)
        return RenderedPrompt(text=text, prompt_tokens=tokens, images=images, payload=prompt)

    @staticmethod
    def tool_to_call(prompt: PromptInput) -> str | None:
        """The tool the fake calls: the named one, the first for required, for auto one whose name
        the last message mentions; none for tool_choice none."""
        if not prompt.tools or prompt.tool_choice == "none":
            return None
        names = [tool["function"]["name"] for tool in prompt.tools]
        if isinstance(prompt.tool_choice, dict):
            return str(prompt.tool_choice["function"]["name"])
        if prompt.tool_choice == "required":
            return names[0]
        last = str((prompt.messages or [{}])[-1].get("content") or "")
        return next((name for name in names if name in last), None)

    async def _tool_call(self, request: GenerationRequest, name: str) -> AsyncIterator[GenerationDelta]:
        """One call per choice: id and name first, then the arguments in two pieces."""
        named = isinstance(request.prompt.payload.tool_choice, dict)
        pieces = [ToolCallDelta(0, id=f"call_{name}_0", name=name), ToolCallDelta(0, arguments='{"query": '),
                  ToolCallDelta(0, arguments='"fake"}')]
        for index in range(request.sampling.n):
            for position, piece in enumerate(pieces, start=1):
                await asyncio.sleep(self.token_delay)
                last = position == len(pieces)
                yield GenerationDelta(
                    index=index, text="", completion_tokens=position, prompt_tokens=request.prompt.prompt_tokens,
                    finish_reason=("stop" if named else "tool_calls") if last else None, tool_calls=(piece,),
                )

    def answer(self, prompt: str) -> str:
        """The text a prompt gets: deterministic, and 'Paris' for the capital question."""
        if "capital of France" in prompt:
            return "The capital of France is Paris."
        return "fake answer to " + " ".join(prompt.split()[-3:])

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        if self.dead:
            raise EngineDead("fake engine is dead")
        sampling = request.sampling
        prompt_tokens = request.prompt.prompt_tokens
        if prompt_tokens + sampling.max_tokens > self.config.max_model_len:
            raise PromptTooLong(prompt_tokens, sampling.max_tokens, self.config.max_model_len)
        self.generations += 1
        self.request_ids.append(request.request_id)
        prompt = request.prompt.payload
        tool = self.tool_to_call(prompt) if isinstance(prompt, PromptInput) else None
        if tool is not None:
            async for delta in self._tool_call(request, tool):
                yield delta
            return
        if request.adapter is not None and request.adapter not in self.adapters:
            raise ValueError(f"no adapter {request.adapter!r}")
        text = self.answer(request.prompt.text)
        if request.adapter is not None:
            text = f"[{request.adapter}] {text}"  # an adapter changes the answer, as a real one does
        if sampling.json_schema is not None:
            text = json.dumps({"answer": text})
        words = text.split(" ")
        if sampling.ignore_eos:
            # As vLLM: no natural end, the generation runs to max_tokens.
            words = [words[i % len(words)] for i in range(sampling.max_tokens)]
        self.running.add(request.request_id)
        try:
            for index in range(sampling.n):
                emitted = 0
                for position, word in enumerate(words):
                    if emitted >= sampling.max_tokens:
                        break
                    await asyncio.sleep(self.token_delay)
                    if self.die_after_tokens is not None and emitted >= self.die_after_tokens:
                        self.dead = True
                    if self.dead:
                        raise EngineDead("fake engine died mid-request")
                    emitted += 1
                    piece = word if position == 0 else " " + word
                    stop_hit = any(s in piece for s in sampling.stop)
                    if stop_hit:
                        piece = piece.split(next(s for s in sampling.stop if s in piece))[0]
                    last = stop_hit or position == len(words) - 1 or emitted >= sampling.max_tokens
                    reason = None
                    if last:
                        natural_end = position == len(words) - 1 and not sampling.ignore_eos
                        reason = "stop" if stop_hit or natural_end else "length"
                    logprobs: tuple[TokenLogprob, ...] = ()
                    if sampling.logprobs is not None:
                        top = ((piece, -0.5),) * sampling.logprobs
                        logprobs = (TokenLogprob(token=piece, logprob=-0.5, top=top),)
                    yield GenerationDelta(
                        index=index,
                        text=piece,
                        completion_tokens=emitted,
                        prompt_tokens=prompt_tokens,
                        finish_reason=reason,
                        logprobs=logprobs,
                    )
                    if last:
                        break
        except (GeneratorExit, asyncio.CancelledError):
            self.aborted.append(request.request_id)
            raise
        finally:
            self.running.discard(request.request_id)

    async def tokenize(self, texts: list[str]) -> list[list[int]]:
        """A token per word: its length (so equal words are equal tokens)."""
        return [[len(word) for word in text.split()] or [0] for text in texts]

    async def embed(self, request_id: str, inputs: list[list[int]], dimensions: int | None) -> list[list[float]]:
        """A deterministic unit vector of 8 per input (dimensions below 8 cut it); one call is one batch."""
        if self.dead:
            raise EngineDead("fake engine is dead")
        if dimensions is not None and not 1 <= dimensions <= 8:
            raise ValueError(f"dimensions {dimensions} out of range 1..8")
        self.embed_batches.append(len(inputs))
        await asyncio.sleep(self.token_delay)  # a batch takes one token's time
        vectors = []
        for ids in inputs:
            raw = [float((sum(ids) * (i + 3) + len(ids) * (i + 1)) % 17 + 1) for i in range(dimensions or 8)]
            norm = sum(x * x for x in raw) ** 0.5
            vectors.append([x / norm for x in raw])
        return vectors

    async def rerank(self, request_id: str, query: str, documents: list[str]) -> list[PairScore]:
        """A pair's score is the share of its document's words that are in the query; a pair's tokens
        are the words of both. One call is one batch; a pair over max_model_len is a ValueError."""
        if self.dead:
            raise EngineDead("fake engine is dead")
        if self.config.kind != "rerank":
            raise ValueError(f"model {self.config.slot!r} is not a rerank model")
        query_words = query.lower().split()
        scores = []
        for index, document in enumerate(documents):
            words = document.lower().split()
            tokens = len(query_words) + len(words)
            if tokens > self.config.max_model_len:
                raise ValueError(
                    f"document {index} with the query has {tokens} tokens; the model takes at most "
                    f"{self.config.max_model_len}"
                )
            scores.append(PairScore(sum(w in query_words for w in words) / max(1, len(words)), tokens))
        self.rerank_batches.append(len(documents))
        await asyncio.sleep(self.token_delay)
        return scores

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def add_adapter(self, adapter: AdapterConfig) -> None:
        if not self.config.lora:
            raise ValueError("this slot was started without LoRA")
        self.adapters.add(adapter.name)

    async def remove_adapter(self, name: str) -> None:
        self.adapters.discard(name)

    def capacity(self) -> EngineCapacity:
        return EngineCapacity(self.max_num_seqs, self.kv_cache_tokens, self.config.max_model_len)

    def num_requests(self) -> int:
        return len(self.running)

    def kv_cache_usage(self) -> float | None:
        """The batch's share in use (requests beyond it queue): a stand-in that rises and falls with the load."""
        return min(len(self.running), self.max_num_seqs) / self.max_num_seqs if self.started else None

    def memory_footprint(self) -> int | None:
        return self.measured_bytes if self.started else None

    async def check_health(self) -> None:
        if self.dead:
            raise EngineDead("fake engine is dead")

    def on_dead(self, callback: Callable[[EngineDead], None]) -> None:
        self._on_dead = callback

    async def shutdown(self) -> None:
        self.shutdowns += 1
        self._on_dead = None
        await asyncio.sleep(self.shutdown_delay)
        self.started = False

    def kill(self) -> None:
        """Die now, and signal it (on the next turn of the loop, like vLLM's output handler)."""
        self.dead = True
        callback, self._on_dead = self._on_dead, None
        if callback is not None:
            asyncio.get_running_loop().call_soon(callback, EngineDead("fake engine was killed"))
