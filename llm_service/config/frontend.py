"""Per-slot front-end options from the settings: image limits, chat template and tool-call parser."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from llm_service.config.settings import PRODUCTION_MODELS, ChatSettings, ImageSettings, Settings, SlotSettings
from llm_service.config.slots import BUILTIN_SLOTS
from llm_service.engines.base import ChatConfig, EngineConfig, ImageLimits

# vLLM's tool-call parsers for the production models (`vllm serve --tool-call-parser`).
# Llama 3.1 and Mistral-NeMo carry tool-capable chat templates; gemma-3's template has none, so its
# slot also needs a chat_template (LLM_CHAT_TEMPLATE_MULTIMODAL; vLLM ships tool_chat_template_gemma3_pythonic.jinja
# in its examples) for `auto`; `required` and named calls work without one (structured output).
PRODUCTION_TOOL_PARSERS: dict[str, str] = {
    PRODUCTION_MODELS["standard"]: "llama3_json",
    PRODUCTION_MODELS["longctx"]: "mistral",
    PRODUCTION_MODELS["multimodal"]: "pythonic",
}
# The demo models' own template has no tools; this one renders the same without tools and
# Hermes-style <tool_call> JSON with them.
DEMO_TOOL_TEMPLATE = Path(__file__).resolve().parents[1] / "chat_templates" / "chatml_tools.jinja"
DEMO_TOOL_PARSER = "hermes"
NO_TOOLS = "none"


def image_limits(images: ImageSettings) -> ImageLimits:
    return ImageLimits(
        max_images=images.max_per_request,
        max_bytes=images.max_bytes,
        max_pixels=images.max_pixels,
        fetch_hosts=tuple(images.fetch_hosts),
        fetch_timeout_seconds=images.fetch_timeout_seconds,
    )


def _is_demo(model_id: str) -> bool:
    path = Path(model_id)
    return any(path.resolve() == slot.demo_model.resolve() for slot in BUILTIN_SLOTS if slot.kind == "generate")


def chat_config(chat: ChatSettings, slot: SlotSettings, model_id: str) -> ChatConfig:
    """The slot's template and parser, else the defaults for the slot's model (none for an unknown one)."""
    template = slot.chat_template
    parser = slot.tool_parser
    if _is_demo(model_id):
        template = template or DEMO_TOOL_TEMPLATE
        parser = parser or DEMO_TOOL_PARSER
    parser = parser or PRODUCTION_TOOL_PARSERS.get(model_id)
    return ChatConfig(
        chat_template=str(template) if template else None,
        tool_parser=None if parser in (None, NO_TOOLS) else parser,
        tool_strict_level=chat.tool_strict_level,
    )


def with_frontend(slots: list[tuple[EngineConfig, bool]], settings: Settings) -> list[tuple[EngineConfig, bool]]:
    """The slots' configs with the front-end options of `settings` filled in."""
    limits = image_limits(settings.images)
    return [
        (
            dataclasses.replace(
                config,
                images=_slot_images(config, limits),
                chat=chat_config(settings.chat, settings.llm.slot(config.slot), config.model_id)
                if config.kind == "generate"
                else ChatConfig(),  # a retrieval slot renders no chat
            ),
            pinned,
        )
        for config, pinned in slots
    ]


def _slot_images(config: EngineConfig, limits: ImageLimits) -> ImageLimits:
    """No images on a slot whose engine starts text-only (LLM_MULTIMODAL_IMAGES=false)."""
    mm_limit = config.extra_args.get("limit_mm_per_prompt")
    if isinstance(mm_limit, dict) and mm_limit.get("image") == 0:
        return dataclasses.replace(limits, max_images=0)
    return limits
