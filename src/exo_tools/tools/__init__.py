"""Tool calling: parse model output into OpenAI tool calls, stream them, normalize
arguments against the declared schemas, and prepare history and prompts for chat
templates. Pure Python; no MLX and no other exo_tools package is imported.
See docs/TOOL_CALLING.md.
"""

from .choice import (
    ToolChoice,
    ToolChoiceError,
    forced_function,
    normalize_tool_choice,
    tools_for_choice,
)
from .format import ToolFormat
from .history import flatten_content, rewrite_history
from .parsers import StreamingToolParser, new_call_id, parse_tool_calls
from .registry import FORMATS, REGISTRY, get_format, infer_format, keeps_special_tokens
from .render import (
    add_tools_system_prompt,
    fold_tool_history,
    render_assistant_tool_calls,
    render_tool_result,
    render_tools_system_prompt,
)
from .results import FunctionDelta, ParsedOutput, StreamDelta, ToolCall, ToolCallDelta
from .schema import normalize_arguments

__all__ = [
    "FORMATS",
    "REGISTRY",
    "FunctionDelta",
    "ParsedOutput",
    "StreamDelta",
    "StreamingToolParser",
    "ToolCall",
    "ToolCallDelta",
    "ToolChoice",
    "ToolChoiceError",
    "ToolFormat",
    "add_tools_system_prompt",
    "flatten_content",
    "fold_tool_history",
    "forced_function",
    "get_format",
    "infer_format",
    "keeps_special_tokens",
    "new_call_id",
    "normalize_arguments",
    "normalize_tool_choice",
    "parse_tool_calls",
    "render_assistant_tool_calls",
    "render_tool_result",
    "render_tools_system_prompt",
    "rewrite_history",
    "tools_for_choice",
]
