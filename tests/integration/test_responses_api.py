"""The OpenAI Responses API of a real node, driven by the real `openai` SDK and the OpenAI
Agents SDK (in its default, Responses mode) over HTTP.

One node for the module, with `--require-tool-on-user-turn`, so that `tool_choice: auto`
on a user's turn is a call and an agent loop (call → result → answer) runs.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import agents
import jsonschema
import openai
import pytest
import requests

from tests.helpers.agent_tools import PERSON_PROMPT, PERSON_SCHEMA, WEATHER_PARAMETERS
from tests.helpers.nodes import NodeProcess, start_node

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m"
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather for a city.",
    "parameters": WEATHER_PARAMETERS,
    "strict": False,
}
QUESTION = "What is the weather in Paris?"


@pytest.fixture(scope="module")
def agent_node(model_path: Path) -> Iterator[NodeProcess]:
    process = start_node("--require-tool-on-user-turn")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(agent_node: NodeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{agent_node.url}/v1", api_key="unused", max_retries=0)


def function_calls(response: Any) -> list[Any]:
    return [item for item in response.output if item.type == "function_call"]


def assert_weather_call(call: Any) -> None:
    assert call.call_id and call.id and call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), WEATHER_TOOL["parameters"])


def test_function_call_round_trip_through_items(client: openai.OpenAI) -> None:
    first = client.responses.create(
        model=MODEL,
        input=QUESTION,
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_output_tokens=64,
        store=False,
    )
    assert first.object == "response" and first.status == "completed"
    [call] = function_calls(first)
    assert_weather_call(call)
    assert first.usage is not None and first.usage.input_tokens > 0
    items: list[Any] = [
        {"role": "user", "content": QUESTION},
        *[item.model_dump(exclude_none=True) for item in first.output],
        {"type": "function_call_output", "call_id": call.call_id, "output": "18C and rain"},
    ]
    second = client.responses.create(
        model=MODEL,
        input=items,
        instructions="Answer in one sentence.",
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        temperature=0,
        max_output_tokens=48,
        store=False,
    )
    assert not function_calls(second)
    assert second.output_text.strip()
    assert second.output[0].type == "message"
    # Not stored: nothing to continue from.
    with pytest.raises(openai.BadRequestError, match="not found"):
        client.responses.create(model=MODEL, input="x", previous_response_id=first.id)


def test_round_trip_through_previous_response_id(client: openai.OpenAI) -> None:
    # tool_choice auto on the user's turn: the node option makes it a call.
    first = client.responses.create(
        model=MODEL,
        input=QUESTION,
        instructions="You check the weather.",
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        temperature=0,
        max_output_tokens=64,
    )
    [call] = function_calls(first)
    assert_weather_call(call)
    second = client.responses.create(
        model=MODEL,
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "18C"}],
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        temperature=0,
        max_output_tokens=48,
    )
    assert second.previous_response_id == first.id
    assert not function_calls(second) and second.output_text.strip()
    # Stored responses read back and delete.
    again = client.responses.retrieve(first.id)
    assert again.id == first.id and function_calls(again)[0].arguments == call.arguments
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    # The follow-up still holds the whole conversation.
    third = client.responses.create(
        model=MODEL,
        previous_response_id=second.id,
        input="Thanks!",
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        tool_choice="none",
        max_output_tokens=4,
    )
    # The same conversation sent as items gives the same prompt (instructions are not
    # carried over, as OpenAI does).
    explicit = client.responses.create(
        model=MODEL,
        input=[
            {"role": "user", "content": QUESTION},
            {
                "type": "function_call",
                "call_id": call.call_id,
                "name": call.name,
                "arguments": call.arguments,
            },
            {"type": "function_call_output", "call_id": call.call_id, "output": "18C"},
            {"role": "assistant", "content": second.output_text},
            {"role": "user", "content": "Thanks!"},
        ],
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        tool_choice="none",
        max_output_tokens=4,
        store=False,
    )
    assert third.usage is not None and explicit.usage is not None
    assert third.usage.input_tokens == explicit.usage.input_tokens


def test_streamed_events_in_order(client: openai.OpenAI) -> None:
    with client.responses.stream(
        model=MODEL,
        input=QUESTION,
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        tool_choice={"type": "function", "name": "get_weather"},
        temperature=0,
        max_output_tokens=64,
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [event.type for event in events]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    [call] = function_calls(final)
    assert_weather_call(call)
    assert events[4].arguments == call.arguments

    # Cut by max_output_tokens: the stream ends with response.incomplete.
    events = list(
        client.responses.create(
            model=MODEL,
            input="Count from one to twenty.",
            temperature=0,
            max_output_tokens=5,
            stream=True,
        )
    )
    final = events[-1].response
    kinds = [event.type for event in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert deltas and "".join(deltas) == final.output_text
    assert final.status == "incomplete"
    assert final.incomplete_details is not None
    assert final.incomplete_details.reason == "max_output_tokens"


def test_text_format_json_schema(client: openai.OpenAI) -> None:
    schema = PERSON_SCHEMA
    response = client.responses.create(
        model=MODEL,
        input=PERSON_PROMPT,
        text={"format": {"type": "json_schema", "name": "person", "schema": schema}},
        temperature=0,
        max_output_tokens=96,
    )
    jsonschema.validate(json.loads(response.output_text), schema)


def test_bad_input_gives_openai_shaped_errors(agent_node: NodeProcess) -> None:
    def error_of(body: dict[str, Any], status: int = 400) -> dict[str, Any]:
        reply = requests.post(f"{agent_node.url}/v1/responses", json=body, timeout=60)
        assert reply.status_code == status, reply.text
        return reply.json()["error"]

    assert "input" in error_of({"model": MODEL})["message"]
    unknown_item = {"model": MODEL, "input": [{"type": "computer_call_output", "call_id": "x"}]}
    assert "computer_call_output" in error_of(unknown_item)["message"]
    image = {"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}
    assert error_of({"model": MODEL, "input": [image]})["param"] == "input[0].content[0]"
    bad_choice = {"model": MODEL, "input": "x", "tools": [WEATHER_TOOL], "tool_choice": "maybe"}
    assert error_of(bad_choice)["param"] == "tool_choice"
    assert error_of({"model": "gpt-5", "input": "x"}, 404)["code"] == "model_not_found"
    reply = requests.get(f"{agent_node.url}/v1/responses/resp_nope", timeout=10)
    assert reply.status_code == 404 and "resp_nope" in reply.json()["error"]["message"]


def test_agents_sdk_in_its_default_mode_runs_an_agent_with_a_tool(
    agent_node: NodeProcess,
) -> None:
    agents.set_tracing_disabled(True)  # offline: no trace export
    calls: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Current weather for a city."""
        calls.append(city)
        return "18C and rain"

    client = openai.AsyncOpenAI(base_url=f"{agent_node.url}/v1", api_key="unused")
    agent = agents.Agent(
        name="weather",
        instructions="You answer questions about the weather. Use the tool.",
        tools=[get_weather],
        model=agents.OpenAIResponsesModel(model=MODEL, openai_client=client),
        model_settings=agents.ModelSettings(temperature=0, max_tokens=64),
    )
    result = asyncio.run(agents.Runner.run(agent, QUESTION, max_turns=4))
    assert calls, "the agent never ran its tool"
    assert isinstance(result.final_output, str) and result.final_output.strip()
    kinds = [item.type for item in result.new_items]
    assert kinds[:2] == ["tool_call_item", "tool_call_output_item"]
    assert kinds[-1] == "message_output_item"
