"""Bodies of the OpenAI-compatible API (pydantic v2): what clients send, errors, models.

What the chat completions route writes back is in `openai_chat`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)


class SparseBody(BaseModel):
    """Writes the fields in `_omitted_when_none` only when set, as OpenAI does; every other
    None is written as null."""

    _omitted_when_none: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        omitted = self._omitted_when_none
        return {
            key: value for key, value in data.items() if value is not None or key not in omitted
        }


class _Lenient(BaseModel):
    # Clients send fields we don't use (user, metadata, store, ...); ignore them.
    model_config = ConfigDict(extra="ignore")


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class OtherPart(_Lenient):
    type: str


class FunctionCall(_Lenient):
    name: str
    # Clients send a JSON string (OpenAI); some send an object.
    arguments: str | dict[str, Any] = "{}"


class ToolCallIn(_Lenient):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart | OtherPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None

    @field_validator("content")
    @classmethod
    def _only_text_parts(cls, value: Any) -> Any:
        if isinstance(value, list):
            for part in value:
                if not isinstance(part, TextPart):
                    raise ValueError(
                        f"content part type {part.type!r} is not supported; only 'text' parts"
                    )
        return value

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        if self.content is None and not self.tool_calls:
            raise ValueError("an assistant message needs content or tool_calls")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content if isinstance(part, TextPart))


class FunctionDefinition(_Lenient):
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(_Lenient):
    type: Literal["function"]
    function: FunctionDefinition


class StreamOptions(_Lenient):
    include_usage: bool = False


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class StructuredOutputs(_Lenient):
    """vLLM's `structured_outputs` (clients send it through the OpenAI SDK's `extra_body`)."""

    # `json` would shadow BaseModel.json.
    json_schema: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: Any = None


class GuidedGenerationFields(_Lenient):
    """Output constraints beyond `response_format`, as vLLM and llama.cpp's server take
    them: at most one per request (`openai_chat.guided_output`)."""

    structured_outputs: StructuredOutputs | None = None
    # vLLM's older spelling of the same.
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # llama.cpp's server: GBNF, and a bare schema ("" is its "no grammar").
    grammar: str | None = None
    json_schema: dict[str, Any] | None = None


class ChatCompletionRequest(GuidedGenerationFields):
    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    # Not OpenAI's; vLLM's and llama.cpp's servers take it too.
    top_k: int | None = Field(default=None, ge=0)
    # vLLM's extension: > 1 makes recently generated tokens less likely.
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=2.0)
    # llama.cpp's DRY sampler: a token that would extend a repeat loses
    # dry_multiplier * dry_base ** (length - dry_allowed_length) of its logit.
    dry_multiplier: float | None = Field(default=None, ge=0.0, le=10.0)
    dry_base: float | None = Field(default=None, gt=1.0, le=8.0)
    dry_allowed_length: int | None = Field(default=None, ge=1, le=64)
    # MLX keys its generator with an unsigned 64-bit seed.
    seed: int | None = Field(default=None, ge=0, le=2**64 - 1)
    stop: str | list[str] | None = None
    n: int | None = Field(default=None, ge=1, le=1)
    tools: list[ToolDefinition] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 16:
            raise ValueError("at most 16 stop sequences")
        return value

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "exo-tools"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]
