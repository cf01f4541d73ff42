"""One chat completion on the master: messages → prompt ids → generation → OpenAI events.

Tool calling happens here: the history is prepared for the model's template (Llama 3.1
rewrite, or folding into plain text for templates that ignore tools), tools are rendered
(by the template, or into the system prompt), and the output runs through the streaming
tool-call parser of the model's format.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ..api.errors import APIError
from ..api.schemas import ChatCompletionRequest
from ..constraints import (
    LAZY_TOOL_CALL_FORMATS,
    ConstraintError,
    json_object_constraint,
    json_schema_constraint,
    lazy_tool_call_constraint,
    tool_call_constraint,
)
from ..models.catalog import ModelCard
from ..models.tokenizer import ChatTemplateError, TextTokenizer
from ..tools import (
    StreamingToolParser,
    ToolCallDelta,
    ToolChoice,
    ToolChoiceError,
    add_tools_system_prompt,
    fold_tool_history,
    forced_function,
    infer_format,
    normalize_tool_choice,
    rewrite_history,
    tools_for_choice,
)
from ..types import SamplingParams
from .generation import Finished, GenerationError, SampledLogprobs, TokenGenerator, generate_text

# Formats whose markers are special tokens: the text must keep them for the parser.
_SPECIAL_TOKEN_FORMATS = frozenset({"llama3_json", "mistral", "gpt_oss", "deepseek_v3"})
DEFAULT_TOOL_FORMAT = "hermes"


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True)
class ToolCallEvent:
    delta: ToolCallDelta


@dataclass(frozen=True)
class ChatFinished:
    finish_reason: str  # "stop", "length" or "tool_calls"
    prompt_tokens: int
    completion_tokens: int
    prefill_seconds: float
    decode_seconds: float


@dataclass(frozen=True)
class LogprobsDelta:
    """One generated token in OpenAI's `logprobs.content` form."""

    entry: dict[str, Any]


ChatEvent = ContentDelta | ReasoningDelta | ToolCallEvent | LogprobsDelta | ChatFinished


@dataclass
class PreparedChat:
    request_id: str
    created: int
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop: list[str]
    tool_format: str
    tools: list[dict[str, Any]]  # the tools shown to the model; empty = no parsing
    tool_choice: ToolChoice


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
            entry["tool_calls"] = [
                call.model_dump(exclude_none=True) for call in message.tool_calls
            ]
        if message.tool_call_id:
            entry["tool_call_id"] = message.tool_call_id
        result.append(entry)
    return result


