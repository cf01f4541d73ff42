"""Concurrent requests against a real node or cluster return what each returns alone.

Nine chat completions of different lengths and sampling parameters (greedy, seeded
temperature, top-k, top-p, log-probabilities, one constrained by a JSON schema, one with a long prompt) run one
at a time and all at once; each must come back identical (text, finish reason, usage;
log-probabilities to float32 rounding), and the master's engine must have run batched
decode passes; meanwhile a tenth streams and its client goes away after a few chunks (the
callers then check that every node freed every request's state)."""

from __future__ import annotations

import json
import threading
from typing import Any

import requests

from tests.helpers.nodes import NodeProcess

MODEL = "smollm2-135m"
LOGPROB_ROUNDING = 1e-4
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}
LONG_TEXT = " ".join(
    f"Day {day}: the ship sailed {day * 7 % 40 + 10} miles and the crew counted {day * 3} gulls."
    for day in range(1, 25)
)
BODIES: list[dict[str, Any]] = [
    {"messages": "Tell me about the sea.", "max_tokens": 10, "temperature": 0},
    {
        "messages": "What is 2+2?",
        "max_tokens": 6,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 2,
    },
    {"messages": "Write a poem about a cat.", "max_tokens": 12, "temperature": 0.8, "seed": 11},
    {
        "messages": "List three colors.",
        "max_tokens": 10,
        "temperature": 0.7,
        "top_k": 20,
        "seed": 3,
    },
    {"messages": "Why is the sky blue?", "max_tokens": 10, "temperature": 0},
    {"messages": "Name a fruit.", "max_tokens": 4, "temperature": 1.0, "top_p": 0.9, "seed": 5},
    {
        "messages": "Describe a person.",
        "max_tokens": 16,
        "temperature": 0,
        "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}},
    },
    {"messages": "Count from one to twenty.", "max_tokens": 12, "temperature": 0},
    # A prompt of several hundred tokens: it prefills in chunks while the others decode
    # (on one node packed into their passes).
    {"messages": "Summarize: " + LONG_TEXT, "max_tokens": 8, "temperature": 0},
]


def _body(spec: dict[str, Any], **extra: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": spec["messages"]}]
    return {**spec, "model": MODEL, "messages": messages, **extra}


def _answer(node: NodeProcess, spec: dict[str, Any]) -> dict[str, Any]:
    reply = requests.post(f"{node.url}/v1/chat/completions", json=_body(spec), timeout=300)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    usage = dict(body["usage"])
    usage.pop("prompt_tokens_details", None)  # what the prefix cache served differs by run
    return {"choice": body["choices"][0], "usage": usage}


def _without_logprobs(answer: dict[str, Any]) -> dict[str, Any]:
    return {**answer, "choice": {**answer["choice"], "logprobs": None}}


def _assert_logprobs_close(one: dict[str, Any], many: dict[str, Any]) -> None:
    """The same tokens with the same log-probabilities, to float32 rounding: a batched
    pass's matmuls may add in another order than one row's."""
    first, second = one["choice"]["logprobs"], many["choice"]["logprobs"]
    if first is None:
        assert second is None
        return
    for a, b in zip(first["content"], second["content"], strict=True):
        assert a["token"] == b["token"]
        assert abs(a["logprob"] - b["logprob"]) < LOGPROB_ROUNDING, (a, b)
        assert [t["token"] for t in a["top_logprobs"]] == [t["token"] for t in b["top_logprobs"]]


def _concurrently(count: int, run: Any) -> list[Any]:
    results: list[Any] = [None] * count
    errors: list[BaseException] = []

    def target(index: int) -> None:
        try:
            results[index] = run(index)
        except BaseException as error:  # reported below, on the test's thread
            errors.append(error)

    threads = [threading.Thread(target=target, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not errors, errors
    return results


def _stream(node: NodeProcess, spec: dict[str, Any], stop_after: int | None = None) -> str:
    parts: list[str] = []
    with requests.post(
        f"{node.url}/v1/chat/completions", json=_body(spec, stream=True), stream=True, timeout=300
    ) as response:
        assert response.status_code == 200, response.text
        for line in response.iter_lines():
            if not line or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[len(b"data: ") :])
            assert "error" not in chunk, chunk
            parts += [c["delta"].get("content") or "" for c in chunk["choices"]]
            if stop_after is not None and len(parts) >= stop_after:
                break  # the client goes away mid-stream
    return "".join(parts)


def assert_concurrent_requests_match_alone(master: NodeProcess) -> None:
    """The nine requests all at once beside a tenth, streamed, whose client goes away
    after a few chunks, then alone: the nine are unchanged and shared batched passes."""
    before = master.health()["scheduler"]["decode_batches"]
    cancelled = {**BODIES[7], "max_tokens": 200}

    def run(index: int) -> Any:
        if index == len(BODIES):
            return _stream(master, cancelled, stop_after=3)
        return _answer(master, BODIES[index])

    # Together first: the prompts are new to the prefix cache, so they are prefilled while
    # the others decode (alone, afterwards, they are served from it).
    *together, _ = _concurrently(len(BODIES) + 1, run)
    alone = [_answer(master, spec) for spec in BODIES]
    for spec, one, many in zip(BODIES, alone, together, strict=True):
        assert _without_logprobs(many) == _without_logprobs(one), (spec, one, many)
        _assert_logprobs_close(one, many)
    assert master.health()["scheduler"]["decode_batches"] > before
