"""Request and response models of POST /generate."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from llm_service.cache.controls import CacheOptions


class ImageURL(BaseModel):
    """Where an image is: a data: URL (base64), or an http(s) URL on an allowed host."""

    url: str = Field(description="data:image/png;base64,... or https://host/path (LLM_IMAGE_FETCH_HOSTS).")
    detail: str | None = Field(None, description="Accepted and ignored (as OpenAI's).")


class TextPart(BaseModel):
    """A text content part."""

    type: Literal["text"] = Field(description="text")
    text: str = Field(description="The text.")


class ImagePart(BaseModel):
    """An image content part, as in OpenAI's chat API."""

    type: Literal["image_url"] = Field(description="image_url")
    image_url: ImageURL = Field(description="The image.")


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class FunctionDefinition(BaseModel):
    """A function the model may call."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="Name (letters, digits, _ . -, at most 64).")
    description: str | None = Field(None, description="What the function does, for the model.")
    parameters: dict[str, Any] | None = Field(None, description="JSON Schema of the arguments object.")
    strict: bool | None = Field(None, description="Accepted; forced calls always follow the schema.")

    @model_validator(mode="after")
    def _object_schema(self) -> FunctionDefinition:
        if self.parameters is not None and self.parameters.get("type", "object") != "object":
            raise ValueError("a function's parameters must be a JSON Schema of type object")
        return self


class ToolDefinition(BaseModel):
    """A tool: only functions."""

    type: Literal["function"] = Field(description="function")
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str = Field(description="Name of one of the tools.")


class NamedToolChoice(BaseModel):
    """Force a call of this function."""

    type: Literal["function"] = Field(description="function")
    function: NamedFunction


class ChatMessage(BaseModel):
    """One chat message; content is text, or text and image parts (images on the multimodal slot)."""

    role: Literal["system", "user", "assistant", "tool", "developer"] = Field(description="Who speaks.")
    content: str | list[ContentPart] | None = Field(
        description="The message text, or a list of content parts (None for an assistant's tool calls)."
    )
    tool_calls: list[dict[str, Any]] | None = Field(
        None, description="An assistant's calls, as OpenAI's: [{id, type: function, function: {name, arguments}}]."
    )
    tool_call_id: str | None = Field(None, description="The call a tool message answers.")


MAX_STOP = 16
# Bounds of integers the engine takes (vLLM's own OpenAI server bounds the seed the same way).
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT32_MAX = 2**31 - 1


class StopSequences(BaseModel):
    """The `stop` field, shared by every surface: a string or a list of non-empty strings."""

    stop: str | list[str] | None = Field(None, description="Text that ends generation (not included).")

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> str | list[str] | None:
        items = [value] if isinstance(value, str) else (value or [])
        if len(items) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(item == "" for item in items):
            raise ValueError("stop sequences must not be empty")
        return value

    def stop_tuple(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class SamplingFields(StopSequences):
    """Sampling parameters of /generate."""

    max_tokens: int | None = Field(
        None, ge=1, description="Most tokens to generate; default LLM_DEFAULT_MAX_TOKENS, capped by the context."
    )
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 is greedy (and cacheable).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    top_k: int | None = Field(
        None, ge=-1, le=INT32_MAX, description="Sample from the k most likely tokens; -1/0/None = all."
    )
    seed: int | None = Field(
        None, ge=INT64_MIN, le=INT64_MAX, description="Seed for reproducible sampling (makes the request cacheable)."
    )
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Penalty for tokens already present.")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Penalty by token frequency.")
    ignore_eos: bool = Field(
        False, description="Generate max_tokens tokens even past the end-of-sequence token (as vLLM; load tests)."
    )


class GenerateRequest(SamplingFields):
    """Body of POST /generate: a slot, a prompt or chat messages, and sampling parameters."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        "standard", description="Slot name, its model id or an alias, or the name of one of its LoRA adapters."
    )
    prompt: str | None = Field(
        None, min_length=1, description="Raw prompt text, sent to the model as is (give prompt or messages)."
    )
    images: list[str] | None = Field(
        None,
        description="Image URLs (data: or allowed http(s)) that go with `prompt`: each takes the place of one "
        "image placeholder of the model in the prompt (e.g. <image>), or, with none, goes before the text.",
    )
    messages: list[ChatMessage] | None = Field(
        None, min_length=1, description="Chat messages, rendered with the model's chat template."
    )
    stream: bool = Field(False, description="Stream Server-Sent Events instead of one JSON response.")
    cache: CacheOptions | None = Field(None, description="Per-request cache controls.")
    tools: list[ToolDefinition] | None = Field(
        None, min_length=1, description="Functions the model may call (with messages), as OpenAI's tools."
    )
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="none, auto (the default with tools), required, or a named function."
    )
    timeout: float | None = Field(
        None,
        gt=0,
        description="Seconds this request may take (waiting for a model load included); past it 504. "
        "At most LLM_MAX_REQUEST_TIMEOUT_SECONDS; the X-Request-Timeout header does the same.",
    )

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> GenerateRequest:
        # ctx["param"] names the field for the error envelope: a model validator has no field location.
        if self.prompt is None and self.messages is None:
            raise PydanticCustomError("missing", "give exactly one of 'prompt' or 'messages'", {"param": "prompt"})
        if self.prompt is not None and self.messages is not None:
            message = "give exactly one of 'prompt' or 'messages', not both"
            raise PydanticCustomError("value_error", message, {"param": "messages"})
        if self.messages is not None and not self.messages:
            raise PydanticCustomError("value_error", "'messages' must not be empty", {"param": "messages"})
        if self.prompt is not None and not self.prompt.strip():
            raise PydanticCustomError("value_error", "'prompt' must not be empty", {"param": "prompt"})
        if self.images is not None and self.prompt is None:
            message = "'images' go with 'prompt'; in 'messages' images are image_url content parts"
            raise PydanticCustomError("value_error", message, {"param": "images"})
        if self.tools is not None and self.messages is None:
            raise PydanticCustomError("value_error", "'tools' go with 'messages'", {"param": "tools"})
        try:
            check_tool_choice(self.tools, self.tool_choice)
        except ValueError as exc:
            raise PydanticCustomError("value_error", str(exc), {"param": "tool_choice"}) from None
        return self


