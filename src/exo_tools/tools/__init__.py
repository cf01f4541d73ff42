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
from .history import flatten_content, rewrite_history
from .parsers import FORMATS, StreamingToolParser, new_call_id, parse_tool_calls
from .render import (
    add_tools_system_prompt,
    fold_tool_history,
    infer_format,
    render_assistant_tool_calls,
    render_tool_result,
    render_tools_system_prompt,
)
from .results import FunctionDelta, ParsedOutput, StreamDelta, ToolCall, ToolCallDelta
from .schema import normalize_arguments

__all__ = [
    "FORMATS",
    "FunctionDelta",
    "ParsedOutput",
    "StreamDelta",
    "StreamingToolParser",
    "ToolCall",
    "ToolCallDelta",
    "ToolChoice",
    "ToolChoiceError",
    "add_tools_system_prompt",
    "flatten_content",
    "fold_tool_history",
    "forced_function",
    "infer_format",
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
