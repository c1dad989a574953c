"""Images in requests: the checks and summaries (plain data), and their path through the service on fake engines."""

from __future__ import annotations

import base64
import io
from typing import Any

import httpx
import pytest
from PIL import Image

from llm_service.app import EngineBackend, create_app
from llm_service.cache.store import CachedResponse, CachePolicy
from llm_service.config.settings import ImageSettings, LLMSettings
from llm_service.engines.base import ImageLimits, SamplingOptions
from llm_service.errors import InvalidRequest
from llm_service.observability.metrics import Metrics
from llm_service.serving.coalesce import Coalescer
from llm_service.serving.generation import GenerationService, GenerationSpec
from llm_service.serving.images import check_image, find_images, inspect_images

from .conftest import GIB, FakeFactory, fake_settings

LIMITS = ImageLimits(max_images=2, max_bytes=4096, max_pixels=10_000, fetch_hosts=("images.example",))


def png(color: tuple[int, int, int] = (255, 0, 0), size: tuple[int, int] = (20, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def data_url(raw: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64," + base64.b64encode(raw).decode()


RED, BLUE = data_url(png((255, 0, 0))), data_url(png((0, 0, 255)))


def with_image(url: str, text: str = "What is this?") -> list[dict[str, Any]]:
    parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]
    return [{"role": "user", "content": parts}]


def test_a_data_url_image_is_summarised_by_hash_size_and_pixels() -> None:
    ref = check_image("images.0", RED, LIMITS)
    assert (ref.width, ref.height, ref.size) == (20, 10, len(png()))
    assert not ref.remote and ref.summary()["sha256"] != check_image("images.0", BLUE, LIMITS).sha256
    assert "base64" not in str(ref.summary())


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("data:image/png;base64,@@@", "not valid base64"),
        ("data:image/png,rawbytes", "not a base64 data: URL"),
        (data_url(b"not an image"), "cannot be decoded"),
        (data_url(png()[:40]), "cannot be decoded"),  # truncated
        (data_url(png(), "text/plain"), "not image/*"),
        (data_url(png(size=(200, 100))), "more than 10000"),  # 20 000 pixels
        (data_url(b"x" * 5000), "larger than 4096 bytes"),
        ("https://elsewhere.example/cat.png", "not in LLM_IMAGE_FETCH_HOSTS"),
        ("file:///etc/passwd", "scheme 'file'"),
        ("cat.png", "scheme ''"),
    ],
)
def test_bad_images_are_refused_with_their_location(url: str, fragment: str) -> None:
    with pytest.raises(InvalidRequest) as error:
        check_image("messages.2.content.1", url, LIMITS)
    assert error.value.param == "messages.2.content.1"
    assert fragment in error.value.message and "messages.2.content.1" in error.value.message


def test_urls_are_fetched_only_from_the_allowed_hosts() -> None:
    assert check_image("images.0", "https://images.example/cat.png", LIMITS).remote
    with pytest.raises(InvalidRequest, match="not fetched"):
        check_image("images.0", "https://images.example/cat.png", ImageLimits())


def test_content_parts_other_than_text_and_images_are_refused() -> None:
    messages = [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]
    with pytest.raises(InvalidRequest) as error:
        find_images(messages)
    assert error.value.param == "messages.0.content.0"


async def test_too_many_images_name_the_first_one_over_the_limit() -> None:
    with pytest.raises(InvalidRequest) as error:
        await inspect_images(with_image(RED), [RED, BLUE], LIMITS)
    assert error.value.param == "images.1" and "at most 2" in error.value.message


async def test_summarised_messages_keep_the_text_and_drop_the_bytes() -> None:
    images = await inspect_images(with_image(RED), [], LIMITS)
    (message,) = images.summarised_messages or []
    assert message["content"][1] == {"type": "text", "text": "What is this?"}
    assert message["content"][0]["type"] == "image" and "base64" not in str(message)
    assert images.cacheable
    remote = await inspect_images(with_image("https://images.example/a.png"), [], LIMITS)
    assert not remote.cacheable


def test_fetch_hosts_setting_is_a_comma_list_of_plain_host_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_IMAGE_FETCH_HOSTS", "Images.Example, cdn.example")
    assert ImageSettings().fetch_hosts == ["images.example", "cdn.example"]
    monkeypatch.setenv("LLM_IMAGE_FETCH_HOSTS", "https://images.example/")
    with pytest.raises(ValueError, match="host names only"):
        ImageSettings()


# --- through the service, on fake engines (the multimodal one costs 16 tokens per image) --------
@pytest.fixture
async def image_app() -> Any:
    factory = FakeFactory()
    factory.per_slot["multimodal"] = {"image_tokens": 16}
    app = create_app(fake_settings(), EngineBackend(factory, "cpu", 8 * GIB))
    async with app.router.lifespan_context(app):
        await app.state.resources.registry.wait_preloaded()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


