"""LangChain's ChatOpenAI pointed at the service's OpenAI-compatible API (real engine, demo model)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from langchain_openai import ChatOpenAI

if TYPE_CHECKING:
    from tests.e2e.conftest import ServiceProcess


def test_chat_openai_invoke_and_stream(service: ServiceProcess) -> None:
    chat = ChatOpenAI(
        model="standard",
        base_url=service.base_url + "/v1",
        api_key="unused",
        temperature=0,
        max_tokens=24,
        max_retries=0,
        timeout=300,
        default_headers={"Cache-Control": "no-cache"},
    )
    message = chat.invoke("What is the capital of France?")
    assert "Paris" in message.content
    assert message.usage_metadata is not None and message.usage_metadata["output_tokens"] > 0
    chunks = list(chat.stream("What is the capital of France?"))
    assert len(chunks) > 1
    assert "".join(str(chunk.content) for chunk in chunks) == message.content
