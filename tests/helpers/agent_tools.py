"""Tools shaped like opencode's built-in ones (read, bash, edit, glob), as
benchmarks/constrained_accuracy.py measures with them: JSON Schema draft 2020-12, closed
objects."""

from __future__ import annotations

from typing import Any

SCHEMA_2020 = "https://json-schema.org/draft/2020-12/schema"


def tool(
    name: str, description: str, properties: dict[str, Any], required: list[str]
) -> dict[str, Any]:
    """An OpenAI function tool over a closed draft 2020-12 object schema."""
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {
                "$schema": SCHEMA_2020,
                "type": "object",
                "properties": properties,
                "required": required,
                "additionalProperties": False,
            },
        },
    }


def string(description: str) -> dict[str, str]:
    return {"type": "string", "description": description}


def number(description: str) -> dict[str, str]:
    return {"type": "number", "description": description}


TOOLS: list[dict[str, Any]] = [
    tool(
        "read",
        "Reads a file from the local filesystem.",
        {
            "filePath": string("The absolute path to the file to read"),
            "offset": number("The line number to start reading from"),
            "limit": number("The number of lines to read"),
        },
        ["filePath"],
    ),
    tool(
        "bash",
        "Executes a given bash command in a persistent shell session.",
        {
            "command": string("The command to execute"),
            "description": string(
                "Clear, concise description of what this command does in 5-10 words"
            ),
            "timeout": number("Optional timeout in milliseconds"),
        },
        ["command"],
    ),
    tool(
        "edit",
        "Performs exact string replacements in files.",
        {
            "filePath": string("The absolute path to the file to modify"),
            "oldString": string("The text to replace"),
            "newString": string("The text to replace it with (must be different from oldString)"),
            "replaceAll": {"type": "boolean", "description": "Replace all occurrences"},
        },
        ["filePath", "oldString", "newString"],
    ),
    tool(
        "glob",
        "Fast file pattern matching tool that works with any codebase size.",
        {
            "pattern": string("The glob pattern to match files against"),
            "path": string("The directory to search in. Defaults to the current directory."),
        },
        ["pattern"],
    ),
]
TOOL_SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}

# One parameters schema for the weather tool every API test offers, and the person
# document the structured-output tests ask for.
WEATHER_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
}
PERSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
PERSON_PROMPT = "Ann is 31. Give her as JSON."