async def test_generate_counts_image_tokens_in_usage(image_app: httpx.AsyncClient) -> None:
    plain = await image_app.post("/generate", json={"model": "multimodal", "prompt": "Describe it."})
    beside = await image_app.post("/generate", json={"model": "multimodal", "prompt": "Describe it.", "images": [RED]})
    parts = await image_app.post("/generate", json={"model": "multimodal", "messages": with_image(RED)})
    assert [r.status_code for r in (plain, beside, parts)] == [200, 200, 200], parts.text
    assert beside.json()["usage"]["prompt_tokens"] == plain.json()["usage"]["prompt_tokens"] + 16


async def test_images_count_against_the_context(image_app: httpx.AsyncClient) -> None:
    # 512 tokens of context: 20 images would not fit even if the count allowed them.
    r = await image_app.post(
        "/generate", json={"model": "multimodal", "prompt": "x", "images": [RED] * 4, "max_tokens": 460}
    )
    assert r.status_code == 400 and "context length" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        ({"model": "standard", "prompt": "Describe it.", "images": [RED]}, "images", "takes no images"),
        ({"model": "multimodal", "messages": [{"role": "user", "content": "Hi"}], "images": [RED]}, None,
         "go with 'prompt'"),
        ({"model": "multimodal", "prompt": "x", "images": ["data:image/png;base64,@@"]}, "images.0", "base64"),
        ({"model": "multimodal", "messages": [{"role": "user", "content": [{"type": "video", "url": "x"}]}]},
         None, "'video'"),
    ],
)
async def test_bad_image_requests_are_400s(
    image_app: httpx.AsyncClient, body: dict[str, Any], param: str | None, fragment: str | None
) -> None:
    r = await image_app.post("/generate", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    if param is not None:
        assert error["param"] == param
    if fragment is not None:
        assert fragment in error["message"]


class MemoryCache:
    """An in-process response cache (the Redis one is tested against a real server elsewhere)."""

    def __init__(self) -> None:
        self.entries: dict[str, CachedResponse] = {}

    async def get(self, key: str, model: str = "") -> CachedResponse | None:
        return self.entries.get(key)

    def peek(self, key: str, model: str = "") -> CachedResponse | None:
        return None

    async def set(self, key: str, entry: CachedResponse, ttl: int, model: str = "") -> bool:
        self.entries[key] = entry
        return True

    async def health(self) -> dict[str, Any]:
        return {"status": "up"}

    async def close(self) -> None:
        return None


class RecordingTracer:
    def __init__(self) -> None:
        self.inputs: list[Any] = []

    def start(self, **fields: Any) -> Any:
        from llm_service.observability.tracing import NO_TRACE

        self.inputs.append(fields["input"])
        return NO_TRACE

    def health(self) -> dict[str, Any]:
        return {}

    async def close(self) -> None:
        return None


async def test_images_key_the_cache_by_content_and_traces_never_hold_their_bytes(make_registry: Any) -> None:
    factory = FakeFactory()
    factory.per_slot["multimodal"] = {"image_tokens": 16}
    registry, _ = make_registry(factory=factory)
    cache, tracer, metrics = MemoryCache(), RecordingTracer(), Metrics()
    coalescer = Coalescer(CachePolicy(LLMSettings(cache_enabled=True)), cache, metrics)
    service = GenerationService(registry, metrics, 16, coalescer=coalescer, tracer=tracer)  # type: ignore[arg-type]
    greedy = SamplingOptions(max_tokens=8, temperature=0)

    async def ask(messages: list[dict[str, Any]] | None = None, images: tuple[str, ...] = ()) -> bool:
        spec = GenerationSpec("r", "multimodal", greedy, prompt=None if messages else "Describe.",
                              messages=messages, images=images)
        return (await service.complete(spec)).cached

    try:
        assert [await ask(with_image(RED)), await ask(with_image(BLUE)), await ask(with_image(RED))] == [
            False, False, True
        ]
        assert [await ask(images=(RED,)), await ask(images=(BLUE,)), await ask(images=(BLUE,))] == [
            False, False, True
        ]
        assert len(cache.entries) == 4
        assert all("base64" not in str(recorded) for recorded in tracer.inputs)
        assert tracer.inputs[-1]["images"][0]["bytes"] == len(png((0, 0, 255)))
    finally:
        await coalescer.close()
        await registry.close()


def test_a_prompt_too_long_by_itself_says_so() -> None:
    from llm_service.engines.base import PromptTooLong

    assert str(PromptTooLong(2049, None, 2048)) == (
        "prompt (more than 2048 tokens) exceeds the model's context length of 2048 tokens"
    )
