"""One chat completion on the master: messages → prompt ids → generation → OpenAI events."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ..api.errors import APIError
from ..api.schemas import ChatCompletionRequest
from ..engine.sampling import SamplingParams
from ..models.loader import LoadedModel
from ..models.tokenizer import ChatTemplateError
from .generation import Finished, GenerationError, TokenGenerator, generate_text


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ChatFinished:
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    prefill_seconds: float
    decode_seconds: float


ChatEvent = ContentDelta | ChatFinished


@dataclass
class PreparedChat:
    request_id: str
    created: int
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop: list[str]
    extras: dict[str, Any] = field(default_factory=dict)


def messages_as_dicts(request: ChatCompletionRequest) -> list[dict[str, Any]]:
    """Messages as plain dicts for the chat template (content parts flattened to text)."""
    result: list[dict[str, Any]] = []
    for message in request.messages:
        entry: dict[str, Any] = {"role": message.role, "content": message.text()}
        if message.role == "developer":
            entry["role"] = "system"
        if message.name:
            entry["name"] = message.name
        if message.tool_calls:
            entry["tool_calls"] = [call.model_dump() for call in message.tool_calls]
        if message.tool_call_id:
            entry["tool_call_id"] = message.tool_call_id
        result.append(entry)
    return result


class ChatService:
    def __init__(self, loaded: LoadedModel, generator: TokenGenerator) -> None:
        self.loaded = loaded
        self.generator = generator

    @property
    def model_id(self) -> str:
        return self.loaded.card.id

    def prepare(self, request: ChatCompletionRequest) -> PreparedChat:
        """Validate against the model and render the prompt; raises APIError (400)."""
        if request.logprobs:
            raise APIError(400, "logprobs are not supported", param="logprobs")
        for penalty in ("frequency_penalty", "presence_penalty"):
            if getattr(request, penalty):
                raise APIError(400, f"{penalty} is not supported; omit it or use 0", param=penalty)
        if request.response_format is not None and request.response_format.type != "text":
            raise APIError(
                400,
                f"response_format type {request.response_format.type!r} is not supported yet",
                param="response_format",
            )
        tokenizer = self.loaded.tokenizer
        messages = messages_as_dicts(request)
        try:
            prompt_text = tokenizer.apply_chat_template(messages)
        except ChatTemplateError as error:
            raise APIError(
                400, f"the model's chat template refused the messages: {error}", param="messages"
            ) from error
        prompt_ids = tokenizer.encode(prompt_text, add_special_tokens=True)
        context = self.loaded.context_length
        requested = request.token_limit()
        if len(prompt_ids) >= context:
            raise APIError(
                400,
                f"the prompt is {len(prompt_ids)} tokens; this model's context is {context}",
                param="messages",
                code="context_length_exceeded",
            )
        if requested is not None and len(prompt_ids) + requested > context:
            raise APIError(
                400,
                f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({requested}) exceeds "
                f"the model's context of {context} tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        max_tokens = requested if requested is not None else context - len(prompt_ids)
        sampling = SamplingParams(
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            seed=request.seed,
        )
        return PreparedChat(
            request_id=f"chatcmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            prompt_ids=prompt_ids,
            max_tokens=max_tokens,
            sampling=sampling,
            stop=request.stop_list(),
        )

    async def run(self, prepared: PreparedChat) -> AsyncIterator[ChatEvent]:
        try:
            async for item in generate_text(
                self.generator,
                self.loaded.tokenizer,
                request_id=prepared.request_id,
                prompt=prepared.prompt_ids,
                sampling=prepared.sampling,
                max_tokens=prepared.max_tokens,
                stop=prepared.stop,
            ):
                if isinstance(item, Finished):
                    yield ChatFinished(
                        item.finish_reason,
                        item.prompt_tokens,
                        item.completion_tokens,
                        item.prefill_seconds,
                        item.decode_seconds,
                    )
                else:
                    yield ContentDelta(item)
        except GenerationError as error:
            raise APIError(500, str(error), error_type="server_error") from error
