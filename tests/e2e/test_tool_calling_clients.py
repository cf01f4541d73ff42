"""Tool calling through a real node with real clients: requests, the OpenAI SDK, opencode."""

from __future__ import annotations

import json
import os
import shutil
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


def opencode_binary() -> str | None:
    local = REPO / ".tools" / "node_modules" / ".bin" / "opencode"
    return str(local) if local.exists() else shutil.which("opencode")


def test_opencode_session_completes_without_protocol_error(
    node: NodeProcess, tmp_path: Path
) -> None:
    binary = opencode_binary()
    if binary is None:
        message = "opencode not installed (scripts/install.sh --test installs it with npm)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    config = {
        "$schema": "https://opencode.ai/config.json",
        "provider": {
            "exo": {
                "npm": "@ai-sdk/openai-compatible",
                "name": "exo-tools",
                "options": {"baseURL": f"{node.url}/v1", "apiKey": "unused"},
                # A small output limit keeps the session short on a 2-core CPU.
                "models": {MODEL: {"tool_call": True, "limit": {"context": 8192, "output": 96}}},
            }
        },
        "model": f"exo/{MODEL}",
        # Titles are written by the "small model"; it must be the node too (offline).
        "small_model": f"exo/{MODEL}",
        "autoupdate": False,
        "share": "disabled",
    }
    (tmp_path / "opencode.json").write_text(json.dumps(config))
    (tmp_path / "notes.txt").write_text("hello\n")
    env = dict(
        os.environ,
        HOME=str(tmp_path),
        XDG_CONFIG_HOME=str(tmp_path / ".config"),
        OPENCODE_CONFIG=str(tmp_path / "opencode.json"),
    )
    result = subprocess.run(
        [
            binary,
            "run",
            "--format",
            "json",
            "--model",
            f"exo/{MODEL}",
            "--title",
            "exo-tools test",
            "What is in notes.txt?",
        ],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=420,
    )
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    errors = [event for event in events if event.get("type") == "error"]
    assert not errors, json.dumps(errors)[:3000]
    assert result.returncode == 0, result.stderr[-2000:]
    assert any(event.get("type") == "step_finish" for event in events), result.stdout[-2000:]


def test_example_script_runs_to_the_end(node: NodeProcess) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "examples" / "tool_calling_example.py"),
            "--url",
            node.url,
            "--max-turns",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip()
