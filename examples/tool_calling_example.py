"""Multi-turn tool calling against an exo-tools node (OpenAI chat-completions wire format).

    python examples/tool_calling_example.py --url http://127.0.0.1:52415 --model smollm2-135m

The model may call ``get_weather(city)`` and ``add(a, b)``; the script runs them
locally, sends the results back as ``tool`` messages and stops when the model
answers in plain text or after ``--max-turns`` requests.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

import requests

WEATHER = {"paris": "18C, light rain", "rome": "27C, sunny", "oslo": "4C, snow"}


def get_weather(city: str) -> str:
    return WEATHER.get(str(city).strip().lower(), f"no weather data for {city}")


def add(a: float, b: float) -> float:
    return float(a) + float(b)


FUNCTIONS: dict[str, Callable[..., Any]] = {"get_weather": get_weather, "add": add}

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "City name"}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two numbers.",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                "required": ["a", "b"],
            },
        },
    },
]


def run_tool(call: dict[str, Any]) -> str:
    """Execute one tool call; errors go back to the model as the tool result."""
    fn = call.get("function", {})
    name = fn.get("name")
    try:
        args = json.loads(fn.get("arguments") or "{}")
        if name not in FUNCTIONS:
            return f"error: unknown tool {name!r}"
        return json.dumps(FUNCTIONS[name](**args))
    except Exception as exc:  # the model should see what went wrong and retry
        return f"error: {type(exc).__name__}: {exc}"


def chat(url: str, payload: dict[str, Any], timeout: float) -> dict[str, Any]:
    response = requests.post(f"{url}/v1/chat/completions", json=payload, timeout=timeout)
    if response.status_code != 200:
        raise SystemExit(f"HTTP {response.status_code} from node: {response.text[:500]}")
    return response.json()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="http://127.0.0.1:52415", help="node base URL")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-turns", type=int, default=5, help="maximum chat requests")
    parser.add_argument(
        "--required", action="store_true", help='send tool_choice "required" on the first turn'
    )
    parser.add_argument(
        "--max-tokens", type=int, default=256, help="token limit of each answer (default 256)"
    )
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument(
        "prompt", nargs="?", default="What is the weather in Paris? Also, what is 2 + 40?"
    )
    args = parser.parse_args(argv)
    url = args.url.rstrip("/")

    messages: list[dict[str, Any]] = [{"role": "user", "content": args.prompt}]
    print(f"user: {args.prompt}")
    try:
        for turn in range(args.max_turns):
            payload: dict[str, Any] = {
                "model": args.model,
                "messages": messages,
                "tools": TOOLS,
                "max_tokens": args.max_tokens,
            }
            if args.required and turn == 0:
                payload["tool_choice"] = "required"
            choice = chat(url, payload, args.timeout)["choices"][0]
            message = choice["message"]
            calls = message.get("tool_calls") or []
            # Echo the assistant turn back verbatim: the server needs the call ids.
            messages.append(
                {"role": "assistant", "content": message.get("content"), "tool_calls": calls}
                if calls
                else {"role": "assistant", "content": message.get("content") or ""}
            )
            if message.get("content"):
                print(f"assistant: {message['content']}")
            if not calls:
                print(f"(finish_reason: {choice.get('finish_reason')})")
                return 0
            for call in calls:
                result = run_tool(call)
                print(
                    f"  -> {call['function']['name']}({call['function']['arguments']}) = {result}"
                )
                messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})
    except requests.ConnectionError:
        print(f"error: cannot reach an exo-tools node at {url} (is it running?)", file=sys.stderr)
        return 2
    except requests.Timeout:
        print(f"error: the node at {url} did not answer within {args.timeout}s", file=sys.stderr)
        return 2
    print(f"(stopped after {args.max_turns} turns without a final answer)")
    return 1


if __name__ == "__main__":
    sys.exit(main())
