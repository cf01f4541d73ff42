"""What serving is asked to generate, in no API's dialect.

Each API (OpenAI chat completions, Anthropic Messages, OpenAI Responses) maps its request
body onto a `ChatRequest`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class ResponseFormat:
    """The shape the answer must take: free text, any JSON object, or JSON matching `schema`."""

    kind: Literal["text", "json_object", "json_schema"]
    # For "json_schema": the schema as the client sent it (serving checks it is an object).
    schema: object = None


GuidedKind = Literal["regex", "choice", "grammar", "json_schema", "json_object"]


@dataclass(frozen=True)
class GuidedOutput:
    """Output held to a regex, one of a list of strings, a grammar (Lark or GBNF) or a JSON
    schema: vLLM's structured outputs and llama.cpp's `grammar`, beside `response_format`.

    `value`: the pattern or grammar text (str), the choices (list of str), the schema (a
    dict, or its JSON text); True for "json_object". `source` is where the client put it
    (`guided_regex`, `structured_outputs.choice`, `grammar`), so errors name that field.
    """

    kind: GuidedKind
    value: object
    source: str


@dataclass(frozen=True)
class SamplingDefaults:
    """What a request that sets no temperature, top_p, top_k, repetition_penalty or
    dry_multiplier samples with: the APIs' own defaults (1.0, 1.0, none), or a node's
    (`--default-temperature` ...; a model card may recommend lower ones for small models,
    as llama.cpp's server and vLLM's generation config do)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    dry_multiplier: float = 0.0


@dataclass(frozen=True)
class ChatRequest:
    """One assistant turn to generate.

    `messages` and `tools` are in the form chat templates and `exo_tools.tools` work on:
    messages `{"role": "system"|"user"|"assistant"|"tool", "content": str, "name"?,
    "tool_calls"?: [{"id"?, "type": "function", "function": {"name", "arguments"}}],
    "tool_call_id"?}` and tools `{"type": "function", "function": {"name", "description"?,
    "parameters"?}}`. `tool_choice` is as `exo_tools.tools.normalize_tool_choice` accepts it.
    """

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] = field(default_factory=list)
    tool_choice: str | dict[str, Any] | None = None  # None: "auto" with tools
    parallel_tool_calls: bool = True
    max_tokens: int | None = None  # None: whatever the context leaves
    # None: the node's default (`SamplingDefaults`).
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # 0: no top-k filter
    repetition_penalty: float | None = None  # 1: none
    dry_multiplier: float | None = None  # 0: no DRY penalty
    dry_base: float | None = None  # None: SamplingParams' (llama.cpp's defaults)
    dry_allowed_length: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    response_format: ResponseFormat | None = None
    guided: GuidedOutput | None = None
    logprobs: bool = False
    top_logprobs: int = 0
