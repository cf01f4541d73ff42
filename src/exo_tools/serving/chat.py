"""One chat turn on the master: a `ChatRequest` → prompt ids → generation → chat events.

Tool calling happens here: the history is prepared for the model's template (Llama 3.1
rewrite, or folding into plain text for templates that ignore tools), tools are rendered
(by the template, or into the system prompt), and the output runs through the streaming
tool-call parser of the model's format.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any, cast

from ..constraints import (
    LAZY_TOOL_CALL_FORMATS,
    TOOL_CALL_FORMATS,
    ConstraintError,
    choice_constraint,
    grammar_constraint,
    json_object_constraint,
    json_schema_constraint,
    lazy_tool_call_constraint,
    regex_constraint,
    tool_call_constraint,
    vocabulary_of,
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
    keeps_special_tokens,
    normalize_tool_choice,
    rewrite_history,
    tools_for_choice,
)
from ..types import SamplingParams, TokenEvent, TokenGenerator
from .errors import ContextLengthExceeded, InvalidChatRequest, ServerBusy, UnsupportedSchema
from .events import (
    ChatEvent,
    ContentDelta,
    LogprobsDelta,
    ReasoningDelta,
    ScoredToken,
    ToolCallEvent,
)
from .generation import generate_text
from .request import ChatRequest, GuidedOutput, SamplingDefaults
from .telemetry import current_record

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
        require_tool_on_user_turn: bool = False,
        default_max_tokens: int | None = None,
        wrap_up_share: float = 0.0,
        sampling_defaults: SamplingDefaults | None = None,
    ) -> None:
        self.card = card
        # tool_choice "auto": constrain a call once the model starts one (opt-in per node).
        self.lazy_tool_grammar = lazy_tool_grammar
        # tool_choice "auto" on a user's turn decodes one call under the grammar (opt-in per
        # node): small models rarely start a call on their own.
        self.require_tool_on_user_turn = require_tool_on_user_turn
        # The output limit of a request that sets none (Codex sends none); None: the
        # context left.
        self.default_max_tokens = default_max_tokens
        # An unconstrained answer that has used this share of its max_tokens ends at its next
        # sentence or line end (opt-in per node): small models' answers run on to the limit,
        # which agent CLIs report as an error. 0: off.
        self.wrap_up_share = wrap_up_share
        self.sampling_defaults = sampling_defaults or SamplingDefaults()
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
        if request.guided is not None:
            return self._guided_constraint(request, request.guided, budget)
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

    def _guided_constraint(self, request: ChatRequest, guided: GuidedOutput, budget: int) -> str:
        """The constraint of a regex, choice, grammar or JSON schema the client sent: the
        request's only one, so with forced tool calls or response_format it is a 400."""
        source = guided.source
        # The client's own choice: a node option that forces calls yields to the constraint.
        asked = normalize_tool_choice(request.tool_choice, request.tools)
        if request.tools and (asked == "required" or forced_function(asked)):
            raise InvalidChatRequest(
                f"{source} and tool_choice {request.tool_choice!r} both constrain the "
                "output; send one of them",
                field=source,
            )
        if request.response_format is not None and request.response_format.kind != "text":
            raise InvalidChatRequest(
                f"{source} and response_format both constrain the output; send one of them",
                field=source,
            )
        options: dict[str, Any] = {"tokenizer": self.card.id, "budget": budget}
        value = guided.value
        try:
            if guided.kind == "json_object":
                return json_object_constraint(**options)
            if guided.kind == "json_schema":
                return json_schema_constraint(_schema(value, source), **options)
            # Compiled against the model's vocabulary here as well: a grammar the sampling
            # node's limits refuse is a 400 now, not a failed stream later.
            options["vocabulary"] = vocabulary_of(self.tokenizer)
            if guided.kind == "choice":
                if not isinstance(value, list | tuple):
                    raise InvalidChatRequest(f"{source} must be a list of strings", field=source)
                return choice_constraint(cast(list[str], value), **options)
            if not isinstance(value, str):
                raise InvalidChatRequest(f"{source} must be a string", field=source)
            if guided.kind == "regex":
                return regex_constraint(value, **options)
            return grammar_constraint(value, **options)
        except ConstraintError as error:
            failure = UnsupportedSchema if guided.kind == "json_schema" else InvalidChatRequest
            raise failure(f"{source}: {error}", field=source) from error

    def _prompt(self, request: ChatRequest) -> tuple[ToolChoice, list[dict[str, Any]], list[int]]:
        """The tool choice, the tools shown to the model and the prompt ids of a request."""
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
        return choice, shown, self.tokenizer.encode(prompt_text, add_special_tokens=True)

    def _requires_call(self, choice: ToolChoice, messages: list[dict[str, Any]]) -> bool:
        """Whether the node option turns this "auto" into a forced call. Formats without a
        call grammar stay "auto": a request the model could serve must not fail because of
        a node option."""
        return (
            self.require_tool_on_user_turn
            and choice == "auto"
            and self.tool_format in TOOL_CALL_FORMATS
            and _user_turn(messages)
        )

    def count_prompt_tokens(self, request: ChatRequest) -> int:
        """How many tokens `prepare` would put in the prompt (no context check)."""
        return len(self._prompt(request)[2])

    def prepare(self, request: ChatRequest, *, request_id: str | None = None) -> PreparedChat:
        """Validate against the model and render the prompt; raises `InvalidChatRequest`.

        `request_id` names the generation in the engine and the logs; an API passes the id
        it answers with, so that both agree.
        """
        busy = self.generator.overloaded()
        if busy is not None:
            raise ServerBusy(str(busy), retry_after_s=busy.retry_after_s)
        choice, shown, prompt_ids = self._prompt(request)
        if self._requires_call(choice, request.messages):
            # One call, not several: small models repeat a call until the bound.
            choice = "required"
            request = replace(request, parallel_tool_calls=False)
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
        left = context - len(prompt_ids)
        default = left if self.default_max_tokens is None else min(self.default_max_tokens, left)
        max_tokens = requested if requested is not None else default
        constraint = self._constraint(request, shown, choice, max_tokens)
        wrap_up_after = 0
        if self.wrap_up_share > 0.0 and constraint is None:
            wrap_up_after = max(1, round(max_tokens * self.wrap_up_share))
        defaults = self.sampling_defaults
        sampling = SamplingParams(
            temperature=defaults.temperature
            if request.temperature is None
            else request.temperature,
            top_p=defaults.top_p if request.top_p is None else request.top_p,
            top_k=defaults.top_k if request.top_k is None else request.top_k,
            repetition_penalty=defaults.repetition_penalty
            if request.repetition_penalty is None
            else request.repetition_penalty,
            dry_multiplier=defaults.dry_multiplier
            if request.dry_multiplier is None
            else request.dry_multiplier,
            dry_base=SamplingParams.dry_base if request.dry_base is None else request.dry_base,
            dry_allowed_length=SamplingParams.dry_allowed_length
            if request.dry_allowed_length is None
            else request.dry_allowed_length,
            wrap_up_after=wrap_up_after,
            seed=request.seed,
            constraint=constraint,
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
        # Formats whose markers are special tokens: the text must keep them for the parser.
        keep_special = parser is not None and keeps_special_tokens(prepared.tool_format)
        emitted: set[int] = set()  # the indexes of the calls already yielded
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
                for event in _parsed_events(parser, parser.feed(item), emitted):
                    yield event
            else:  # Finished
                if parser is not None:
                    deltas = parser.finish(truncated=item.reason == "length")
                    for event in _parsed_events(parser, deltas, emitted):
                        yield event
                    if parser.tool_calls:
                        item = replace(item, reason="tool_calls")
                        if (record := current_record()) is not None:
                            record.finish_reason = "tool_calls"
                yield item

    def _logprobs(self, event: TokenEvent) -> LogprobsDelta:
        assert event.logprobs is not None  # generate_text passes only tokens that carry them
        return LogprobsDelta(
            self._scored(event.token_id, event.logprobs.logprob),
            tuple(self._scored(token_id, logprob) for token_id, logprob in event.logprobs.top),
        )

    def _scored(self, token_id: int, logprob: float) -> ScoredToken:
        return ScoredToken(self.tokenizer.decode([token_id], skip_special_tokens=False), logprob)


def _user_turn(messages: list[dict[str, Any]]) -> bool:
    """Whether the model answers a user's message that opens a task: the last message is
    the user's, and since the assistant last spoke there is no tool result and that
    message was not a text answer. After a text answer the next user message (a
    follow-up, or Claude Code's "Output token limit hit. Resume directly" when an answer
    was cut) is answered freely: forcing a call there gave Claude Code a call on every
    turn until its turn limit."""
    if not messages or messages[-1].get("role") != "user":
        return False
    for message in reversed(messages):
        role = message.get("role")
        if role == "tool":
            return False
        if role == "assistant":
            return bool(message.get("tool_calls"))
    return True


def _schema(value: object, source: str) -> dict[str, Any]:
    """A JSON schema sent as an object or as its JSON text (vLLM takes both)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            message = f"{source} is not valid JSON: {error}"
            raise InvalidChatRequest(message, field=source) from error
    if not isinstance(value, dict):
        raise InvalidChatRequest(f"{source} must be a JSON schema object", field=source)
    return cast(dict[str, Any], value)


def _parsed_events(
    parser: StreamingToolParser, deltas: list[StreamDelta], emitted: set[int]
) -> list[ChatEvent]:
    """The chat events for a batch of parser deltas, in order. A tool call is one event,
    yielded once it is whole: a long call's header streams before its arguments end."""
    events: list[ChatEvent] = []

    def completed_calls(up_to: int) -> None:
        for index, call in enumerate(parser.tool_calls[: up_to + 1]):
            if index not in emitted:
                emitted.add(index)
                events.append(ToolCallEvent(index, call))

    for delta in deltas:
        if delta.tool_call is not None:
            completed_calls(delta.tool_call["index"])
        elif delta.reasoning is not None:
            events.append(ReasoningDelta(delta.reasoning))
        else:
            events.append(ContentDelta(delta.content or ""))
    completed_calls(len(parser.tool_calls))  # calls that completed without a later delta
    return events
