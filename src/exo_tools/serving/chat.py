"""One chat turn on the master: a `ChatRequest` → prompt ids → generation → chat events.

Tool calling happens here: the history is prepared for the model's template (Llama 3.1
rewrite, or folding into plain text for templates that ignore tools), tools are rendered
(by the template, or into the system prompt), and the output runs through the streaming
tool-call parser of the model's format.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

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
    StreamDelta,
    StreamingToolParser,
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
from ..types import SamplingParams, TokenEvent, TokenGenerator
from .errors import ContextLengthExceeded, InvalidChatRequest, UnsupportedSchema
from .events import (
    ChatEvent,
    ContentDelta,
    LogprobsDelta,
    ReasoningDelta,
    ScoredToken,
    ToolCallEvent,
)
from .generation import generate_text
from .request import ChatRequest

# Formats whose markers are special tokens: the text must keep them for the parser.
_SPECIAL_TOKEN_FORMATS = frozenset({"llama3_json", "mistral", "gpt_oss", "deepseek_v3"})
DEFAULT_TOOL_FORMAT = "hermes"


@dataclass
class PreparedChat:
    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...]
    tool_format: str
    tools: list[dict[str, Any]]  # the tools shown to the model; empty = no parsing
    tool_choice: ToolChoice


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
        request: ChatRequest,
        tools: list[dict[str, Any]],
        choice: ToolChoice,
        budget: int,
    ) -> str | None:
        """The grammar this request samples under, serialized; None = unconstrained.

        Forced tool calls and response_format are always constrained: prompting alone
        does not make a small model emit valid calls or JSON. `budget` (max_tokens) lets
        the sampler close the call or document before the tokens run out.
        """
        parallel = request.parallel_tool_calls
        response_format = request.response_format
        # The spec names its tokenizer: a sampling node holding another model's refuses it.
        tokenizer = self.card.id
        try:
            if tools and (choice == "required" or forced_function(choice)):
                forced: Any = choice
                return tool_call_constraint(
                    tools,
                    self.tool_format,
                    choice=forced,
                    parallel=parallel,
                    tokenizer=tokenizer,
                    budget=budget,
                )
            if response_format is not None and response_format.kind == "json_object":
                return json_object_constraint(tokenizer=tokenizer, budget=budget)
            if response_format is not None and response_format.kind == "json_schema":
                schema = response_format.schema
                if not isinstance(schema, dict):
                    raise InvalidChatRequest(
                        "response_format json_schema needs a 'schema' object",
                        field="response_format.schema",
                    )
                return json_schema_constraint(schema, tokenizer=tokenizer, budget=budget)
            # "auto" stays unconstrained in formats without a lazy trigger: a request the
            # model could serve must not fail because of a node option.
            lazy = self.lazy_tool_grammar and self.tool_format in LAZY_TOOL_CALL_FORMATS
            if tools and choice == "auto" and lazy:
                return lazy_tool_call_constraint(
                    tools, self.tool_format, parallel=parallel, tokenizer=tokenizer, budget=budget
                )
        except ConstraintError as error:
            field = "response_format" if response_format is not None else "tools"
            raise UnsupportedSchema(str(error), field=field) from error
        return None

    def prepare(self, request: ChatRequest, *, request_id: str | None = None) -> PreparedChat:
        """Validate against the model and render the prompt; raises `InvalidChatRequest`.

        `request_id` names the generation in the engine and the logs; an API passes the id
        it answers with, so that both agree.
        """
        try:
            choice = normalize_tool_choice(request.tool_choice, request.tools)
        except ToolChoiceError as error:
            raise InvalidChatRequest(str(error), field="tool_choice") from error
        shown = tools_for_choice(request.tools, choice)
        try:
            prompt_text = self._render_prompt(request.messages, shown)
        except ChatTemplateError as error:
            raise InvalidChatRequest(
                f"the model's chat template refused the messages: {error}", field="messages"
            ) from error
        prompt_ids = self.tokenizer.encode(prompt_text, add_special_tokens=True)
        context = self.context_length
        requested = request.max_tokens
        if len(prompt_ids) >= context:
            raise ContextLengthExceeded(
                f"the prompt is {len(prompt_ids)} tokens; this model's context is {context}",
                field="messages",
            )
        if requested is not None and len(prompt_ids) + requested > context:
            raise ContextLengthExceeded(
                f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({requested}) exceeds "
                f"the model's context of {context} tokens",
                field="max_tokens",
            )
        max_tokens = requested if requested is not None else context - len(prompt_ids)
        sampling = SamplingParams(
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            constraint=self._constraint(request, shown, choice, max_tokens),
            logprobs=request.logprobs,
            top_logprobs=request.top_logprobs,
        )
        return PreparedChat(
            request_id=request_id or uuid.uuid4().hex,
            prompt_ids=prompt_ids,
            max_tokens=max_tokens,
            sampling=sampling,
            stop=request.stop,
            tool_format=self.tool_format,
            tools=shown,
            tool_choice=choice,
        )

    async def run(self, prepared: PreparedChat) -> AsyncIterator[ChatEvent]:
        """The answer's events, ending with one `Finished`; raises `GenerationError`."""
        parser = (
            StreamingToolParser(prepared.tools, prepared.tool_format) if prepared.tools else None
        )
        keep_special = parser is not None and prepared.tool_format in _SPECIAL_TOKEN_FORMATS
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
            if isinstance(item, TokenEvent):
                yield self._logprobs(item)
            elif isinstance(item, str):
                if parser is None:
                    yield ContentDelta(item)
                    continue
                for delta in parser.feed(item):
                    if (event := _parsed_event(parser, delta)) is not None:
                        yield event
            else:  # Finished
                if parser is not None:
                    for delta in parser.finish(truncated=item.reason == "length"):
                        if (event := _parsed_event(parser, delta)) is not None:
                            yield event
                    if parser.tool_calls:
                        item = replace(item, reason="tool_calls")
                yield item

    def _logprobs(self, event: TokenEvent) -> LogprobsDelta:
        assert event.logprobs is not None  # generate_text passes only tokens that carry them
        return LogprobsDelta(
            self._scored(event.token_id, event.logprobs.logprob),
            tuple(self._scored(token_id, logprob) for token_id, logprob in event.logprobs.top),
        )

    def _scored(self, token_id: int, logprob: float) -> ScoredToken:
        return ScoredToken(self.tokenizer.decode([token_id], skip_special_tokens=False), logprob)


def _parsed_event(parser: StreamingToolParser, delta: StreamDelta) -> ChatEvent | None:
    """The chat event for one parser delta; None for the second half of a tool call."""
    call = delta.tool_call
    if call is not None:
        # The parser sends each complete call as a header (with its id), then its arguments:
        # the header stands for the whole call.
        if "id" not in call:
            return None
        return ToolCallEvent(call["index"], parser.tool_calls[call["index"]])
    if delta.reasoning is not None:
        return ReasoningDelta(delta.reasoning)
    return ContentDelta(delta.content or "")
