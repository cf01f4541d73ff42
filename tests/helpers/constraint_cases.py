"""Tool-call and JSON cases for constrained decoding, shared by the in-process tests
(test_constraints.py) and the two-node pipeline and tensor test classes."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import requests

from exo_tools.models.catalog import DEFAULT_MODEL_ID
from tests.helpers.agent_tools import SCHEMA_2020, string, tool

# Shaped like opencode's built-in tools; the wording these tests were written against
# (benchmarks/constrained_accuracy.py measures with tests/helpers/agent_tools.TOOLS, worded
# slightly differently): a 135M model's greedy output depends on every word of the prompt.
TOOLS = [
    tool(
        "read",
        "Reads a file from the local filesystem.",
        {
            "filePath": string("The absolute path to the file to read"),
            "offset": {"type": "number", "description": "The line number to start reading from"},
            "limit": {"type": "number", "description": "The number of lines to read"},
        },
        ["filePath"],
    ),
    tool(
        "bash",
        "Executes a bash command in a shell.",
        {
            "command": string("The command to execute"),
            "description": string(
                "Clear, concise description of what this command does in 5-10 words"
            ),
            "timeout": {"type": "number", "description": "Optional timeout in milliseconds"},
        },
        ["command", "description"],
    ),
    tool(
        "edit",
        "Performs exact string replacements in files.",
        {
            "filePath": string("The absolute path to the file to modify"),
            "oldString": string("The text to replace"),
            "newString": string("The text to replace it with"),
            "replaceAll": {"type": "boolean", "description": "Replace all occurrences"},
        },
        ["filePath", "oldString", "newString"],
    ),
    tool(
        "glob",
        "Fast file pattern matching tool.",
        {
            "pattern": string("The glob pattern to match files against"),
            "path": string("The directory to search in"),
        },
        ["pattern"],
    ),
]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}

TOOL_PROMPTS = [
    "Read the file src/main.py",
    "List all python files in the repo",
    "Run the tests with pytest",
    "Replace foo with bar in app.js",
    "What's in README.md?",
    "Show me the git status",
    "Find all markdown files under docs",
    "Change the port from 8080 to 9090 in config.yaml",
    "Read lines 10 to 20 of server.py",
    "Count the lines of code in this project",
]

PERSON = {
    "$schema": SCHEMA_2020,
    "type": "object",
    "properties": {
        "name": {"type": "string", "description": "Full name"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "city": {"type": "string"},
        "hobbies": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "role": {"enum": ["engineer", "artist", "teacher", "other"]},
    },
    "required": ["name", "age", "role"],
    "additionalProperties": False,
}
JSON_SYSTEM = "Reply with a JSON object describing the person: name, age, city, hobbies, role."
JSON_PROMPTS = [
    "Alice is a 34 year old engineer from Paris who likes climbing.",
    "Describe a retired teacher named Bob.",
    "Make up a character for a fantasy novel.",
    "Tom, 12, plays football and chess in Leeds.",
    "My grandmother was a painter in Rome; she is 90.",
    "A software developer who loves hiking and coffee.",
    "Give me a random person.",
    "Maria teaches math in Madrid and is 45.",
    "An artist from Tokyo, age 28, who enjoys photography.",
    "Who is Sherlock Holmes?",
]


def valid_document(text: str) -> str:
    """ "" when `text` is a JSON document valid for PERSON, else what is wrong with it."""
    try:
        jsonschema.validate(json.loads(text), PERSON)
    except (ValueError, jsonschema.ValidationError) as error:
        return f"invalid: {str(error).splitlines()[0]}"
    return ""


def assert_constrained_requests_valid(node_url: str, parallelism: str) -> None:
    """The grammar runs where the model samples (the last pipeline stage, tensor rank 0):
    forced calls and schema documents stay valid when the model is split over nodes."""

    def chat(body: dict[str, Any]) -> dict[str, Any]:
        body = {"model": DEFAULT_MODEL_ID, "temperature": 0, "max_tokens": 96, **body}
        reply = requests.post(f"{node_url}/v1/chat/completions", json=body, timeout=300)
        assert reply.status_code == 200, reply.text
        return reply.json()

    named = {"type": "function", "function": {"name": "bash"}}
    for prompt, choice in [
        ("Read the file src/main.py", "required"),
        ("Run the tests with pytest", named),
    ]:
        message = {"role": "user", "content": prompt}
        body = {"messages": [message], "tools": TOOLS, "tool_choice": choice}
        answer = chat({**body, "parallel_tool_calls": False})["choices"][0]
        assert answer["finish_reason"] == "tool_calls", answer
        calls = answer["message"]["tool_calls"]
        assert len(calls) == 1, calls
        name = calls[0]["function"]["name"]
        assert choice == "required" or name == "bash", calls
        jsonschema.validate(json.loads(calls[0]["function"]["arguments"]), SCHEMAS[name])
    messages = [
        {"role": "system", "content": JSON_SYSTEM},
        {"role": "user", "content": JSON_PROMPTS[0]},
    ]
    response_format = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}
    reply = chat({"messages": messages, "response_format": response_format})
    answer = reply["choices"][0]
    assert answer["finish_reason"] == "stop", answer
    assert not valid_document(answer["message"]["content"]), answer
    if parallelism != "pipeline":
        return
    # A budget shorter than the model's own document: the sampler closes it in time
    # (without the budget the reply would be cut mid-document).
    budget = 18
    assert reply["usage"]["completion_tokens"] > budget, reply
    short = chat({"messages": messages, "response_format": response_format, "max_tokens": budget})
    assert short["usage"]["completion_tokens"] <= budget, short
    assert not valid_document(short["choices"][0]["message"]["content"]), short
