"""Prompts to vLLM engine inputs through vLLM's own renderer: the chat path `vllm serve` runs.

Chat messages go through vLLM's OnlineRenderer (chat template or Mistral tokenizer, content-format
detection, OpenAI content parts, media fetching, the multimodal processor); text and token-id
prompts through the renderer's completion path. Templating, tokenization and image processing
run in the renderer's worker threads, so rendering a long prompt never blocks the event loop, and
the engine receives the tokens computed here: a prompt is tokenized once.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import aiohttp
from vllm import envs
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.exceptions import VLLMClientError, VLLMValidationError
from vllm.inputs import EngineInput
from vllm.model_executor.model_loader.utils import get_model_cls
from vllm.multimodal.media import MEDIA_CONNECTOR_REGISTRY, MediaConnector
from vllm.renderers.chat_utils import load_chat_template
from vllm.renderers.inputs.preprocess import parse_model_prompt
from vllm.renderers.online_renderer import OnlineRenderer
from vllm.v1.engine.async_llm import AsyncLLM

from llm_service.engines.base import EngineConfig, InvalidImage, PromptInput, PromptTooLong, RenderedPrompt
from llm_service.engines.vllm.tools import VLLMPrompt

# vLLM fetches any host when its allow-list is empty; with fetching off this name (a reserved,
# never-resolving TLD) is the only host it would accept, so vLLM itself refuses every URL too.
NO_FETCH_HOST = "image-fetching-disabled.invalid"
IMAGE = "image"


def media_engine_args(config: EngineConfig) -> dict[str, Any]:
    """Engine arguments that bound what vLLM's media fetching may do for this slot."""
    return {"allowed_media_domains": list(config.images.fetch_hosts) or [NO_FETCH_HOST]}


