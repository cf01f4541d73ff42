"""The Anthropic Messages API of a real node, driven by the real `anthropic` SDK over HTTP.

One node for the module, with an API key (the SDK sends it as `x-api-key`) and
`--require-tool-on-user-turn`, so that `tool_choice: auto` on a user's turn is a call.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import jsonschema
import pytest
import requests

from tests.helpers.agent_tools import PERSON_PROMPT, PERSON_SCHEMA, WEATHER_PARAMETERS
from tests.helpers.nodes import NodeProcess, start_node

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m"
API_KEY = "anthropic-test-key"
WEATHER_TOOL: dict[str, Any] = {
    "name": "get_weather",
    "description": "Current weather for a city.",
    "input_schema": WEATHER_PARAMETERS,
}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
# The SDK (2.x) has no sampling parameters; the API still takes them, and greedy
# decoding makes the streamed and plain answers comparable.
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def agent_node(model_path: Path) -> Iterator[NodeProcess]:
    process = start_node("--api-key", API_KEY, "--require-tool-on-user-turn")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(agent_node: NodeProcess) -> Any:
    return anthropic.Anthropic(base_url=agent_node.url, api_key=API_KEY, max_retries=0)


def post(node: NodeProcess, path: str, body: dict[str, Any], **headers: str) -> requests.Response:
    headers.setdefault("x-api-key", API_KEY)
    return requests.post(f"{node.url}{path}", json=body, headers=headers, timeout=120)


def assert_weather_call(block: Any) -> None:
    assert block.type == "tool_use"
    assert block.id and block.name == "get_weather"
    jsonschema.validate(block.input, WEATHER_TOOL["input_schema"])


def test_named_tool_gives_a_valid_call_streamed_and_not(client: Any) -> None:
    common: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 64,
        "extra_body": GREEDY,
        "messages": QUESTION,
        "tools": [WEATHER_TOOL],
        "tool_choice": {"type": "tool", "name": "get_weather"},
    }
    message = client.messages.create(**common)
    assert message.type == "message" and message.role == "assistant"
    assert message.stop_reason == "tool_use"
    calls = [block for block in message.content if block.type == "tool_use"]
    assert len(calls) == 1
    assert_weather_call(calls[0])
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0

    with client.messages.stream(**common) as stream:
        events = list(stream)
        final = stream.get_final_message()
    kinds = [event.type for event in events]
    assert kinds[0] == "message_start"
    assert kinds[-1] == "message_stop"
    raw = [event for event in events if event.type == "content_block_delta"]
    assert raw and all(event.delta.type == "input_json_delta" for event in raw)
    assert final.stop_reason == "tool_use"
    [streamed] = [block for block in final.content if block.type == "tool_use"]
    assert_weather_call(streamed)
    # Greedy: the stream and the body agree (ids are fresh per message).
    assert streamed.input == calls[0].input
    assert final.usage.output_tokens == message.usage.output_tokens


def test_tool_use_then_tool_result_round_trip(client: Any) -> None:
    # tool_choice auto on the user's turn: the node option makes it a call.
    first = client.messages.create(
        model=MODEL, max_tokens=64, extra_body=GREEDY, messages=QUESTION, tools=[WEATHER_TOOL]
    )
    assert first.stop_reason == "tool_use"
    [call] = [block for block in first.content if block.type == "tool_use"]
    assert_weather_call(call)
    history = [
        *QUESTION,
        {"role": "assistant", "content": [block.model_dump() for block in first.content]},
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": call.id, "content": "18C and rain"},
                {"type": "text", "text": "Answer in one sentence."},
            ],
        },
    ]
    # After a tool result, auto is free again: the model answers in text.
    with client.messages.stream(
        model=MODEL, max_tokens=48, extra_body=GREEDY, messages=history, tools=[WEATHER_TOOL]
    ) as stream:
        text = "".join(stream.text_stream)
        answer = stream.get_final_message()
    assert answer.stop_reason in {"end_turn", "max_tokens"}
    assert text.strip()
    assert [block.type for block in answer.content] == ["text"]
    assert answer.content[0].text == text
    # An error result in blocks is accepted as well.
    history[-1]["content"] = [
        {
            "type": "tool_result",
            "tool_use_id": call.id,
            "is_error": True,
            "content": [{"type": "text", "text": "city not found"}],
        }
    ]
    again = client.messages.create(model=MODEL, max_tokens=8, messages=history)
    assert again.stop_reason in {"end_turn", "max_tokens"}


def test_count_tokens_equals_the_prompts_usage(client: Any) -> None:
    body: dict[str, Any] = {
        "model": MODEL,
        "system": [{"type": "text", "text": "You answer briefly."}],
        "messages": QUESTION,
        "tools": [WEATHER_TOOL],
        "tool_choice": {"type": "any"},
    }
    counted = client.messages.count_tokens(**body)
    message = client.messages.create(**body, max_tokens=48, extra_body=GREEDY)
    # Anthropic counts prompt tokens read from the (prefix) cache apart from the rest.
    usage = message.usage
    assert counted.input_tokens == usage.input_tokens + (usage.cache_read_input_tokens or 0)
    assert message.stop_reason == "tool_use"
    plain = client.messages.count_tokens(model=MODEL, messages=QUESTION)
    assert 0 < plain.input_tokens < counted.input_tokens


def test_stop_sequences_and_max_tokens(client: Any) -> None:
    question = [{"role": "user", "content": "What is the capital of France?"}]
    full = client.messages.create(model=MODEL, max_tokens=32, extra_body=GREEDY, messages=question)
    text = full.content[0].text
    assert "Paris" in text and full.stop_reason == "end_turn"
    stopped = client.messages.create(
        model=MODEL, max_tokens=32, extra_body=GREEDY, messages=question, stop_sequences=["Paris"]
    )
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == "Paris"
    assert "Paris" not in "".join(block.text for block in stopped.content)
    short = client.messages.create(model=MODEL, max_tokens=2, messages=question)
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 2


def test_output_config_format_json_schema(client: Any) -> None:
    schema = PERSON_SCHEMA
    message = client.messages.create(
        model=MODEL,
        max_tokens=96,
        extra_body=GREEDY,
        messages=[{"role": "user", "content": PERSON_PROMPT}],
        output_config={"format": {"type": "json_schema", "schema": schema}},
    )
    jsonschema.validate(json.loads(message.content[0].text), schema)


def test_claude_code_shaped_request(agent_node: NodeProcess) -> None:
    """What Claude Code sends: system blocks led by its billing header, a `system` role
    inside messages (also Xcode), `?beta=true`, and fields the node ignores."""
    body = {
        "model": MODEL,
        "max_tokens": 16,
        "stream": True,
        "system": [
            {
                "type": "text",
                "text": "x-anthropic-billing-header: cc_version=2.1.0; cc_entrypoint=cli;",
            },
            {"type": "text", "text": "Answer briefly.", "cache_control": {"type": "ephemeral"}},
        ],
        "messages": [
            {"role": "system", "content": "Be helpful."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "<system-reminder>cwd: /tmp</system-reminder>"},
                    {"type": "text", "text": "Say hi.", "cache_control": {"type": "ephemeral"}},
                ],
            },
        ],
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "context_management": {"edits": []},
        "output_config": {"effort": "low"},
        "metadata": {"user_id": "u"},
        "top_k": 40,
    }
    with requests.post(
        f"{agent_node.url}/v1/messages?beta=true",
        json=body,
        headers={"Authorization": f"Bearer {API_KEY}", "anthropic-version": "2023-06-01"},
        stream=True,
        timeout=120,
    ) as response:
        assert response.status_code == 200, response.text
        lines = [line.decode() for line in response.iter_lines() if line]
    names = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    datas = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    assert names == [data["type"] for data in datas]
    assert names[:2] == ["message_start", "ping"]
    assert names[-2:] == ["message_delta", "message_stop"]
    assert "content_block_start" in names and "content_block_stop" in names
    assert datas[-2]["delta"]["stop_reason"] in {"end_turn", "max_tokens"}


def error_of(response: requests.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["type"] == "error"
    assert set(body["error"]) >= {"type", "message"}
    return body["error"]


def test_bad_input_gives_anthropic_shaped_errors(agent_node: NodeProcess, client: Any) -> None:
    no_max_tokens = post(agent_node, "/v1/messages", {"model": MODEL, "messages": QUESTION})
    error = error_of(no_max_tokens, 400)
    assert error["type"] == "invalid_request_error" and "max_tokens" in error["message"]
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": ""}}
    body = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": [image]}]}
    assert "image" in error_of(post(agent_node, "/v1/messages", body), 400)["message"]
    unknown_tool = {
        "model": MODEL,
        "max_tokens": 4,
        "messages": QUESTION,
        "tools": [WEATHER_TOOL],
        "tool_choice": {"type": "tool", "name": "nope"},
    }
    assert "nope" in error_of(post(agent_node, "/v1/messages", unknown_tool), 400)["message"]
    too_long = {"model": MODEL, "max_tokens": 100_000, "messages": QUESTION}
    assert "context" in error_of(post(agent_node, "/v1/messages", too_long), 400)["message"]
    response = requests.post(
        f"{agent_node.url}/v1/messages",
        data=b"{not json",
        headers={"x-api-key": API_KEY},
        timeout=10,
    )
    error_of(response, 400)
    other_model = {"model": "claude-sonnet-4-5", "max_tokens": 4, "messages": QUESTION}
    assert error_of(post(agent_node, "/v1/messages", other_model), 404)["type"] == "not_found_error"
    wrong_key = post(agent_node, "/v1/messages/count_tokens", {}, **{"x-api-key": "wrong"})
    assert error_of(wrong_key, 401)["type"] == "authentication_error"
    # The SDK maps them onto its own exceptions.
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model=MODEL, max_tokens=4, messages=[])
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="claude-haiku-4-5", max_tokens=4, messages=QUESTION)
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(
            base_url=agent_node.url, api_key="wrong", max_retries=0
        ).messages.create(model=MODEL, max_tokens=4, messages=QUESTION)
