"""ignore_eos (as vLLM): every surface passes it to the engine, which then runs to max_tokens."""

from __future__ import annotations

import httpx
import pytest

from .conftest import FakeFactory

PROMPT = "What is the capital of France?"


@pytest.mark.parametrize("ignore_eos", [False, True])
async def test_generate_ignore_eos_runs_to_max_tokens(
    fake_app: tuple[httpx.AsyncClient, FakeFactory], ignore_eos: bool
) -> None:
    client, _ = fake_app
    body = {"prompt": PROMPT, "max_tokens": 20, "temperature": 0, "ignore_eos": ignore_eos}
    r = await client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    # The fake's answer has 6 words: it ends there unless the end of sequence is ignored.
    assert usage["completion_tokens"] == (20 if ignore_eos else 6)
    assert r.json()["finish_reason"] == ("length" if ignore_eos else "stop")


async def test_openai_surfaces_pass_ignore_eos(fake_app: tuple[httpx.AsyncClient, FakeFactory]) -> None:
    client, _ = fake_app
    common = {"model": "standard", "max_tokens": 15, "temperature": 0, "ignore_eos": True}
    chat = await client.post("/v1/chat/completions", json={**common, "messages": [{"role": "user", "content": PROMPT}]})
    assert chat.status_code == 200, chat.text
    assert chat.json()["usage"]["completion_tokens"] == 15
    text = await client.post("/v1/completions", json={**common, "prompt": PROMPT})
    assert text.status_code == 200, text.text
    assert text.json()["usage"]["completion_tokens"] == 15
    assert text.json()["choices"][0]["finish_reason"] == "length"
