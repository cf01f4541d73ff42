"""What the server renders stays a prefix: turn N's prompt ids begin turn N+1's.

The prefix cache reuses a conversation's KV only as far as the prompt ids agree, so the
server's own rewriting (tools in the system prompt, tool calls and results folded into
text for templates without tools, the Llama 3.1 one-call-per-message history rewrite)
must render the earlier turns of a growing agent conversation identically each time.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from exo_tools.models.catalog import CATALOG, DEFAULT_MODEL_ID
from exo_tools.models.loader import load_model
from exo_tools.serving.chat import ChatService
from exo_tools.serving.request import ChatRequest
from tests.helpers.agent_tools import TOOLS
from tests.helpers.generators import PrepareOnly

LLAMA31 = Path(__file__).parents[1] / "unit" / "fixtures" / "llama31_tool_template.jinja"


def _call(call_id: str, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments)},
    }


def agent_turns() -> list[list[dict[str, Any]]]:
    """The message lists an agent sends on successive turns: each extends the last with
    the model's answer (text or calls, parallel ones too) and the tool results."""
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You are a coding agent. Use the tools."},
        {"role": "user", "content": "What is in notes.txt and in src/?"},
    ]
    turns = [list(messages)]
    steps: list[list[dict[str, Any]]] = [
        [
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    _call("c1", "read", {"filePath": "notes.txt"}),
                    _call("c2", "list", {"path": "src"}),
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "release on Friday"},
            {"role": "tool", "tool_call_id": "c2", "content": "app.py\nmath_utils.py"},
        ],
        [
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [_call("c3", "read", {"filePath": "src/app.py"})],
            },
            {"role": "tool", "tool_call_id": "c3", "content": "def main():\n    print('hi')"},
        ],
        [
            {"role": "assistant", "content": "notes.txt says: release on Friday."},
            {"role": "user", "content": "Thanks. Now run the tests."},
        ],
    ]
    for step in steps:
        messages = [*messages, *step]
        turns.append(list(messages))
    return turns


@pytest.fixture(scope="module")
def services(model_path: Path) -> dict[str, ChatService]:
    card = CATALOG[DEFAULT_MODEL_ID]
    made: dict[str, ChatService] = {}
    for name, template, fmt in [("hermes", None, None), ("llama3_json", LLAMA31, "llama3_json")]:
        loaded = load_model(
            card,
            model_path,
            dtype="native",
            progress=False,
            chat_template=template.read_text() if template else None,
        )
        shown_card = card.with_tool_format(fmt) if fmt else card
        # Rendering only: no generation runs here.
        made[name] = ChatService(shown_card, loaded.tokenizer, 8192, PrepareOnly())
    return made


@pytest.mark.parametrize("name", ["hermes", "llama3_json"])
def test_each_turn_prompt_begins_the_next(services: dict[str, ChatService], name: str) -> None:
    service = services[name]
    prompts = [
        service.prepare(ChatRequest(messages=messages, tools=TOOLS, temperature=0.0)).prompt_ids
        for messages in agent_turns()
    ]
    for turn, (earlier, later) in enumerate(itertools.pairwise(prompts), start=1):
        shared = next(
            (i for i, (a, b) in enumerate(zip(earlier, later, strict=False)) if a != b),
            min(len(earlier), len(later)),
        )
        # The earlier prompt ends with the assistant's generation prompt, which the next
        # turn renders as the start of that assistant message. Only where the generation
        # prompt ends in whitespace that the tokenizer joins with the answer's first
        # characters (Llama 3.1's "\n\n" here) may its last token differ.
        assert shared >= len(earlier) - (0 if name == "hermes" else 1), (name, turn, shared)
