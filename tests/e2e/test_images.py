"""Images on the multimodal slot (the Idefics3 demo on a real vLLM engine), and prompt tokens that
match what `vllm serve`'s own renderer computes for the same messages."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from llm_service.config.frontend import DEMO_TOOL_TEMPLATE
from llm_service.config.settings import DEMO_MODEL_DIR, DEMO_MULTIMODAL_DIR

from .conftest import ServiceProcess, demo_model_path, free_port, wait_for

MM = "multimodal"
CLIENT_OPTIONS: dict[str, Any] = {"api_key": "unused", "timeout": 300.0, "max_retries": 0}


def data_url(color: tuple[int, int, int], size: tuple[int, int] = (96, 64)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


RED = data_url((255, 0, 0))
BLUE = data_url((0, 0, 255))


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url, "detail": "low"}}


def with_image(url: str, text: str = "What is in the picture?") -> list[dict[str, Any]]:
    return [{"role": "user", "content": [image_part(url), {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def sdk(service: ServiceProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=service.base_url + "/v1", **CLIENT_OPTIONS) as client:
        yield client


def generate(client: httpx.Client, **body: Any) -> httpx.Response:
    return client.post("/generate", json={"model": MM, "max_tokens": 4, "temperature": 0, **body})


def test_openai_sdk_image_request_counts_image_tokens(sdk: openai.OpenAI) -> None:
    text_only = sdk.chat.completions.create(
        model=MM, messages=[{"role": "user", "content": "What is in the picture?"}], max_tokens=4
    )
    seen = sdk.chat.completions.create(model=MM, messages=with_image(RED), max_tokens=4)
    assert isinstance(seen.choices[0].message.content, str)
    # One 96x64 image: a global tile and split tiles of 4 image tokens each, plus their markers.
    assert seen.usage.prompt_tokens >= text_only.usage.prompt_tokens + 8


def test_the_multimodal_demo_answers_text_with_the_real_weights(sdk: openai.OpenAI) -> None:
    answer = sdk.chat.completions.create(
        model=MM, messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=12, temperature=0,
    )
    assert "Paris" in (answer.choices[0].message.content or "")


async def test_async_sdk_streams_an_image_request(service: ServiceProcess) -> None:
    async with openai.AsyncOpenAI(base_url=service.base_url + "/v1", **CLIENT_OPTIONS) as client:
        stream = await client.chat.completions.create(
            model=MM, messages=with_image(BLUE), max_tokens=4, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens > 20


def test_generate_takes_content_parts_and_images_beside_a_prompt(client: httpx.Client) -> None:
    parts = generate(client, messages=with_image(RED))
    assert parts.status_code == 200, parts.text
    plain = generate(client, prompt="Describe it.")
    before = generate(client, prompt="Describe it.", images=[RED])
    placed = generate(client, prompt="Look: <image> Describe it.", images=[RED])
    for r in (plain, before, placed):
        assert r.status_code == 200, r.text
    image_tokens = before.json()["usage"]["prompt_tokens"] - plain.json()["usage"]["prompt_tokens"]
    assert image_tokens >= 8
    # The same image in place of the placeholder costs the same tokens (plus "Look:").
    assert placed.json()["usage"]["prompt_tokens"] >= before.json()["usage"]["prompt_tokens"]
    two_slots = generate(client, prompt="<image> and <image>", images=[RED])
    assert two_slots.status_code == 400 and "placeholder" in two_slots.json()["error"]["message"]


def test_different_images_never_share_a_cache_entry(client: httpx.Client) -> None:
    text = f"Describe the picture. ({uuid.uuid4().hex[:8]})"
    red = generate(client, messages=with_image(RED, text))
    blue = generate(client, messages=with_image(BLUE, text))
    red_again = generate(client, messages=with_image(RED, text))
    assert [r.status_code for r in (red, blue, red_again)] == [200, 200, 200]
    assert [r.headers["x-cache"][:3] for r in (red, blue, red_again)] == ["MIS", "MIS", "HIT"]


def _encoded(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64," + base64.b64encode(data).decode()


def _huge_png() -> str:
    buffer = io.BytesIO()
    Image.new("L", (5000, 4000)).save(buffer, "PNG")  # 20 M pixels, a few kB
    return _encoded(buffer.getvalue())


@pytest.mark.parametrize(
    ("messages", "model", "param", "fragment"),
    [
        (with_image("data:image/png;base64,@@@"), MM, "messages.0.content.0", "not valid base64"),
        (with_image(_encoded(b"hello")), MM, "messages.0.content.0", "cannot be decoded"),
        (with_image(_encoded(b"hello", "text/plain")), MM, "messages.0.content.0", "not image/*"),
        (with_image("https://example.com/cat.png"), MM, "messages.0.content.0", "not fetched"),
        (with_image("file:///etc/passwd"), MM, "messages.0.content.0", "scheme"),
        (with_image(_huge_png()), MM, "messages.0.content.0", "pixels"),
        ([{"role": "user", "content": [image_part(RED)] * 5}], MM, "messages.0.content.4", "at most 4"),
        (with_image(RED), "standard", "messages", "takes no images"),
    ],
)
def test_bad_images_are_400s_that_say_which(
    sdk: openai.OpenAI, messages: list[dict[str, Any]], model: str, param: str, fragment: str
) -> None:
    with pytest.raises(openai.BadRequestError) as error:
        sdk.chat.completions.create(model=model, messages=messages, max_tokens=2)  # type: ignore[arg-type]
    assert error.value.param == param
    assert fragment in error.value.message


# --- the same prompt tokens as `vllm serve` --------------------------------------------------
class RenderServer:
    """vLLM's GPU-less render server: `vllm serve`'s chat preprocessing, without an engine, set up
    as `vllm serve` would be for the slot (the demo's tool template and parser)."""

    def __init__(self, model: str, log_path: Path) -> None:
        self.model = model
        self.port = free_port()
        self.log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.launchers.render.entry", "--model", model,
             "--port", str(self.port), "--host", "127.0.0.1", "--max-model-len", "1024",
             "--chat-template", str(DEMO_TOOL_TEMPLATE), "--enable-auto-tool-choice", "--tool-call-parser", "hermes"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        wait_for(self._up, 300, "vLLM's render server")

    def _up(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"render server exited ({self.process.returncode})")
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def prompt_tokens(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> int:
        body: dict[str, Any] = {"model": self.model, "messages": messages}
        if tools:
            body.update(tools=tools, tool_choice="none")
        r = httpx.post(f"http://127.0.0.1:{self.port}/v1/chat/completions/render", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return len(r.json()["token_ids"])

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)
        self.log.close()


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CONVERSATIONS = {
    "one_question": [{"role": "user", "content": "What is the capital of France?"}],
    "system_and_turns": [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Capital of Italy?"},
        {"role": "assistant", "content": "Rome."},
        {"role": "user", "content": "And of Spain?"},
    ],
    "developer_and_text_parts": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]},
    ],
}


@pytest.mark.parametrize(("slot", "folder"), [("standard", DEMO_MODEL_DIR), (MM, DEMO_MULTIMODAL_DIR)])
def test_prompt_tokens_equal_vllm_serve(
    sdk: openai.OpenAI, slot: str, folder: Path, tmp_path: Path
) -> None:
    server = RenderServer(demo_model_path(folder), tmp_path / "render.log")
    try:
        conversations = dict(CONVERSATIONS)
        if slot == MM:
            conversations["image"] = with_image(RED)
            conversations["two_images"] = [
                {"role": "user", "content": [image_part(RED), {"type": "text", "text": "and"}, image_part(BLUE)]}
            ]
        for name, messages in conversations.items():
            tools = [WEATHER] if name == "one_question" else None
            for with_tools in (None, tools) if tools else (None,):
                extra: dict[str, Any] = {"tools": with_tools, "tool_choice": "none"} if with_tools else {}
                ours = sdk.chat.completions.create(model=slot, messages=messages, max_tokens=1, **extra)  # type: ignore[arg-type]
                assert ours.usage.prompt_tokens == server.prompt_tokens(messages, with_tools), (name, with_tools)
    finally:
        server.stop()
