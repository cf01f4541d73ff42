"""The node as a real process, driven over HTTP with requests and the OpenAI SDK."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import openai
import pytest
import requests
from openapi_spec_validator import validate as validate_openapi
from prometheus_client.parser import text_string_to_metric_families

from benchmarks import fuzz_api
from exo_tools.models.catalog import CATALOG, DEFAULT_MODEL_ID
from exo_tools.models.loader import load_model
from tests.helpers.browser import dump_dom
from tests.helpers.cluster_runs import LOGPROB_TOLERANCE
from tests.helpers.concurrency import assert_concurrent_requests_match_alone
from tests.helpers.conversations import (
    assert_each_turn_reuses_the_last,
    assert_matches_cold_runs,
    converse,
)
from tests.helpers.mlx_lm_reference import reference_generate
from tests.helpers.nodes import NodeProcess, start_node

pytestmark = pytest.mark.slow
MODEL = DEFAULT_MODEL_ID

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain recursion in one sentence.",
]


def chat(node: NodeProcess, **body: Any) -> requests.Response:
    body.setdefault("model", MODEL)
    return requests.post(f"{node.url}/v1/chat/completions", json=body, timeout=120)


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def stream_chunks(node: NodeProcess, **body: Any) -> list[dict[str, Any] | str]:
    body.setdefault("model", MODEL)
    body["stream"] = True
    chunks: list[dict[str, Any] | str] = []
    with requests.post(
        f"{node.url}/v1/chat/completions", json=body, stream=True, timeout=120
    ) as response:
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if not line:
                continue
            assert line.startswith(b"data: ")
            data = line[len(b"data: ") :].decode()
            chunks.append(data if data == "[DONE]" else json.loads(data))
    return chunks


def streamed_text(chunks: list[dict[str, Any] | str]) -> str:
    return "".join(
        choice["delta"].get("content") or ""
        for chunk in chunks
        if isinstance(chunk, dict)
        for choice in chunk["choices"]
    )


def test_greedy_output_is_token_identical_to_mlx_lm(node: NodeProcess, model_path: Path) -> None:
    dtype = str(node.health()["dtype"])
    cases = [{"messages": user(prompt), "max_tokens": 24} for prompt in PROMPTS]
    reference = reference_generate(model_path, dtype, cases)
    tokenizer = load_model(CATALOG[MODEL], model_path, dtype="native", progress=False).tokenizer
    for case, expected_ids in zip(cases, reference, strict=True):
        expected_text = tokenizer.decode(expected_ids)
        reply = chat(node, messages=case["messages"], max_tokens=24, temperature=0).json()
        assert reply["choices"][0]["message"]["content"] == expected_text
        assert reply["usage"]["completion_tokens"] == len(expected_ids)
        # The same through the stream.
        chunks = stream_chunks(node, messages=case["messages"], max_tokens=24, temperature=0)
        assert streamed_text(chunks) == expected_text


def test_conversation_turns_reuse_the_prefix_cache(node: NodeProcess, model_path: Path) -> None:
    tokenizer = load_model(CATALOG[MODEL], model_path, dtype="native", progress=False).tokenizer
    turns = converse(node)
    assert_each_turn_reuses_the_last(turns)
    assert_matches_cold_runs(turns, model_path, tokenizer)
    stats = node.health()["prefix_cache"]
    assert stats["entries"] >= 1 and stats["bytes"] > 0
    assert stats["cached_prompt_tokens"] >= sum(turn.cached_tokens for turn in turns)
    assert 0 < stats["hit_rate"] <= 1


def test_sensible_answer_and_usage(node: NodeProcess) -> None:
    reply = chat(node, messages=user("What is the capital of France?"), temperature=0).json()
    choice = reply["choices"][0]
    assert "Paris" in choice["message"]["content"]
    assert choice["finish_reason"] == "stop"
    usage = reply["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert reply["object"] == "chat.completion"
    assert reply["id"].startswith("chatcmpl-")


def test_content_parts_and_max_completion_tokens(node: NodeProcess) -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "Say hello."}]}]
    reply = chat(node, messages=messages, max_completion_tokens=3, temperature=0).json()
    assert reply["choices"][0]["finish_reason"] == "length"
    assert reply["usage"]["completion_tokens"] == 3


def test_streaming_shape_and_usage(node: NodeProcess) -> None:
    chunks = stream_chunks(
        node,
        messages=user("Count from one to ten."),
        max_tokens=10,
        temperature=0,
        stream_options={"include_usage": True},
    )
    assert chunks[-1] == "[DONE]"
    objects = [chunk for chunk in chunks if isinstance(chunk, dict)]
    assert objects[0]["choices"][0]["delta"]["role"] == "assistant"
    assert objects[-2]["choices"][0]["finish_reason"] == "length"
    usage_chunk = objects[-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 10
    assert len({chunk["id"] for chunk in objects}) == 1
    # Without include_usage there is no usage chunk.
    plain = [
        c for c in stream_chunks(node, messages=user("Hi"), max_tokens=3) if isinstance(c, dict)
    ]
    assert all("usage" not in chunk for chunk in plain)


def test_stop_strings_never_leak(node: NodeProcess) -> None:
    question = user("What is the capital of France?")
    full = chat(node, messages=question, temperature=0).json()["choices"][0]["message"]["content"]
    assert "apital of Fr" in full
    # A stop string that spans several tokens, in both modes.
    for stop in ["apital of Fr", ["zzz", "of France"]]:
        reply = chat(node, messages=question, temperature=0, stop=stop).json()
        content = reply["choices"][0]["message"]["content"]
        stops = [stop] if isinstance(stop, str) else stop
        assert full.startswith(content)
        assert all(s not in content for s in stops)
        assert reply["choices"][0]["finish_reason"] == "stop"
        streamed = streamed_text(stream_chunks(node, messages=question, temperature=0, stop=stop))
        assert streamed == content


def test_seeded_sampling_is_reproducible(node: NodeProcess) -> None:
    body = {"messages": user("Tell me a story."), "max_tokens": 16, "temperature": 1.0}
    first = chat(node, seed=1234, **body).json()["choices"][0]["message"]["content"]
    second = chat(node, seed=1234, **body).json()["choices"][0]["message"]["content"]
    assert first == second


def test_concurrent_requests_match_each_alone(node: NodeProcess) -> None:
    before = node.health()["scheduler"]["packed_chunks"]
    assert_concurrent_requests_match_alone(node)
    # On one node, prompts that arrived while others decoded were prefilled in their passes.
    assert node.health()["scheduler"]["packed_chunks"] > before


def test_client_disconnect_stops_generation(node: NodeProcess) -> None:
    body = {
        "model": MODEL,
        "messages": user("Write a very long essay about the history of Europe."),
        "max_tokens": 2000,
        "temperature": 0,
        "stream": True,
    }
    response = requests.post(f"{node.url}/v1/chat/completions", json=body, stream=True, timeout=60)
    lines = response.iter_lines()
    received = 0
    for line in lines:
        if line:
            received += 1
        if received >= 3:
            break
    assert node.health()["active_requests"] == 1
    response.close()
    deadline = time.monotonic() + 10
    while node.health()["active_requests"] != 0:
        assert time.monotonic() < deadline, "generation kept running after the client left"
        time.sleep(0.1)
    # The node still serves.
    assert chat(node, messages=user("Hi"), max_tokens=2).status_code == 200


def test_models_and_health(node: NodeProcess) -> None:
    models = requests.get(f"{node.url}/v1/models", timeout=10).json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [MODEL]
    assert requests.get(f"{node.url}/v1/models/{MODEL}", timeout=10).status_code == 200
    missing = requests.get(f"{node.url}/v1/models/nope", timeout=10)
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"
    assert node.health()["status"] == "ready"


def _error(response: requests.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    return error


def test_errors(node: NodeProcess) -> None:
    url = f"{node.url}/v1/chat/completions"
    error = _error(requests.post(url, data=b"{not json", timeout=10), 400)
    assert "JSON" in error["message"]
    error = _error(requests.post(url, json={"model": MODEL}, timeout=10), 400)
    assert error["param"] == "messages"
    error = _error(chat(node, messages=user("hi"), temperature=5), 400)
    assert error["param"] == "temperature"
    error = _error(chat(node, messages=[{"role": "wizard", "content": "hi"}]), 400)
    assert error["param"].startswith("messages.0")
    error = _error(chat(node, messages=user("hi"), max_tokens=0), 400)
    assert error["param"] == "max_tokens"
    error = _error(chat(node, model="gpt-9", messages=user("hi")), 404)
    assert error["code"] == "model_not_found"
    error = _error(chat(node, messages=user("hi"), max_tokens=9000), 400)
    assert error["code"] == "context_length_exceeded"
    error = _error(chat(node, messages=user("word " * 9000)), 400)
    assert error["code"] == "context_length_exceeded"
    oversized = {"model": MODEL, "messages": user("x" * (9 * 1024 * 1024))}
    _error(requests.post(url, json=oversized, timeout=30), 413)
    image = [{"type": "image_url", "image_url": {"url": "data:,"}}]
    _error(chat(node, messages=[{"role": "user", "content": image}]), 400)
    _error(requests.get(f"{node.url}/v1/nothing", timeout=10), 404)
    # Seeds are unsigned 64-bit (MLX's key); out of range is the client's error.
    for seed in (-1, 2**64):
        assert _error(chat(node, messages=user("hi"), seed=seed), 400)["param"] == "seed"
    assert chat(node, messages=user("hi"), seed=11805916207174113034, max_tokens=2).ok
    # Bodies no tokenizer or validator can take: 100,000 nested arrays, a lone surrogate.
    deep = b'{"model": "m", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    for route in ("/v1/chat/completions", "/v1/messages", "/v1/responses"):
        answer = requests.post(f"{node.url}{route}", data=deep, timeout=30)
        assert answer.status_code == 400 and "levels deep" in answer.text, answer.text
    surrogate = b'{"model": "smollm2-135m", "messages": [{"role": "user", "content": "\\ud800"}]}'
    error = _error(requests.post(url, data=surrogate, timeout=10), 400)
    assert "messages.0.content" in error["message"] and "surrogate" in error["message"]
    # After all that, the node still answers.
    assert chat(node, messages=user("Hi"), max_tokens=2).status_code == 200


def test_logprobs_streamed_and_not(node: NodeProcess, reference_runs: dict[str, Any]) -> None:
    prompt = next(iter(reference_runs))
    body = {"messages": user(prompt), "max_tokens": 4, "temperature": 0, "logprobs": True}
    whole = chat(node, top_logprobs=3, **body).json()
    entries = whole["choices"][0]["logprobs"]["content"]
    assert len(entries) == whole["usage"]["completion_tokens"] == 4
    assert "".join(e["token"] for e in entries) == whole["choices"][0]["message"]["content"]
    for entry, (logprob, _) in zip(entries, reference_runs[prompt]["logprobs"], strict=False):
        assert abs(entry["logprob"] - logprob) <= LOGPROB_TOLERANCE
        # Greedy: the chosen token is the most likely one, and bytes spell the token.
        assert entry["top_logprobs"][0]["logprob"] == entry["logprob"]
        assert len(entry["top_logprobs"]) == 3
        assert bytes(entry["bytes"]).decode() == entry["token"]
    chunks = stream_chunks(node, **body)
    streamed = [
        e
        for chunk in chunks
        if isinstance(chunk, dict)
        for choice in chunk["choices"]
        for e in (choice.get("logprobs") or {}).get("content", [])
    ]
    assert [e["token"] for e in streamed] == [e["token"] for e in entries]
    assert all(e["top_logprobs"] == [] for e in streamed)
    # Without logprobs the field stays null.
    plain = chat(node, messages=user(prompt), max_tokens=2).json()
    assert plain["choices"][0]["logprobs"] is None
    error = _error(chat(node, messages=user("hi"), top_logprobs=2), 400)
    assert error["param"] == "top_logprobs"
    error = _error(chat(node, messages=user("hi"), logprobs=True, top_logprobs=21), 400)
    assert error["param"] == "top_logprobs"


def test_openai_sdk(node: NodeProcess) -> None:
    client = openai.OpenAI(base_url=f"{node.url}/v1", api_key="unused")
    completion = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
    )
    text = completion.choices[0].message.content or ""
    assert "Paris" in text
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces: list[str] = []
    usage = None
    for event in stream:
        if event.choices:
            pieces.append(event.choices[0].delta.content or "")
        if event.usage:
            usage = event.usage
    assert "".join(pieces) == text
    assert usage is not None and usage.completion_tokens == completion.usage.completion_tokens
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[])


def _samples(node: NodeProcess) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the node's /metrics, parsed by prometheus_client's own parser."""
    text = requests.get(f"{node.url}/metrics", timeout=10).text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _metric(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metrics_access_log_and_request_ids(node: NodeProcess) -> None:
    chat_route = {"method": "POST", "route": "/v1/chat/completions", "status": "200"}
    api = {"api": "chat.completions"}
    before = _samples(node)
    plain = chat(node, messages=user("Name a color."), max_tokens=6, temperature=0)
    given_id = "client-chosen.id-42"
    streamed_body = {
        "model": MODEL,
        "messages": user("Count to five."),
        "max_tokens": 8,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with requests.post(
        f"{node.url}/v1/chat/completions",
        json=streamed_body,
        headers={"X-Request-Id": given_id},
        stream=True,
        timeout=120,
    ) as streamed:
        assert streamed.headers["X-Request-Id"] == given_id  # a client's own id is kept
        lines = b"".join(streamed.iter_content(None)).split(b"\n")
    chunks = [json.loads(line[6:]) for line in lines if line.startswith(b"data: {")]
    streamed_usage = next(chunk["usage"] for chunk in chunks if chunk.get("usage"))
    bad = chat(node, messages=user("hi"), temperature=5)
    after = _samples(node)

    def grew(name: str, **labels: str) -> float:
        return _metric(after, name, **labels) - _metric(before, name, **labels)

    assert grew("exo_tools_requests_total", **chat_route) == 2
    assert grew("exo_tools_requests_total", **{**chat_route, "status": "400"}) == 1
    assert grew("exo_tools_time_to_first_token_seconds_count", **api) == 2
    plain_usage = plain.json()["usage"]
    prompts = plain_usage["prompt_tokens"] + streamed_usage["prompt_tokens"]
    assert grew("exo_tools_prompt_tokens_total", **api) == prompts
    completion = grew("exo_tools_completion_tokens_total", **api)
    assert completion == plain_usage["completion_tokens"] + streamed_usage["completion_tokens"]
    # Every token after a request's first is one inter-token gap.
    assert grew("exo_tools_inter_token_latency_seconds_count", **api) == completion - 2
    assert _metric(after, "exo_tools_ready") == 1
    assert _metric(after, "exo_tools_weight_bytes") > 0
    # One access line per request, named by the id its response carried.
    log = node.log()
    for response, status in ((plain, 200), (bad, 400)):
        request_id = response.headers["X-Request-Id"]
        lines = [line for line in log.splitlines() if f"id={request_id} " in line]
        assert len(lines) == 1, lines
        assert f"POST /v1/chat/completions {status} " in lines[0]
    streamed_line = next(line for line in log.splitlines() if f"id={given_id} " in line)
    assert f"completion_tokens={streamed_usage['completion_tokens']} " in streamed_line


def test_generated_bad_requests_never_cost_a_5xx(node: NodeProcess) -> None:
    """The short form of benchmarks/fuzz_api.py (which sends 5,000)."""
    report = fuzz_api.run(node.url, list(fuzz_api.cases(seed=1, count=300, bounded=True)))
    failures = [
        (o.status or o.error, o.case.path, o.case.note, o.body[:200]) for o in report.failures()
    ]
    assert not failures, failures
    statuses = {o.status for o in report.outcomes}
    assert {200, 400} <= statuses  # valid mutations answered, invalid ones refused
    assert node.alive() and node.health()["status"] == "ready"
    assert node.health()["active_requests"] == 0  # nothing left running


def test_openapi_describes_every_route(node: NodeProcess) -> None:
    document = requests.get(f"{node.url}/openapi.json", timeout=10).json()
    validate_openapi(document)  # raises on anything OpenAPI 3.1 does not allow
    paths = document["paths"]
    for route in (
        "/v1/chat/completions",
        "/v1/messages",
        "/v1/messages/count_tokens",
        "/v1/responses",
        "/v1/responses/{response_id}",
        "/v1/models",
        "/v1/models/{model_id}",
        "/v1/cluster",
        "/v1/dashboard",
        "/health",
        "/ready",
        "/metrics",
    ):
        assert route in paths, route
    chat_body = paths["/v1/chat/completions"]["post"]["requestBody"]["content"]
    ref = chat_body["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
    assert {"messages", "tools", "tool_choice"} <= set(
        document["components"]["schemas"][ref]["properties"]
    )
    page = requests.get(f"{node.url}/docs", timeout=10)
    assert page.status_code == 200 and "/openapi.json" in page.text


def test_api_key_guards_every_route_but_health(model_path: Path) -> None:
    guarded = start_node("--api-key", "sekrit", wait=False)
    try:
        # Readiness answers 503 while the model is being placed and loaded, then 200;
        # /health answers 200 throughout.
        readiness: list[int] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and 200 not in readiness:
            try:
                readiness.append(requests.get(f"{guarded.url}/ready", timeout=5).status_code)
                assert requests.get(f"{guarded.url}/health", timeout=5).status_code == 200
            except requests.ConnectionError:
                pass  # not listening yet
            time.sleep(0.1)
        assert readiness[0] == 503 and readiness[-1] == 200, readiness
        guarded.wait_ready()
        response = requests.get(f"{guarded.url}/v1/models", timeout=10)
        assert _error(response, 401)["code"] == "invalid_api_key"
        # The page and the API description hold no data: they load without the key, and
        # the page asks for it; its data and the metrics need it.
        assert requests.get(f"{guarded.url}/", timeout=10).status_code == 200
        assert requests.get(f"{guarded.url}/openapi.json", timeout=10).status_code == 200
        for route in ("/v1/dashboard", "/metrics", "/v1/node"):
            _error(requests.get(f"{guarded.url}{route}", timeout=10), 401)
            keyed = requests.get(
                f"{guarded.url}{route}", headers={"Authorization": "Bearer sekrit"}, timeout=10
            )
            assert keyed.status_code == 200, route
        dom = dump_dom(f"{guarded.url}/")
        assert re.search(r'<form id="key-form"(?! hidden)', dom), "the page did not ask for the key"
        response = requests.post(
            f"{guarded.url}/v1/chat/completions",
            json={"model": MODEL, "messages": user("hi")},
            headers={"Authorization": "Bearer wrong"},
            timeout=10,
        )
        _error(response, 401)
        client = openai.OpenAI(base_url=f"{guarded.url}/v1", api_key="sekrit")
        reply = client.chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=2)  # type: ignore[arg-type]
        assert reply.choices[0].message.content is not None
    finally:
        guarded.stop()
