"""Request and response models of the OpenAI-compatible API (/v1)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from llm_service.api.schemas import (
    INT32_MAX,
    INT64_MAX,
    INT64_MIN,
    NamedToolChoice,
    StopSequences,
    ToolDefinition,
    Usage,
    check_tool_choice,
)
from llm_service.cache.controls import CacheOptions

# n multiplies the engine work of one request; OpenAI allows 128, one small slot serves fewer.
MAX_N = 16


class StreamOptions(BaseModel):
    """Options of a streamed response."""

    include_usage: bool = Field(
        False, description="Send a last chunk with empty choices and the usage of the whole request."
    )


class JSONSchemaFormat(BaseModel):
    """The `json_schema` member of `response_format`."""

    model_config = ConfigDict(populate_by_name=True)

    name: str = Field("response", description="Name of the schema (informational).")
    description: str | None = Field(None, description="What the response is (informational).")
    schema_: dict[str, Any] | None = Field(
        None, alias="schema", description="JSON Schema the output must validate against; absent = any JSON."
    )
    strict: bool | None = Field(None, description="Accepted; output is always constrained to the schema.")


class ResponseFormat(BaseModel):
    """Structured output: plain text, any JSON object, or JSON matching a schema."""

    type: Literal["text", "json_object", "json_schema"] = Field(description="Kind of output.")
    json_schema: JSONSchemaFormat | None = Field(None, description="The schema, for type json_schema.")

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a 'json_schema' object")
        return self

    def engine_schema(self) -> dict[str, Any] | None:
        """The engine's json_schema option: None = free text, {} = any JSON object."""
        if self.type == "json_object":
            return {}
        if self.type == "json_schema" and self.json_schema is not None:
            return self.json_schema.schema_ or {}
        return None


class OpenAISampling(StopSequences):
    """Fields shared by chat and text completions. null means the default, as in OpenAI's API;
    unknown fields are ignored (clients send extras)."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(description="Slot name, the model id it serves, an alias, or a LoRA adapter's name.")
    max_tokens: int | None = Field(
        None, ge=1, description="Most tokens to generate; default LLM_DEFAULT_MAX_TOKENS, within the context."
    )
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="Sampling temperature; 0 is greedy.")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    top_k: int | None = Field(
        None, ge=-1, le=INT32_MAX, description="Extension (as vLLM): sample from the k most likely."
    )
    n: int | None = Field(None, ge=1, le=MAX_N, description=f"Choices to generate (at most {MAX_N}).")
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX, description="Seed for reproducible sampling.")
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="Penalty for present tokens.")
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="Penalty by token frequency.")
    ignore_eos: bool | None = Field(
        None, description="Extension (as vLLM): generate max_tokens tokens even past the end-of-sequence token."
    )
    logit_bias: dict[str, float] | None = Field(
        None, description="Token id (as a string) to a bias in [-100, 100] added to its logit."
    )
    user: str | None = Field(None, description="Accepted and ignored (never logged nor sent to the engine).")
    stream: bool | None = Field(False, description="Stream Server-Sent Events, ending with data: [DONE].")
    stream_options: StreamOptions | None = Field(None, description="Options of a streamed response.")
    cache: CacheOptions | None = Field(None, description="Extension: cache controls, as in /generate.")
    timeout: float | None = Field(
        None,
        gt=0,
        description="Extension: seconds this request may take; past it 504 (or a final error chunk). "
        "The X-Request-Timeout header does the same.",
    )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatMessage(BaseModel):
    """One chat message. Content is text, or a list of text parts."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"] = Field(
        description="Who speaks; developer becomes system where the chat template has no developer role."
    )
    content: str | list[dict[str, Any]] | None = Field(
        None, description="Text, or content parts: text, and image_url (data: URLs; http(s) on allowed hosts)."
    )
    name: str | None = Field(None, description="Name of the speaker, passed to the chat template.")
    tool_calls: list[dict[str, Any]] | None = Field(None, description="The calls an assistant message made.")
    tool_call_id: str | None = Field(None, description="The call a tool message answers.")

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        # OpenAI's rule: only an assistant message (with tool calls) may come without content.
        if self.content is None and self.role in ("system", "developer", "user"):
            raise ValueError(f"a {self.role} message needs content")
        return self


class ChatCompletionRequest(OpenAISampling):
    """Body of POST /v1/chat/completions."""

    @model_validator(mode="after")
    def _tool_choice_matches_tools(self) -> ChatCompletionRequest:
        check_tool_choice(self.tools, self.tool_choice)
        return self

    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    max_completion_tokens: int | None = Field(None, ge=1, description="As max_tokens; wins if both are set.")
    logprobs: bool | None = Field(False, description="Return the log-probability of each output token.")
    top_logprobs: int | None = Field(
        None, ge=0, le=20, description="Most likely alternatives per token (needs logprobs: true)."
    )
    response_format: ResponseFormat | None = Field(None, description="text, json_object or json_schema.")
    tools: list[ToolDefinition] | None = Field(None, min_length=1, description="Functions the model may call.")
    functions: list[dict[str, Any]] | None = Field(None, description="Deprecated tools; not supported.")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="none, auto (the default with tools), required, or a named function."
    )
    parallel_tool_calls: bool | None = Field(None, description="false: at most one call per answer.")
    modalities: list[str] | None = Field(None, description="Only text output is supported.")


class CompletionRequest(OpenAISampling):
    """Body of POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="A prompt or a list of prompts: text, or token ids."
    )
    echo: bool | None = Field(False, description="Prepend the prompt to each choice's text.")
    logprobs: int | None = Field(
        None, ge=0, le=5, description="Log-probabilities of each output token and of the N most likely."
    )
    best_of: int | None = Field(None, ge=1, description="Only best_of == n (or absent) is supported.")
    suffix: str | None = Field(None, description="Not supported (no insertion).")


# --- responses -------------------------------------------------------------------------------
class ModelCard(BaseModel):
    """One slot, as OpenAI describes a model."""

    id: str = Field(description="Slot name; pass it (or model_id) as `model`.")
    object: Literal["model"] = "model"
    created: int = Field(description="Unix time the slot's model was loaded, or the service started.")
    owned_by: str = Field("llm-service", description="Always llm-service.")
    model_id: str = Field(description="Model id (or path) the slot serves.")
    state: str = Field(description="unloaded, loading, loaded, unloading or failed.")
    max_model_len: int = Field(description="Context length of the slot in tokens.")
    kind: str = Field(
        "generate", description="generate (chat, completions), embedding (/v1/embeddings) or rerank (/v1/rerank)."
    )
    parent: str | None = Field(
        None, description="A LoRA adapter's card: the model id of the slot it runs on (as `vllm serve`); else null."
    )


class ModelList(BaseModel):
    """Body of GET /v1/models."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobOut] | None
    refusal: list[TokenLogprobOut] | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="The arguments, a JSON object as text.")


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = Field(description="stop, length, or tool_calls.")


class ChatCompletionResponse(BaseModel):
    """Body of a non-streamed chat completion."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str = Field(description="The `model` of the request.")
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = Field(description="stop or length.")


class CompletionResponse(BaseModel):
    """Body of a non-streamed text completion."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str = Field(description="The `model` of the request.")
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None