class ChatService:
    def __init__(
        self,
        card: ModelCard,
        tokenizer: TextTokenizer,
        context_length: int,
        generator: TokenGenerator,
        *,
        lazy_tool_grammar: bool = False,
    ) -> None:
        self.card = card
        # tool_choice "auto": constrain a call once the model starts one (opt-in per node).
        self.lazy_tool_grammar = lazy_tool_grammar
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.generator = generator
        template = tokenizer.chat_template
        self.tool_format = (
            card.tool_format
            or infer_format(template.source if template else None)
            or DEFAULT_TOOL_FORMAT
        )

    @property
    def model_id(self) -> str:
        return self.card.id

    def _render_prompt(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> str:
        template = self.tokenizer.chat_template
        fmt = self.tool_format
        if template is not None and template.renders_tools:
            # The template renders tools and tool history itself; Llama 3.1-style
            # templates need one call per assistant message.
            prepared = rewrite_history(messages, fmt)
            return self.tokenizer.apply_chat_template(prepared, tools=tools or None)
        # The template only prints role + content: calls and results become text in the
        # model's format, and the tools go into the system prompt.
        prepared = fold_tool_history(messages, fmt)
        if tools:
            prepared = add_tools_system_prompt(prepared, tools, fmt)
        return self.tokenizer.apply_chat_template(prepared)

    def _constraint(
        self,
        request: ChatCompletionRequest,
        tools: list[dict[str, Any]],
        choice: ToolChoice,
        budget: int,
    ) -> str | None:
        """The grammar this request samples under, serialized; None = unconstrained.

        Forced tool calls and response_format are always constrained: prompting alone
        does not make a small model emit valid calls or JSON. `budget` (max_tokens) lets
        the sampler close the call or document before the tokens run out.
        """
        parallel = request.parallel_tool_calls is not False
        try:
            if tools and (choice == "required" or forced_function(choice)):
                forced: Any = choice
                return tool_call_constraint(
                    tools, self.tool_format, choice=forced, parallel=parallel, budget=budget
                )
            response_format = request.response_format
            if response_format is not None and response_format.type == "json_object":
                return json_object_constraint(budget=budget)
            if response_format is not None and response_format.type == "json_schema":
                spec = response_format.json_schema or {}
                schema = spec.get("schema")
                if not isinstance(schema, dict):
                    raise APIError(
                        400,
                        "response_format json_schema needs a 'schema' object",
                        param="response_format.json_schema.schema",
                    )
                return json_schema_constraint(schema, budget=budget)
            # "auto" stays unconstrained in formats without a lazy trigger: a request the
            # model could serve must not fail because of a node option.
            lazy = self.lazy_tool_grammar and self.tool_format in LAZY_TOOL_CALL_FORMATS
            if tools and choice == "auto" and lazy:
                return lazy_tool_call_constraint(
                    tools, self.tool_format, parallel=parallel, budget=budget
                )
        except ConstraintError as error:
            param = "response_format" if request.response_format else "tools"
            raise APIError(400, str(error), param=param, code="unsupported_schema") from error
        return None

    def prepare(self, request: ChatCompletionRequest) -> PreparedChat:
        """Validate against the model and render the prompt; raises APIError (400)."""
        if request.top_logprobs is not None and not request.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        for penalty in ("frequency_penalty", "presence_penalty"):
            if getattr(request, penalty):
                raise APIError(400, f"{penalty} is not supported; omit it or use 0", param=penalty)
        declared = [tool.model_dump(exclude_none=True) for tool in request.tools or []]
        try:
            choice = normalize_tool_choice(request.tool_choice, declared)
        except ToolChoiceError as error:
            raise APIError(400, str(error), param="tool_choice") from error
        shown = tools_for_choice(declared, choice)
        try:
            prompt_text = self._render_prompt(messages_as_dicts(request), shown)
        except ChatTemplateError as error:
            raise APIError(
                400, f"the model's chat template refused the messages: {error}", param="messages"
            ) from error
        prompt_ids = self.tokenizer.encode(prompt_text, add_special_tokens=True)
        context = self.context_length
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
            constraint=self._constraint(request, shown, choice, max_tokens),
            logprobs=bool(request.logprobs),
            top_logprobs=request.top_logprobs or 0,
        )
        return PreparedChat(
            request_id=f"chatcmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            prompt_ids=prompt_ids,
            max_tokens=max_tokens,
            sampling=sampling,
            stop=request.stop_list(),
            tool_format=self.tool_format,
            tools=shown,
            tool_choice=choice,
        )

    def _logprobs_entry(self, item: SampledLogprobs) -> dict[str, Any]:
        entry = _token_entry(self.tokenizer, item.token_id, item.logprobs.logprob)
        entry["top_logprobs"] = [
            _token_entry(self.tokenizer, token_id, logprob)
            for token_id, logprob in item.logprobs.top
        ]
        return entry

    async def run(self, prepared: PreparedChat) -> AsyncIterator[ChatEvent]:
        parser = (
            StreamingToolParser(prepared.tools, prepared.tool_format) if prepared.tools else None
        )
        keep_special = parser is not None and prepared.tool_format in _SPECIAL_TOKEN_FORMATS
        try:
            async for item in generate_text(
                self.generator,
                self.tokenizer,
                request_id=prepared.request_id,
                prompt=prepared.prompt_ids,
                sampling=prepared.sampling,
                max_tokens=prepared.max_tokens,
                stop=prepared.stop,
                skip_special_tokens=not keep_special,
            ):
                if isinstance(item, SampledLogprobs):
                    yield LogprobsDelta(self._logprobs_entry(item))
                    continue
                if not isinstance(item, Finished):
                    if parser is None:
                        yield ContentDelta(item)
                        continue
                    for delta in parser.feed(item):
                        yield _event(delta)
                    continue
                reason = item.finish_reason
                if parser is not None:
                    for delta in parser.finish(truncated=reason == "length"):
                        yield _event(delta)
                    if parser.tool_calls:
                        reason = "tool_calls"
                yield ChatFinished(
                    reason,
                    item.prompt_tokens,
                    item.completion_tokens,
                    item.prefill_seconds,
                    item.decode_seconds,
                )
        except GenerationError as error:
            raise APIError(500, str(error), error_type="server_error") from error


def _token_entry(tokenizer: TextTokenizer, token_id: int, logprob: float) -> dict[str, Any]:
    text = tokenizer.decode([token_id], skip_special_tokens=False)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def _event(delta: Any) -> ChatEvent:
    if delta.tool_call is not None:
        return ToolCallEvent(delta.tool_call)
    if delta.reasoning is not None:
        return ReasoningDelta(delta.reasoning)
    return ContentDelta(delta.content or "")
