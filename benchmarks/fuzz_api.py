"""Send thousands of generated bad requests to a node and count what came back.

Every route is hit (chat completions, messages, count_tokens, responses, models, cluster,
health, readiness, metrics, the dashboard's data and pages) with bodies mutated from a
valid one: hostile values in every field (huge and negative integers, NaN, lone
surrogates, deep nesting, megabyte strings), malformed messages and tools, broken JSON,
wrong methods and content types. A good node answers each with a 4xx in its API's own
shape (or a 2xx where the mutation happened to be valid), never a 5xx, and never hangs.

    .venv/bin/python benchmarks/fuzz_api.py                  # starts its own node, 5,000 requests
    .venv/bin/python benchmarks/fuzz_api.py --url http://127.0.0.1:52415 --count 20000

Prints status counts per route, every distinct 5xx and every hang, the node's RSS before
and after, and whether it is still alive. Exit status 1 on any 5xx, hang or dead node.
The suite runs a short form (tests/integration/test_api.py).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MODEL = "smollm2-135m"
HANG_S = 60.0  # a request still unanswered after this is a hang
USER = [{"role": "user", "content": "hi"}]

# Valid bodies, each generating at most one token, to mutate.
BASES: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {"model": MODEL, "messages": USER, "max_tokens": 1},
    "/v1/messages": {"model": MODEL, "messages": USER, "max_tokens": 1},
    "/v1/messages/count_tokens": {"model": MODEL, "messages": USER},
    "/v1/responses": {"model": MODEL, "input": "hi", "max_output_tokens": 1},
}
# The fields each API reads, mutated one (or a few) at a time.
FIELDS: dict[str, list[str]] = {
    "/v1/chat/completions": [
        "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
        "top_k", "seed", "stop", "n", "stream", "stream_options", "tools", "tool_choice",
        "parallel_tool_calls", "response_format", "logprobs", "top_logprobs",
        "frequency_penalty", "presence_penalty", "guided_regex", "guided_choice",
        "guided_json", "guided_grammar", "structured_outputs", "grammar", "json_schema",
    ],
    "/v1/messages": [
        "model", "messages", "max_tokens", "system", "stop_sequences", "temperature", "top_p",
        "top_k", "stream", "tools", "tool_choice", "metadata", "thinking", "output_config",
    ],
    "/v1/messages/count_tokens": ["model", "messages", "system", "tools", "tool_choice"],
    "/v1/responses": [
        "model", "input", "instructions", "max_output_tokens", "temperature", "top_p",
        "stream", "tools", "tool_choice", "parallel_tool_calls", "text", "store",
        "previous_response_id", "include", "reasoning",
    ],
}  # fmt: skip
GET_ROUTES = [
    "/health", "/ready", "/metrics", "/v1/cluster", "/v1/dashboard", "/v1/node", "/",
    "/docs", "/openapi.json", "/v1/models",
]  # fmt: skip


def _nested(depth: int, leaf: Any = 0) -> Any:
    value: Any = leaf
    for level in range(depth):
        value = [value] if level % 2 else {"a": value}
    return value


def _schema_bomb(rng: random.Random) -> dict[str, Any]:
    """Tool parameter schemas that are large, deep, cyclic or nonsensical."""
    choices: list[Callable[[], dict[str, Any]]] = [
        lambda: {"$ref": "#"},
        lambda: {"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}},
        lambda: {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(3000)}},
        lambda: _nested(200, {"type": "string"}),
        lambda: {"type": "string", "pattern": "(a+)+$"},
        lambda: {"type": "string", "pattern": "["},
        lambda: {"type": "object", "properties": {"x": {"enum": list(range(20000))}}},
        lambda: {"type": ["string", 7]},
        lambda: {"anyOf": [{"type": "string"}] * 500},
        lambda: {"type": "array", "items": {"type": "array", "items": {"type": "array"}}, "minItems": 10**9},
        lambda: {"type": "string", "minLength": 10**12},
        lambda: {"type": "integer", "minimum": 10, "maximum": 1},
        lambda: {"not": {}},
        lambda: {"type": "object", "required": ["missing"], "additionalProperties": False},
        lambda: {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]},
    ]  # fmt: skip
    return rng.choice(choices)()


def _hostile_values(rng: random.Random) -> list[Any]:
    return [
        None, True, False, 0, -1, 1, 2**31, -(2**31), 2**63, -(2**63) - 1, 2**64, 2**64 - 1,
        10**30, 1e308, -1e308, 1.5, -0.0, float("nan"), float("inf"), float("-inf"),
        "", "x", "x" * rng.choice([1000, 100_000]), "\x00", "\ud800", "\u202e", "💥" * 50,
        "NaN", "null", "<|im_end|>", "{{ 7*7 }}", "../../etc/passwd",
        [], [None], [[]], [1] * 2000, ["x"] * 100, {}, {"type": None}, {"a": {"b": {"c": []}}},
        _nested(rng.choice([50, 70, 500])), [{"role": "user"}],
    ]  # fmt: skip


def _message_bomb(rng: random.Random) -> Any:
    content_parts = [
        [{"type": "text"}],
        [{"type": "text", "text": 7}],
        [{"type": "image_url", "image_url": {"url": "data:,"}}],
        [{"type": "image", "source": {"type": "base64", "data": "!!"}}],
        [{"type": "tool_result", "tool_use_id": "x", "content": [{"type": "text", "text": "r"}]}],
        [{"type": "tool_use", "id": None, "name": 5, "input": "x"}],
        [{"type": "thinking", "thinking": "hmm", "signature": ""}],
        [{"type": "nonsense"}],
        [{"type": "input_text", "text": "hi"}],
        "x" * 200_000,
        "",
    ]
    roles = ["user", "assistant", "system", "tool", "developer", "function", "wizard", "", None, 5]
    messages = []
    for _ in range(rng.randint(0, 6)):
        message: dict[str, Any] = {"role": rng.choice(roles), "content": rng.choice(content_parts)}
        if rng.random() < 0.3:
            message["tool_calls"] = rng.choice(
                [
                    [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{"}}],
                    [{"type": "function", "function": {"name": None}}],
                    [
                        {
                            "id": "c",
                            "type": "function",
                            "function": {"name": "f", "arguments": {"a": 1}},
                        }
                    ],
                    "not a list",
                    [None],
                ]
            )
        if rng.random() < 0.2:
            message["tool_call_id"] = rng.choice([None, 5, "x" * 10000, "c"])
        if rng.random() < 0.1:
            message["name"] = rng.choice(["n" * 5000, 3, None])
        messages.append(message)
    return messages


def _tools(rng: random.Random, api: str) -> Any:
    if rng.random() < 0.2:
        return rng.choice([[], "x", [None], [{}], [{"type": "function"}], [1, 2]])
    tools = []
    for index in range(rng.choice([1, 1, 2, 200])):
        schema = _schema_bomb(rng)
        name = rng.choice([f"tool_{index}", "", "a" * 300, "bad name!", None])
        if api == "/v1/messages" or api == "/v1/messages/count_tokens":
            tools.append({"name": name, "description": "d", "input_schema": schema})
        elif api == "/v1/responses":
            tools.append({"type": "function", "name": name, "parameters": schema})
        else:
            tools.append({"type": "function", "function": {"name": name, "parameters": schema}})
    return tools


def _field_value(rng: random.Random, api: str, name: str) -> Any:
    # Built only for the field drawn: some are megabytes.
    special: dict[str, Callable[[], list[Any]]] = {
        "messages": lambda: [_message_bomb(rng)],
        "input": lambda: [_message_bomb(rng), [{"type": "function_call_output", "call_id": None}]],
        "tools": lambda: [_tools(rng, api)],
        "tool_choice": lambda: [
            "required", "any", "none", "auto", "banana", {"type": "tool"},
            {"type": "tool", "name": "missing"}, {"type": "function", "function": {"name": "nope"}},
            {"type": "function"}, {"type": "any", "disable_parallel_tool_use": "yes"},
        ],
        "response_format": lambda: [
            {"type": "json_schema"}, {"type": "json_schema", "json_schema": {"schema": _schema_bomb(rng)}},
            {"type": "json_object"}, {"type": "banana"}, {"type": "text"},
        ],
        "text": lambda: [{"format": {"type": "json_schema", "schema": _schema_bomb(rng), "name": "x"}}, {"format": 5}],
        "guided_regex": lambda: ["(a+)+$", "[", "a{99999999}", "(?<=x)y", ".*" * 200],
        "guided_grammar": lambda: ["root ::= ", "start: x\nx: x", 'root ::= "a" root', "%%%%"],
        "guided_json": lambda: [_schema_bomb(rng), "{not json"],
        "guided_choice": lambda: [[], [""], ["a"] * 10000, [5], "x"],
        "grammar": lambda: ["root ::= (", 'root ::= [a-z]{1,99999999}', ""],
        "json_schema": lambda: [_schema_bomb(rng)],
        "structured_outputs": lambda: [{"regex": "["}, {"choice": []}, {"json": _schema_bomb(rng)}, {"grammar": 5}],
        "stream_options": lambda: [{"include_usage": "yes"}, [], {"include_usage": None}],
        "system": lambda: [[{"type": "text"}], [{"type": "image"}], 5, "x" * 300_000],
        "stop": lambda: [["x"] * 17, [""], [None], "", ["a" * 100_000]],
        "stop_sequences": lambda: [["x"] * 10000, [""], [5]],
        "previous_response_id": lambda: ["resp_missing", "../x", "", 5],
        "thinking": lambda: [{"type": "enabled", "budget_tokens": -5}, "on"],
        "metadata": lambda: [{"user_id": 5}, "x"],
    }  # fmt: skip
    if name in special and rng.random() < 0.6:
        return rng.choice(special[name]())
    return rng.choice(_hostile_values(rng))


@dataclass
class Case:
    method: str
    path: str
    body: bytes | None
    content_type: str = "application/json"
    note: str = ""
    stream: bool = False


def _dumps(value: Any) -> bytes:
    # allow_nan: Python's own NaN/Infinity literals, which json.loads accepts too.
    return json.dumps(value, allow_nan=True).encode("utf-8", "surrogatepass")


# Each API's field that bounds the answer's tokens.
TOKEN_LIMIT = {
    "/v1/chat/completions": "max_tokens",
    "/v1/messages": "max_tokens",
    "/v1/responses": "max_output_tokens",
}


def cases(seed: int, count: int, bounded: bool = False) -> Iterator[Case]:
    """`count` generated requests, the same ones for the same seed. `bounded`: a body left
    without a token limit gets one back (unbounded, the node would answer with up to its
    whole context: slow, not wrong; the script's own node bounds them itself)."""
    rng = random.Random(seed)
    for _ in range(count):
        roll = rng.random()
        if roll < 0.08:
            path = rng.choice(
                [
                    *GET_ROUTES,
                    f"/v1/models/{rng.choice(['nope', '%00', 'x' * 5000, '../../etc'])}",
                    f"/v1/responses/{rng.choice(['resp_x', '%2e%2e', 'x' * 3000, '🙂'])}",
                    "/v1/nothing",
                ]
            )
            method = rng.choice(["GET", "GET", "GET", "DELETE", "PUT", "PATCH", "POST"])
            yield Case(method, path, None, note=f"{method} {path[:40]}")
            continue
        path = rng.choice(list(BASES))
        body: dict[str, Any] = json.loads(json.dumps(BASES[path]))
        if roll < 0.18:
            raw = rng.choice(
                [
                    b"", b"{", b"[]", b"5", b'"x"', b"null", b"\xff\xfe{}", b"\xef\xbb\xbf{}",
                    b'{"model": "' + b"\xc3\x28" + b'"}', _dumps(body)[:-3],
                    b"[" * 100_000 + b"]" * 100_000,
                    b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}",
                    b'{"a":' * 3000 + b"1" + b"}" * 3000,
                    b'{"model": 1e999999}',
                    _dumps({**body, **{f"k{i}": i for i in range(50_000)}}),
                ]
            )  # fmt: skip
            content_type = rng.choice(["application/json", "text/plain", "", "multipart/form-data"])
            yield Case("POST", path, raw, content_type, note="raw body")
            continue
        names = rng.sample(FIELDS[path], k=rng.choice([1, 1, 1, 2, 3]))
        for name in names:
            if rng.random() < 0.1 and name in body:
                del body[name]
            else:
                body[name] = _field_value(rng, path, name)
        limit = TOKEN_LIMIT.get(path)
        if bounded and limit is not None and body.get(limit) is None:
            body[limit] = 1
        stream = body.get("stream") is True
        yield Case("POST", path, _dumps(body), note=",".join(names), stream=stream)