def media_env(config: EngineConfig) -> dict[str, str]:
    """vLLM's process-wide media settings (read by the media connector in this process)."""
    limits = config.images
    return {
        "VLLM_MEDIA_URL_ALLOW_REDIRECTS": "0",  # a redirect could lead past the host allow-list
        "VLLM_MAX_MEDIA_DOWNLOAD_SIZE_MB": str(max(1, -(-limits.max_bytes // (1024 * 1024)))),
        "VLLM_IMAGE_FETCH_TIMEOUT": str(limits.fetch_timeout_seconds),
        "VLLM_MAX_IMAGE_PIXELS": str(limits.max_pixels),
    }


def has_images(prompt: PromptInput) -> bool:
    if prompt.images:
        return True
    return any(
        isinstance(part, dict) and part.get("type") != "text"
        for message in prompt.messages or ()
        if isinstance(message.get("content"), list)
        for part in message["content"]
    )


class PromptRenderer:
    """Renders one slot's prompts with its AsyncLLM's renderer."""

    def __init__(self, llm: AsyncLLM, config: EngineConfig) -> None:
        self._llm = llm
        self._config = config
        self._model_config = llm.model_config
        tool_parser = config.chat.tool_parser
        # What `vllm serve --chat-template T --enable-auto-tool-choice --tool-call-parser P` builds
        # around the same renderer; an unknown parser name fails here, so the slot fails to load.
        self._online = OnlineRenderer(
            llm.model_config,
            llm.renderer,
            request_logger=None,
            chat_template=load_chat_template(config.chat.chat_template),
            chat_template_content_format="auto",
            enable_auto_tools=tool_parser is not None,
            tool_parser=tool_parser,
            tool_strict_level=config.chat.tool_strict_level,
        )
        self.takes_images = llm.model_config.is_multimodal_model

    async def render(self, prompt: PromptInput) -> RenderedPrompt:
        """Render and tokenize once; ValueError (InvalidImage) for what the model cannot take."""
        if has_images(prompt) and not self.takes_images:
            raise InvalidImage(
                f"the model of slot {self._config.slot} ({self._config.model_id}) takes no images"
            )
        if prompt.tools and self._online.parser is None and prompt.tool_choice != "none":
            raise ValueError(
                f"slot {self._config.slot} reads no tool calls: set LLM_TOOL_PARSER_{self._config.slot.upper()}"
            )
        try:
            if prompt.messages is not None:
                rendered = await self._chat(prompt)
            elif prompt.token_ids is not None:
                rendered = VLLMPrompt(await self._token_ids(list(prompt.token_ids)))
            else:
                rendered = VLLMPrompt(await self._text(prompt.text or "", prompt.images))
        except InvalidImage:
            raise
        except (ValueError, VLLMClientError) as exc:
            raise _as_value_error(exc, prompt, self._model_config.max_model_len) from exc
        except (OSError, TimeoutError, aiohttp.ClientError) as exc:
            # Only media fetching does I/O while rendering.
            raise InvalidImage(f"an image could not be fetched: {type(exc).__name__}: {exc}") from exc
        fields: dict[str, Any] = dict(rendered.engine_input)
        token_ids = fields["prompt_token_ids"]
        placeholders = fields.get("mm_placeholders") or {}
        return RenderedPrompt(
            text=str(fields.get("prompt") or ""),
            prompt_tokens=len(token_ids),
            images=len(placeholders.get(IMAGE, ())),
            payload=rendered,
        )

    async def _chat(self, prompt: PromptInput) -> VLLMPrompt:
        fields: dict[str, Any] = {"messages": prompt.messages, "model": self._config.slot}
        if prompt.tools:
            fields.update(tools=prompt.tools, tool_choice=prompt.tool_choice or "auto")
            if prompt.parallel_tool_calls is not None:
                fields["parallel_tool_calls"] = prompt.parallel_tool_calls
        # vLLM's own request model: its validators check tools and tool_choice as `vllm serve` does.
        request = ChatCompletionRequest.model_validate(fields)
        rendered = await self._online.render_chat(request)
        if isinstance(rendered, ErrorResponse):
            raise ValueError(rendered.error.message)
        _, (engine_input,) = rendered
        # render_chat let the tool parser adjust `request` (structured output for a forced call).
        return VLLMPrompt(
            engine_input,
            chat=request,
            parser_cls=self._online.parser,
            chat_template_kwargs=self._online.effective_chat_template_kwargs(request),
        )

    def _tok_params(self, add_special_tokens: bool, detokenize: bool = False) -> Any:
        return dataclasses.replace(
            self._llm.renderer.default_cmpl_tok_params,
            add_special_tokens=add_special_tokens,
            needs_detokenization=detokenize,
        )

    async def _render_cmpl(self, prompt: Any, tok_params: Any) -> EngineInput:
        (engine_input,) = await self._llm.renderer.render_cmpl_async(
            [parse_model_prompt(self._model_config, prompt)], tok_params
        )
        return engine_input

    async def _token_ids(self, token_ids: list[int]) -> EngineInput:
        self._llm.renderer.validate_token_ids(token_ids, parameter="prompt")
        # The text is only for echo; the renderer decodes it in its worker threads.
        return await self._render_cmpl({"prompt_token_ids": token_ids}, self._tok_params(False, detokenize=True))

    async def _text(self, text: str, images: tuple[str, ...]) -> EngineInput:
        # A chat-rendered prompt already starts with BOS and a second one degrades output (vLLM's
        # chat path skips special tokens too); other text gets the tokenizer's special tokens.
        bos = getattr(self._llm.renderer.tokenizer, "bos_token", None)
        tok_params = self._tok_params(add_special_tokens=not (bos and text.startswith(bos)))
        if not images:
            return await self._render_cmpl(text, tok_params)
        loaded = await asyncio.gather(*(self._connector().fetch_image_async(url) for url in images))
        prompt = {"prompt": self._place_images(text, len(images)), "multi_modal_data": {IMAGE: list(loaded)}}
        return await self._render_cmpl(prompt, tok_params)

    def _connector(self) -> MediaConnector:
        mm = self._model_config.multimodal_config
        connector: MediaConnector = MEDIA_CONNECTOR_REGISTRY.load(
            envs.VLLM_MEDIA_CONNECTOR,
            media_io_kwargs=(mm.media_io_kwargs if mm else None),
            allowed_local_media_path=self._model_config.allowed_local_media_path,
            allowed_media_domains=self._model_config.allowed_media_domains,
        )
        return connector

    def _place_images(self, text: str, count: int) -> str:
        """Images beside a text prompt: the model's placeholder, once per image, marks where each goes;
        a prompt without placeholders gets them on lines of their own before the text (where vLLM
        puts them for a chat template that takes plain-string content)."""
        model_cls: Any = get_model_cls(self._model_config)
        placeholders = [model_cls.get_placeholder_str(IMAGE, i + 1) for i in range(count)]
        present = sum(text.count(p) for p in set(placeholders))
        if present == 0:
            return "\n".join([*placeholders, text])
        if present != count:
            raise InvalidImage(
                f"the prompt has {present} image placeholder(s) {sorted(set(placeholders))} for {count} image(s)"
            )
        return text


def _as_value_error(exc: ValueError | VLLMClientError, prompt: PromptInput, max_model_len: int) -> ValueError:
    if isinstance(exc, VLLMValidationError) and exc.parameter == "input_tokens":
        return PromptTooLong(int(exc.value), None, max_model_len)
    message = str(exc)
    if has_images(prompt) and any(word in message.lower() for word in ("image", "media", "url", "domain")):
        return InvalidImage(message)
    return ValueError(message)
