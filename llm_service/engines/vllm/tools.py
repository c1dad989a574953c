"""Tool calls in a choice's output, read by vLLM's own parser (the one `--tool-call-parser` names)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.inputs import EngineInput
from vllm.parser.abstract_parser import Parser
from vllm.sampling_params import StructuredOutputsParams
from vllm.tokenizers import TokenizerLike

from llm_service.engines.base import ToolCallDelta


@dataclass(frozen=True)
class VLLMPrompt:
    """A rendered prompt as the engine runs it (RenderedPrompt.payload of a vLLM engine).

    `chat` is vLLM's request object for a chat with tools, after the parser adjusted it (for a
    required or named tool choice it carries the structured output that forces the call).
    """

    engine_input: EngineInput
    chat: ChatCompletionRequest | None = None
    parser_cls: type[Parser] | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @property
    def structured_outputs(self) -> StructuredOutputsParams | None:
        return self.chat.structured_outputs if self.chat is not None else None

    def reads_tool_calls(self) -> bool:
        chat = self.chat
        return bool(self.parser_cls is not None and chat is not None and chat.tools and chat.tool_choice != "none")

    @property
    def named_tool_choice(self) -> bool:
        return self.chat is not None and not isinstance(self.chat.tool_choice, str | None)


class ToolCallReader:
    """Splits one choice's streamed output into content and tool-call deltas (OpenAI's shape)."""

    def __init__(self, prompt: VLLMPrompt, tokenizer: TokenizerLike, model_config: Any, prompt_token_ids: list[int]):
        assert prompt.parser_cls is not None and prompt.chat is not None
        self._request = prompt.chat
        self._prompt_token_ids = prompt_token_ids
        self._parser = prompt.parser_cls(
            tokenizer,
            list(prompt.chat.tools or ()),
            chat_template_kwargs=prompt.chat_template_kwargs,
            model_config=model_config,
        )
        self._parser.set_prompt_token_ids(prompt_token_ids)
        self.called = False

    def read(self, text: str, token_ids: list[int], finished: bool) -> tuple[str, tuple[ToolCallDelta, ...]]:
        message = self._parser.parse_delta(
            text, token_ids, self._request, self._prompt_token_ids, finished=finished
        )
        if message is None:
            return "", ()
        calls = tuple(
            ToolCallDelta(
                index=call.index,
                id=call.id,
                name=call.function.name if call.function else None,
                arguments=(call.function.arguments or "") if call.function else "",
            )
            for call in message.tool_calls
        )
        self.called = self.called or bool(calls)
        return message.content or "", calls
