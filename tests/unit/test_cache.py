"""The cache's pure parts: which requests are cacheable, the key, the entry, the circuit breaker."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from llm_service.cache.controls import CacheControl, CacheOptions
from llm_service.cache.store import (
    SCHEMA_VERSION,
    CachedResponse,
    CachePolicy,
    CircuitBreaker,
    cache_key,
    reproducible,
)
from llm_service.config.settings import LLMSettings
from llm_service.engines.base import EngineConfig, GenerationDelta, SamplingOptions, TokenLogprob
from llm_service.serving.generation import GenerationResult

CONFIG = EngineConfig(
    slot="standard",
    model_id="org/model",
    max_model_len=2048,
    memory_share=0.3,
    device="cpu",
    enforce_eager=True,
)
GREEDY = SamplingOptions(max_tokens=32, temperature=0.0)
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def entry_from_deltas(deltas: list[GenerationDelta], model_id: str, prompt: str) -> CachedResponse | None:
    """Fold deltas as a GenerationStream does, then make the entry."""
    result = GenerationResult("req", "standard", model_id, prompt, [])
    for delta in deltas:
        result.add(delta)
    return CachedResponse.from_result(result)


def key(config: EngineConfig = CONFIG, sampling: SamplingOptions = GREEDY, **kw: Any) -> str:
    prompt = kw.pop("prompt", None)
    messages = kw.pop("messages", MESSAGES if prompt is None else None)
    return cache_key(
        kw.pop("namespace", "ns"), config, sampling, prompt, messages, kw.pop("default_max_tokens", 256)
    )


def test_key_is_stable_and_namespaced() -> None:
    assert key() == key()
    assert key().startswith(f"ns:response:v{SCHEMA_VERSION}:standard:")
    assert key(namespace="other") != key()
    # 0 and 0.0 are the same temperature.
    assert key(sampling=dataclasses.replace(GREEDY, temperature=0)) == key()


@pytest.mark.parametrize(
    "change",
    [
        {"config": dataclasses.replace(CONFIG, slot="longctx")},
        {"config": dataclasses.replace(CONFIG, model_id="org/other")},
        {"config": dataclasses.replace(CONFIG, revision="abc123")},
        {"config": dataclasses.replace(CONFIG, max_model_len=4096)},
        {"config": dataclasses.replace(CONFIG, extra_args={"dtype": "float32"})},
        {"default_max_tokens": 128},
        {"prompt": "What is the capital of France?"},
        {"messages": [{"role": "user", "content": "What is the capital of Spain?"}]},
        {"messages": [{"role": "system", "content": "Be brief."}, *MESSAGES]},
        {"sampling": dataclasses.replace(GREEDY, max_tokens=33)},
        {"sampling": dataclasses.replace(GREEDY, max_tokens=0)},
        {"sampling": dataclasses.replace(GREEDY, top_p=0.9)},
        {"sampling": dataclasses.replace(GREEDY, top_k=5)},
        {"sampling": dataclasses.replace(GREEDY, stop=("\n",))},
        {"sampling": dataclasses.replace(GREEDY, seed=1)},
        {"sampling": dataclasses.replace(GREEDY, presence_penalty=0.5)},
        {"sampling": dataclasses.replace(GREEDY, frequency_penalty=0.5)},
        {"sampling": dataclasses.replace(GREEDY, n=2)},
        {"sampling": dataclasses.replace(GREEDY, logprobs=0)},
        {"sampling": dataclasses.replace(GREEDY, json_schema={})},
        {"sampling": dataclasses.replace(GREEDY, temperature=0.5, seed=3)},
    ],
)
def test_anything_that_changes_the_output_changes_the_key(change: dict[str, Any]) -> None:
    assert key(**change) != key()


def test_every_sampling_field_is_part_of_the_key() -> None:
    """A field added to SamplingOptions later is covered without touching the key code."""
    base = key()
    for f in dataclasses.fields(SamplingOptions):
        value = getattr(GREEDY, f.name)
        other = {int: 7, float: 0.25, tuple: ("x",)}.get(type(value), {"k": 1} if value is None else 1)
        assert key(sampling=dataclasses.replace(GREEDY, **{f.name: other})) != base, f.name


def policy(**llm: Any) -> CachePolicy:
    return CachePolicy(LLMSettings(**llm))


def test_reproducible_requests_are_cacheable_others_bypass() -> None:
    p = policy()
    assert reproducible(GREEDY) and reproducible(SamplingOptions(max_tokens=8, temperature=0.9, seed=4))
    assert not reproducible(SamplingOptions(max_tokens=8, temperature=0.9))
    plan = p.plan(CacheControl(), GREEDY, None, MESSAGES, CONFIG)
    assert plan is not None and plan.read and plan.store and plan.ttl == 3600
    assert (
        p.plan(CacheControl(), SamplingOptions(max_tokens=8, temperature=0.9), None, MESSAGES, CONFIG) is None
    )
    seeded = SamplingOptions(max_tokens=8, temperature=0.9, seed=4)
    assert p.plan(CacheControl(), seeded, None, MESSAGES, CONFIG) is not None


def test_per_request_controls() -> None:
    p = policy(cache_ttl_seconds=60)
    hot = SamplingOptions(max_tokens=8, temperature=0.9)
    forced = p.plan(CacheControl.parse(None, CacheOptions(use_cache=True)), hot, None, MESSAGES, CONFIG)
    assert forced is not None and forced.read and forced.store
    assert (
        p.plan(CacheControl.parse(None, CacheOptions(use_cache=False)), GREEDY, None, MESSAGES, CONFIG)
        is None
    )
    no_cache = p.plan(CacheControl.parse("no-cache"), GREEDY, None, MESSAGES, CONFIG)
    assert no_cache is not None and not no_cache.read and no_cache.store
    no_store = p.plan(CacheControl.parse(None, CacheOptions(no_store=True)), GREEDY, None, MESSAGES, CONFIG)
    assert no_store is not None and no_store.read and not no_store.store
    assert p.plan(CacheControl.parse("no-cache, no-store"), GREEDY, None, MESSAGES, CONFIG) is None
    assert p.plan(CacheControl.parse("max-age=90"), GREEDY, None, MESSAGES, CONFIG).ttl == 90  # type: ignore[union-attr]
    assert p.plan(CacheControl.parse("s-maxage=91"), GREEDY, None, MESSAGES, CONFIG).ttl == 91  # type: ignore[union-attr]
    body_ttl = p.plan(CacheControl.parse("max-age=90", CacheOptions(ttl=5)), GREEDY, None, MESSAGES, CONFIG)
    assert body_ttl is not None and body_ttl.ttl == 5
    assert p.plan(CacheControl(), GREEDY, None, MESSAGES, CONFIG).ttl == 60  # type: ignore[union-attr]


def test_disabled_cache_plans_nothing() -> None:
    assert policy(cache_enabled=False).plan(CacheControl(), GREEDY, None, MESSAGES, CONFIG) is None


def deltas_of(
    text_by_choice: dict[int, list[str]], finish: str = "stop", logprobs: bool = False
) -> list[GenerationDelta]:
    out = []
    for index, pieces in text_by_choice.items():
        for n, piece in enumerate(pieces, 1):
            lp = (TokenLogprob(piece, -0.25, ((piece, -0.25), ("z", -3.0))),) if logprobs else ()
            out.append(GenerationDelta(index, piece, n, 11, finish if n == len(pieces) else None, lp))
    return out


def test_entry_round_trips_choices_and_logprobs() -> None:
    deltas = deltas_of({0: ["The", " capital", " is", " Paris."], 1: ["Paris", "."]}, logprobs=True)
    entry = entry_from_deltas(deltas, "org/model", "<prompt>")
    assert entry is not None
    decoded = CachedResponse.decode(entry.encode())
    assert decoded == entry
    assert [c.text for c in decoded.choices] == ["The capital is Paris.", "Paris."]
    assert decoded.choices[0].completion_tokens == 4 and decoded.prompt_tokens == 11
    assert decoded.choices[1].logprobs[1] == TokenLogprob(".", -0.25, ((".", -0.25), ("z", -3.0)))
    replay = decoded.deltas()
    assert [(d.index, d.text, d.finish_reason, d.completion_tokens) for d in replay] == [
        (0, "The capital is Paris.", "stop", 4),
        (1, "Paris.", "stop", 2),
    ]
    assert len(replay[0].logprobs) == 4


def test_unfinished_or_aborted_generations_are_not_entries() -> None:
    assert entry_from_deltas([], "m", "p") is None
    unfinished = deltas_of({0: ["a", "b"]})[:-1]
    assert entry_from_deltas(unfinished, "m", "p") is None
    assert entry_from_deltas(deltas_of({0: ["a"]}, finish="abort"), "m", "p") is None
    assert entry_from_deltas(deltas_of({1: ["a"]}), "m", "p") is None  # choice 0 missing


@pytest.mark.parametrize(
    "data",
    [
        b"not json",
        b"\xff\xfe",
        json.dumps({"v": SCHEMA_VERSION + 1, "choices": []}).encode(),
        json.dumps({"v": SCHEMA_VERSION, "model_id": "m"}).encode(),
        json.dumps([1, 2]).encode(),
    ],
)
def test_unreadable_entries_raise_value_error(data: bytes) -> None:
    with pytest.raises(ValueError):
        CachedResponse.decode(data)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_repeated_failures_and_probes_after_the_cooldown() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failures=3, cooldown=5.0, clock=clock)
    assert breaker.allow() and breaker.state == "closed"
    assert breaker.failure() is False and breaker.failure() is False
    breaker.success()  # a success resets the count
    assert breaker.failure() is False and breaker.failure() is False
    assert breaker.failure() is True  # the third in a row opens it
    assert breaker.state == "open" and not breaker.allow()
    clock.now += 4.9
    assert not breaker.allow()
    clock.now += 0.2
    assert breaker.state == "half-open"
    assert breaker.allow()  # one probe
    assert not breaker.allow()  # and only one
    assert breaker.failure() is False  # the probe failed: open again, not a new opening
    assert not breaker.allow() and breaker.state == "open"
    clock.now += 5.0
    assert breaker.allow()
    breaker.success()
    assert breaker.state == "closed" and breaker.allow() and breaker.allow()


def test_a_lost_probe_expires() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failures=1, cooldown=2.0, clock=clock)
    breaker.failure()
    clock.now += 2.0
    assert breaker.allow()  # the probe is cancelled and never reports
    clock.now += 1.0
    assert not breaker.allow()
    clock.now += 1.0
    assert breaker.allow()