def check_tool_choice(tools: list[ToolDefinition] | None, choice: str | NamedToolChoice | None) -> None:
    """A tool_choice other than none needs tools, and a named one one of them."""
    if choice not in (None, "none") and not tools:
        raise ValueError("tool_choice needs tools")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in {t.function.name for t in tools or ()}:
        raise ValueError(f"tool_choice names {choice.function.name!r}, which is not one of the tools")


class ToolCallOut(BaseModel):
    """A call the model made, in /generate's shape."""

    id: str = Field(description="Id to answer it with (a tool message's tool_call_id).")
    name: str = Field(description="The function.")
    arguments: str = Field(description="Its arguments: a JSON object, as text.")


class Usage(BaseModel):
    prompt_tokens: int = Field(description="Tokens in the prompt.")
    completion_tokens: int = Field(description="Tokens generated.")
    total_tokens: int = Field(description="prompt_tokens + completion_tokens.")


class Timings(BaseModel):
    time_to_first_token: float | None = Field(description="Seconds from request to the first token.")
    total: float = Field(description="Seconds from request to the last token.")


class GenerateResponse(BaseModel):
    """Body of a non-streamed /generate response."""

    id: str = Field(description="Request id (also in the X-Request-ID header).")
    model: str = Field(description="Slot that served the request.")
    model_id: str = Field(description="Model id loaded in that slot.")
    text: str = Field(description="Generated text.")
    finish_reason: str | None = Field(description="stop, length, abort, or tool_calls.")
    tool_calls: list[ToolCallOut] | None = Field(None, description="The calls the model made (absent if none).")
    usage: Usage
    timings: Timings
    cached: bool = Field(False, description="True when the response came from the cache.")
    coalesced: bool = Field(
        False, description="True when an identical request in flight generated it for both (X-Cache: COALESCED)."
    )