@dataclass
class Outcome:
    case: Case
    status: int | None  # None: hung or the connection failed
    body: str = ""
    seconds: float = 0.0
    error: str = ""


@dataclass
class Report:
    outcomes: list[Outcome] = field(default_factory=list)

    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status is None or o.status >= 500]


def send(url: str, case: Case, api_key: str | None = None) -> Outcome:
    headers = {"Content-Type": case.content_type} if case.content_type else {}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    started = time.perf_counter()
    try:
        with requests.request(
            case.method,
            f"{url}{case.path}",
            data=case.body,
            headers=headers,
            timeout=HANG_S,
            stream=case.stream,
        ) as response:
            text = b"".join(response.iter_content(65536)).decode(errors="replace")
            return Outcome(case, response.status_code, text[:400], time.perf_counter() - started)
    except requests.RequestException as error:
        return Outcome(
            case, None, "", time.perf_counter() - started, f"{type(error).__name__}: {error}"[:300]
        )


def run(url: str, generated: list[Case], workers: int = 4, api_key: str | None = None) -> Report:
    with ThreadPoolExecutor(workers) as pool:
        return Report(list(pool.map(lambda case: send(url, case, api_key), generated)))


def _memory(url: str) -> tuple[int | None, int | None]:
    """The node's RSS and its prefix cache's bytes (which it fills up to its budget)."""
    try:
        health = requests.get(f"{url}/health", timeout=10).json()
    except (requests.RequestException, ValueError):
        return None, None
    return (health.get("memory") or {}).get("rss"), (health.get("prefix_cache") or {}).get("bytes")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="a running node (default: start one with the default model)")
    parser.add_argument("--count", type=int, default=5000, help="requests to send (default 5000)")
    parser.add_argument("--seed", type=int, default=0, help="the generator's seed (default 0)")
    parser.add_argument("--workers", type=int, default=4, help="requests in flight (default 4)")
    parser.add_argument("--api-key", help="the node's API key, if it has one")
    args = parser.parse_args()
    node = None
    url = args.url
    if url is None:
        from tests.helpers.nodes import start_node

        # A default token limit, as a public node would set: a body that drops max_tokens
        # would otherwise generate up to the whole context.
        node = start_node("--default-max-tokens", "16")
        url = node.url
    try:
        generated = list(cases(args.seed, args.count))
        rss_before, cache_before = _memory(url)
        started = time.perf_counter()
        report = run(url, generated, args.workers, args.api_key)
        elapsed = time.perf_counter() - started
        alive = requests.get(f"{url}/health", timeout=10).status_code == 200
        rss_after, cache_after = _memory(url)
    finally:
        if node is not None:
            node.stop()
    by_route: dict[str, Counter[str]] = {}
    for outcome in report.outcomes:
        route = outcome.case.path if outcome.case.path in BASES else "other routes"
        by_route.setdefault(route, Counter())[str(outcome.status or "no answer")] += 1
    print(
        f"\n{len(report.outcomes)} requests in {elapsed:.0f} s ({args.workers} in flight), seed {args.seed}"
    )
    print(f"{'route':<28} statuses")
    for route, counts in sorted(by_route.items()):
        print(f"{route:<28} " + ", ".join(f"{status}: {n}" for status, n in sorted(counts.items())))
    failures = report.failures()
    distinct: dict[tuple[Any, ...], Outcome] = {}
    for outcome in failures:
        distinct.setdefault((outcome.status, outcome.case.path, outcome.case.note), outcome)
    print(
        f"\n5xx: {sum(1 for o in failures if o.status)}, hangs or dropped connections: {sum(1 for o in failures if o.status is None)}"
    )
    for (status, path, note), outcome in distinct.items():
        print(f"  {status or outcome.error} {path} [{note}] {outcome.body[:200]}")
    slowest = max(report.outcomes, key=lambda o: o.seconds)
    print(f"slowest answer: {slowest.seconds:.1f} s ({slowest.case.path} [{slowest.case.note}])")
    mb = lambda value: "?" if value is None else f"{value / 2**20:.0f} MB"  # noqa: E731
    print(f"node RSS before {mb(rss_before)}, after {mb(rss_after)}; alive after: {alive}")
    print(f"prefix cache before {mb(cache_before)}, after {mb(cache_after)} (within its budget)")
    return 0 if alive and not failures else 1


if __name__ == "__main__":
    raise SystemExit(main())
