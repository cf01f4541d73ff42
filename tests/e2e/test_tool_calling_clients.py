"""Tool calling through a real node with real clients: requests, the OpenAI SDK, LangChain
(opencode, Claude Code and Codex run in tests/e2e/test_agent_clis.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.helpers.nodes import REPO, NodeProcess, start_node

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def chat(node: NodeProcess, **body: Any) -> requests.Response:
    body.setdefault("model", MODEL)
    return requests.post(f"{node.url}/v1/chat/completions", json=body, timeout=300)


def three_call_history() -> list[dict[str, Any]]:
    """What opencode sends back after the model made three calls in one message."""
    calls = [
        {
            "id": f"call_{n}",
            "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": city})},
        }
        for n, city in enumerate(["Paris", "Rome", "Oslo"])
    ]
    results = [
        {"role": "tool", "tool_call_id": f"call_{n}", "content": weather}
        for n, weather in enumerate(["18C rain", "27C sun", "4C snow"])
    ]
    return [
        {"role": "user", "content": "Weather in Paris, Rome and Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": calls},
        *results,
    ]


def test_llama31_card_accepts_history_with_three_calls(model_path: Path) -> None:
    template = REPO / "tests" / "unit" / "fixtures" / "llama31_tool_template.jinja"
    node = start_node("--chat-template", str(template), "--tool-format", "llama3_json")
    try:
        reply = chat(node, messages=three_call_history(), tools=[WEATHER_TOOL], max_tokens=8)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["finish_reason"] in {"stop", "length", "tool_calls"}
    finally:
        node.stop()


def test_tool_history_on_a_template_without_tools(node: NodeProcess) -> None:
    reply = chat(node, messages=three_call_history(), tools=[WEATHER_TOOL], max_tokens=16)
    assert reply.status_code == 200, reply.text
    message = reply.json()["choices"][0]["message"]
    assert message["role"] == "assistant"


def test_tool_choice_errors(node: NodeProcess) -> None:
    question = [{"role": "user", "content": "Weather in Paris?"}]
    named = {"type": "function", "function": {"name": "nope"}}
    reply = chat(node, messages=question, tools=[WEATHER_TOOL], tool_choice=named)
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["param"] == "tool_choice" and "nope" in error["message"]
    reply = chat(node, messages=question, tool_choice="required")
    assert reply.status_code == 400
    reply = chat(node, messages=question, tools=[{"type": "function", "function": {}}])
    assert reply.status_code == 400


def run_example(node: NodeProcess, *args: str) -> subprocess.CompletedProcess[str]:
    """examples/tool_calling_example.py against `node`, as a user runs it."""
    return subprocess.run(
        [
            sys.executable,
            str(REPO / "examples" / "tool_calling_example.py"),
            "--url",
            node.url,
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_example_script_runs_to_the_end(node: NodeProcess) -> None:
    result = run_example(node, "--max-turns", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip()


WEATHER_QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


def assert_weather_call(name: str, arguments: str, call_id: str) -> None:
    import jsonschema

    assert call_id
    assert name == "get_weather"
    jsonschema.validate(json.loads(arguments), WEATHER_TOOL["function"]["parameters"])


def test_openai_sdk_receives_well_formed_tool_calls(node: NodeProcess) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{node.url}/v1", api_key="unused")
    common: dict[str, Any] = {
        "model": MODEL,
        "messages": WEATHER_QUESTION,
        "tools": [WEATHER_TOOL],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "temperature": 0,
        "max_tokens": 64,
    }
    completion = client.chat.completions.create(**common)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert len(calls) == 1
    call = calls[0]
    assert call.type == "function"
    assert_weather_call(call.function.name, call.function.arguments, call.id)

    stream = client.chat.completions.create(
        **common, stream=True, stream_options={"include_usage": True}
    )
    first_deltas: dict[int, Any] = {}
    arguments: dict[int, str] = {}
    finish = None
    usage = None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for streamed in chunk.choices:
            finish = streamed.finish_reason or finish
            for delta in streamed.delta.tool_calls or []:
                if delta.index not in first_deltas:
                    # The AI SDK and the OpenAI SDK need id, type and name up front.
                    assert delta.id and delta.type == "function"
                    assert delta.function and delta.function.name
                    assert delta.function.arguments == ""
                    first_deltas[delta.index] = delta
                else:
                    assert delta.id is None and (delta.function is None or not delta.function.name)
                arguments[delta.index] = arguments.get(delta.index, "") + (
                    (delta.function.arguments if delta.function else None) or ""
                )
    assert finish == "tool_calls"
    assert usage is not None and usage.completion_tokens > 0
    assert list(first_deltas) == [0]
    assert_weather_call(first_deltas[0].function.name, arguments[0], first_deltas[0].id)
    # Streaming and non-streaming agree on the call (ids are fresh per response).
    assert json.loads(arguments[0]) == json.loads(call.function.arguments)


def test_named_function_and_parallel_calls(node: NodeProcess) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    reply = chat(
        node,
        messages=WEATHER_QUESTION,
        tools=[WEATHER_TOOL],
        tool_choice=named,
        temperature=0,
        max_tokens=64,
    ).json()
    calls = reply["choices"][0]["message"]["tool_calls"]
    assert len(calls) == 1
    assert_weather_call(
        calls[0]["function"]["name"], calls[0]["function"]["arguments"], calls[0]["id"]
    )


def test_langchain_bind_tools(node: NodeProcess) -> None:
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """Current weather for a city."""
        return "18C"

    llm = ChatOpenAI(
        base_url=f"{node.url}/v1", api_key="unused", model=MODEL, temperature=0, max_tokens=64
    )
    bound = llm.bind_tools([get_weather], tool_choice="any", parallel_tool_calls=False)
    message = bound.invoke("What is the weather in Paris?")
    assert len(message.tool_calls) == 1
    call = message.tool_calls[0]
    assert call["name"] == "get_weather" and isinstance(call["args"].get("city"), str)
    assert call["id"]


def test_response_format_json_schema(node: NodeProcess) -> None:
    import jsonschema

    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    reply = chat(
        node,
        messages=[{"role": "user", "content": "Ann is 31. Give her as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}},
        temperature=0,
        max_tokens=96,
    ).json()
    jsonschema.validate(json.loads(reply["choices"][0]["message"]["content"]), schema)
    unsupported = {"type": "object", "if": {"type": "object"}, "then": {}}
    reply = chat(
        node,
        messages=[{"role": "user", "content": "x"}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "p", "schema": unsupported},
        },
    )
    assert reply.status_code == 400
    assert "if" in reply.json()["error"]["message"]


def test_example_required_mode_executes_a_tool_then_answers(node: NodeProcess) -> None:
    result = run_example(node, "--required", "--max-turns", "3", "--max-tokens", "96")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    executed = [line for line in lines if line.strip().startswith("-> ")]
    assert executed, result.stdout
    assert "error" not in executed[0]
    # The loop ends with a text answer after the tool results went back.
    assert lines[-1].startswith("(finish_reason:"), result.stdout
