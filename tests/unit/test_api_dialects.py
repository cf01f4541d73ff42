"""The Anthropic Messages and OpenAI Responses adapters map their bodies onto the same
serving request as chat completions; the response store is bounded."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from pydantic import ValidationError

from exo_tools.api import anthropic_messages, openai_responses
from exo_tools.api.errors import APIError
from exo_tools.api.response_store import ResponseStore, StoredResponse
from exo_tools.serving.chat import _user_turn
from exo_tools.serving.events import ChatEvent, ContentDelta, Finished

WEATHER = {
    "name": "get_weather",
    "description": "Current weather for a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}


def anthropic_body(**fields: object) -> anthropic_messages.MessagesRequest:
    return anthropic_messages.MessagesRequest.model_validate(
        {"model": "m", "max_tokens": 8, **fields}
    )


def test_anthropic_history_becomes_chat_messages() -> None:
    body = anthropic_body(
        system=[
            {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1;"},
            {"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}},
        ],
        messages=[
            {"role": "system", "content": "Also be kind."},
            {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "hmm", "signature": "s"},
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "P"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "t1", "content": "18C"},
                    {
                        "type": "tool_result",
                        "tool_use_id": "t2",
                        "is_error": True,
                        "content": [{"type": "text", "text": "no city"}],
                    },
                    {"type": "text", "text": "<system-reminder>x</system-reminder>"},
                ],
            },
        ],
        tools=[WEATHER, {"type": "web_search_20250305", "name": "web_search"}],
        tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
        stop_sequences=["END"],
        temperature=0.5,
        thinking={"type": "enabled", "budget_tokens": 1024},
    )
    request = anthropic_messages.to_chat_request(body)
    # The per-request billing header is not part of the prompt (it would break the cached
    # prefix of every turn).
    system = "Be brief.\n\nAlso be kind."
    assert request.messages == [
        {"role": "system", "content": system},
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {
                    "id": "t1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "P"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "t1", "content": "18C"},
        {"role": "tool", "tool_call_id": "t2", "content": "Error: no city"},
        {"role": "user", "content": "<system-reminder>x</system-reminder>"},
    ]
    # The server tool is not offered; the custom one is, as a function.
    assert [tool["function"]["name"] for tool in request.tools] == ["get_weather"]
    assert request.tools[0]["function"]["parameters"] == WEATHER["input_schema"]
    assert request.tool_choice == {"type": "function", "function": {"name": "get_weather"}}
    assert request.parallel_tool_calls is False
    assert request.stop == ("END",) and request.max_tokens == 8 and request.temperature == 0.5


def test_anthropic_tool_choices() -> None:
    for given, expected in [("auto", "auto"), ("any", "required"), ("none", "none")]:
        body = anthropic_body(
            messages=[{"role": "user", "content": "x"}], tool_choice={"type": given}
        )
        assert anthropic_messages.to_chat_request(body).tool_choice == expected


def test_anthropic_unsupported_block_names_its_type() -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": ""}}
    with pytest.raises(ValidationError, match="'image' is not supported"):
        anthropic_body(messages=[{"role": "user", "content": [image]}])


def test_count_tokens_body_needs_no_max_tokens() -> None:
    body = anthropic_messages.CountTokensRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    )
    request = anthropic_messages.to_chat_request(body)
    assert request.max_tokens is None and request.messages == [{"role": "user", "content": "x"}]


def responses_body(**fields: object) -> openai_responses.ResponsesRequest:
    return openai_responses.ResponsesRequest.model_validate({"model": "m", **fields})


def test_responses_items_become_chat_messages() -> None:
    body = responses_body(
        instructions="Be brief.",
        input=[
            {"role": "developer", "content": "Use tools."},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Checking.", "annotations": []}],
            },
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "function_call", "call_id": "c2", "name": "g", "arguments": '{"a": 1}'},
            {"type": "function_call_output", "call_id": "c1", "output": "one"},
            {
                "type": "function_call_output",
                "call_id": "c2",
                "output": [{"type": "input_text", "text": "two"}],
            },
            {"type": "function_call", "call_id": "c3", "name": "f", "arguments": "{}"},
        ],
        tools=[
            {"type": "function", "name": "f", "parameters": {"type": "object"}, "strict": True},
            {"type": "function", "name": "g"},
            {"type": "web_search"},
            {"type": "custom", "name": "apply_patch"},
        ],
        tool_choice={"type": "function", "name": "f"},
        text={"format": {"type": "json_schema", "name": "s", "schema": {"type": "object"}}},
        max_output_tokens=16,
    )
    request = openai_responses.to_chat_request(body, body.input_items())

    def call(call_id: str, name: str, arguments: str) -> dict[str, object]:
        return {
            "id": call_id,
            "type": "function",
            "function": {"name": name, "arguments": arguments},
        }

    assert request.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Hi"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [call("c1", "f", "{}"), call("c2", "g", '{"a": 1}')],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "one"},
        {"role": "tool", "tool_call_id": "c2", "content": "two"},
        {"role": "assistant", "content": "", "tool_calls": [call("c3", "f", "{}")]},
    ]
    assert [tool["function"]["name"] for tool in request.tools] == ["f", "g"]
    assert request.tools[0]["function"] == {
        "name": "f",
        "parameters": {"type": "object"},
        "strict": True,
    }
    assert request.tool_choice == {"type": "function", "name": "f"}
    assert request.response_format is not None
    assert request.response_format.kind == "json_schema"
    assert request.response_format.schema == {"type": "object"}
    assert request.max_tokens == 16


def test_responses_unsupported_items_and_parts() -> None:
    with pytest.raises(ValidationError, match="'computer_call' is not supported"):
        responses_body(input=[{"type": "computer_call", "call_id": "x"}])
    body = responses_body(input=[{"role": "user", "content": [{"type": "input_image"}]}])
    with pytest.raises(APIError) as raised:
        openai_responses.to_chat_request(body, body.input_items())
    assert raised.value.param == "input[0].content[0]" and raised.value.status == 400


def test_previous_response_id_continues_the_stored_conversation() -> None:
    store = ResponseStore(capacity=2)
    first = [{"type": "message", "role": "user", "content": "Hi"}]
    output = {
        "type": "message",
        "role": "assistant",
        "content": [{"type": "output_text", "text": "Yo"}],
    }
    store.put(StoredResponse({"id": "resp_1"}, (*first, output)))
    body = responses_body(previous_response_id="resp_1", input="And?")
    items = openai_responses.conversation_items(body, store)
    messages = openai_responses.to_chat_request(body, items).messages
    assert [m["content"] for m in messages] == ["Hi", "Yo", "And?"]
    with pytest.raises(APIError, match="resp_nope"):
        openai_responses.conversation_items(
            responses_body(previous_response_id="resp_nope", input="x"), store
        )
    # Least recently used goes first.
    store.put(StoredResponse({"id": "resp_2"}, ()))
    assert store.get("resp_1") is not None
    store.put(StoredResponse({"id": "resp_3"}, ()))
    assert store.get("resp_2") is None and store.get("resp_1") is not None
    assert store.delete("resp_1") and not store.delete("resp_1")


def test_user_turn_is_the_users_message_with_no_tool_result_or_answer_since_the_assistant() -> None:
    user = {"role": "user", "content": "x"}
    call = {"role": "assistant", "content": "", "tool_calls": [{"id": "1", "type": "function"}]}
    answer = {"role": "assistant", "content": "It says hi.", "tool_calls": []}
    tool = {"role": "tool", "tool_call_id": "1", "content": "r"}
    assert _user_turn([{"role": "system", "content": "s"}, user])
    assert _user_turn([user, call, user])
    # After a text answer: a follow-up, or a client's "continue" after a cut answer.
    assert not _user_turn([user, call, tool, answer, user])
    assert not _user_turn([user, answer, user])
    assistant = call
    assert not _user_turn([user, assistant, tool])
    # Claude Code puts text beside tool results: still a tool result's turn.
    assert not _user_turn([user, assistant, tool, user])
    assert not _user_turn([user, assistant])
    assert not _user_turn([])


def test_anthropic_error_shape() -> None:
    error = APIError(404, "model 'x' does not exist")
    assert error.anthropic_body() == {
        "type": "error",
        "error": {"type": "not_found_error", "message": "model 'x' does not exist"},
    }
    assert json.loads(json.dumps(error.body()))["error"]["type"] == "invalid_request_error"


def _sse(raw: bytes) -> tuple[str | None, dict[str, object]]:
    lines = raw.decode().strip().split("\n")
    name = lines[0].removeprefix("event: ") if lines[0].startswith("event: ") else None
    return name, json.loads(lines[-1].removeprefix("data: "))


def test_an_error_after_a_stream_began_is_each_dialects_last_event() -> None:
    error = APIError(503, "the master was lost mid-answer", code="master_lost")
    name, data = _sse(error.stream_event("/v1/messages", 7))
    assert name == "error" and data == error.anthropic_body()
    name, data = _sse(error.stream_event("/v1/responses", 7))
    assert name == "error"
    assert data == {
        "type": "error",
        "code": "master_lost",
        "message": "the master was lost mid-answer",
        "param": None,
        "sequence_number": 7,
    }
    name, data = _sse(error.stream_event("/v1/chat/completions", 7))
    assert name is None and data == error.body()


def _finished(failovers: int) -> Finished:
    return Finished("stop", 5, 2, 0.1, 0.1, failovers=failovers)


async def _events(failovers: int) -> AsyncIterator[ChatEvent]:
    yield ContentDelta("Hi")
    yield _finished(failovers)


@pytest.mark.parametrize("failovers", [0, 2])
def test_a_resumed_answer_says_so_in_each_dialect(failovers: int) -> None:
    start = anthropic_messages.Message(
        id="msg_1",
        model="m",
        content=[],
        stop_reason=None,
        stop_sequence=None,
        usage=anthropic_messages.Usage(input_tokens=5, output_tokens=0),
    )
    message = asyncio.run(anthropic_messages._complete(_events(failovers), start)).model_dump()
    response = openai_responses.ResponseObject(
        id="resp_1",
        created_at=0,
        status="in_progress",
        instructions=None,
        max_output_tokens=None,
        model="m",
        parallel_tool_calls=True,
        previous_response_id=None,
        store=False,
        temperature=0.0,
        text={},
        tool_choice="auto",
        tools=[],
        top_p=1.0,
    )
    openai_responses._finish(response, _finished(failovers))
    answered = response.model_dump()
    if failovers:
        assert message["failovers"] == failovers and answered["failovers"] == failovers
    else:  # an answer that never failed over carries no such field
        assert "failovers" not in message and "failovers" not in answered
    assert message["content"] == [{"type": "text", "text": "Hi"}]
