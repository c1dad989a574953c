"""A small deterministic engine for fast unit tests of everything around the real one."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from llm_service.engines.base import (
    EngineCapacity,
    EngineConfig,
    EngineDead,
    GenerationDelta,
    GenerationRequest,
    PromptTooLong,
    TokenLogprob,
)


class FakeEngine:
    """Echoes a canned answer word by word; counts starts, generations and shutdowns.

    `start_delay`, `shutdown_delay` and `token_delay` stretch time so tests can overlap requests;
    `max_num_seqs` and `kv_cache_tokens` are the capacity it reports;
    `fail_start` makes start() raise; `die_after_tokens` or `kill()` make it behave like a
    dead engine (kill() also signals its death, as vLLM's engine-dead notification does).
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
        max_num_seqs: int = 8,
        kv_cache_tokens: int = 65536,
    ) -> None:
        self.config = config
        self.start_delay = start_delay
        self.shutdown_delay = shutdown_delay
        self.token_delay = token_delay
        self.fail_start = fail_start
        self.die_after_tokens = die_after_tokens
        self.started = False
        self.dead = False
        self.shutdowns = 0
        self.generations = 0
        self.aborted: list[str] = []
        self.max_num_seqs = max_num_seqs
        self.kv_cache_tokens = kv_cache_tokens
        self.running: set[str] = set()
        self.request_ids: list[str] = []
        self._on_dead: Callable[[EngineDead], None] | None = None

    async def start(self) -> None:
        await asyncio.sleep(self.start_delay)
        if self.fail_start is not None:
            raise self.fail_start
        self.started = True

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        return "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages) + "<|assistant|>"

    def count_tokens(self, prompt: str) -> int:
        return len(prompt.split())

    def answer(self, prompt: str) -> str:
        """The text a prompt gets: deterministic, and 'Paris' for the capital question."""
        if "capital of France" in prompt:
            return "The capital of France is Paris."
        return "fake answer to " + " ".join(prompt.split()[-3:])

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        if self.dead:
            raise EngineDead("fake engine is dead")
        sampling = request.sampling
        prompt_tokens = self.count_tokens(request.prompt)
        if prompt_tokens + sampling.max_tokens > self.config.max_model_len:
            raise PromptTooLong(prompt_tokens, sampling.max_tokens, self.config.max_model_len)
        self.generations += 1
        self.request_ids.append(request.request_id)
        text = self.answer(request.prompt)
        if sampling.json_schema is not None:
            text = json.dumps({"answer": text})
        words = text.split(" ")
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
                        reason = "stop" if stop_hit or position == len(words) - 1 else "length"
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

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def capacity(self) -> EngineCapacity:
        return EngineCapacity(self.max_num_seqs, self.kv_cache_tokens, self.config.max_model_len)

    def num_requests(self) -> int:
        return len(self.running)

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
