"""What vLLM's process-wide caches keep of a stopped engine, and that an engine's shutdown lets it go.

The soak (BENCHMARKS.md) saw the API process grow by about 40 MiB at every engine load: vLLM's
`supports_kw` cache, asked about each engine's `apply_chat_template` (a function vLLM defines anew
per engine, whose closure holds that engine's tokenizers), kept them after the engine stopped."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Callable

from vllm.utils.func_utils import supports_kw

from llm_service.engines.vllm.engine import _stopped, freeze_heap, release_engine_caches


class Tokenizer:
    """Stands for an engine's tokenizers (its vocabularies: tens of MiB)."""


def engine_chat_template(tokenizer: Tokenizer) -> Callable[..., object]:
    """As vLLM's tokenizer pool builds one per engine: a new function closing over the tokenizer."""

    def apply_chat_template(conversation: object, add_generation_prompt: bool = False) -> object:
        return tokenizer

    return apply_chat_template


def test_vllms_supports_kw_keeps_a_stopped_engines_tokenizers_and_release_lets_them_go() -> None:
    tokenizer = Tokenizer()
    alive = weakref.ref(tokenizer)
    # What vLLM's renderer asks for every chat request (renderers/hf.py, resolve_chat_template_kwargs).
    assert supports_kw(engine_chat_template(tokenizer), "add_generation_prompt", allow_var_kwargs=False)
    del tokenizer
    gc.collect()
    assert alive() is not None  # the installed vLLM still caches by the function: the workaround is needed
    release_engine_caches()
    gc.collect()
    assert alive() is None


class CyclicLLM:
    """Stands for an AsyncLLM: its objects refer to each other, so only a collection frees them."""

    def __init__(self) -> None:
        self.me = self
        self.stopped = False

    def shutdown(self) -> None:
        self.stopped = True


async def test_a_stopped_engine_held_in_reference_cycles_is_freed_right_after_it_stops() -> None:
    async def stop_one() -> weakref.ref[CyclicLLM]:
        llm = CyclicLLM()
        freeze_heap()  # as after every engine's start: the engine's objects are frozen with the heap
        await _stopped(llm)  # type: ignore[arg-type]
        assert llm.stopped
        return weakref.ref(llm)

    gc.collect()
    gc.disable()  # no automatic collection: only the service's own frees the cycle
    try:
        alive = await stop_one()
        assert alive() is not None  # unreachable, but in a cycle
        await asyncio.sleep(0)  # the collection runs once the callers' references are gone
        assert alive() is None
        assert gc.get_freeze_count() > 0  # the heap is frozen again after the collection
    finally:
        gc.unfreeze()
        gc.enable()


def test_the_frozen_heap_is_left_out_of_full_collections() -> None:
    try:
        freeze_heap()
        # What an automatic collection of the oldest generation walks: only objects made since.
        assert sum(len(gc.get_objects(generation)) for generation in range(3)) < 0.05 * gc.get_freeze_count()
    finally:
        gc.unfreeze()
