"""A node's limits on running and waiting requests, over real HTTP.

One real node serving the default model with `--max-running 1 --max-queued 1`: while one
request streams, a second waits in the queue (and /health shows both), a third is refused
with 503 and Retry-After in each API's own error shape, and once the first ends the
queued one is served."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.helpers.cluster_checks import wait_for
from tests.helpers.nodes import NodeProcess, start_node

MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def limited(model_path: Path) -> Iterator[NodeProcess]:
    process = start_node("--max-running", "1", "--max-queued", "1")
    yield process
    process.stop()


def chat_body(text: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": text}],
        "temperature": 0,
        **extra,
    }


def test_a_full_queue_refuses_with_retry_after_and_the_queued_request_is_served(
    limited: NodeProcess,
) -> None:
    url = f"{limited.url}/v1/chat/completions"
    running = requests.post(
        url, json=chat_body("Write a long essay.", max_tokens=2000, stream=True), stream=True
    )
    lines = running.iter_lines()
    assert next(line for line in lines if line)  # it streams
    queued: dict[str, Any] = {}

    def wait_in_queue() -> None:
        reply = requests.post(url, json=chat_body("Say hi.", max_tokens=3), timeout=300)
        queued["status"], queued["body"] = reply.status_code, reply.json()

    waiter = threading.Thread(target=wait_in_queue)
    waiter.start()
    wait_for(lambda: limited.health()["scheduler"]["queued"] == 1, 30, "a request to queue")
    scheduler = limited.health()["scheduler"]
    assert (scheduler["running"], scheduler["max_running"], scheduler["max_queued"]) == (1, 1, 1)

    refused = requests.post(url, json=chat_body("And me?", max_tokens=3), timeout=30)
    assert refused.status_code == 503, refused.text
    assert int(refused.headers["Retry-After"]) > 0
    error = refused.json()["error"]
    assert error["code"] == "server_busy" and "--max-running" in error["message"]

    anthropic = requests.post(
        f"{limited.url}/v1/messages",
        json={"model": MODEL, "max_tokens": 3, "messages": [{"role": "user", "content": "Hi"}]},
        timeout=30,
    )
    assert anthropic.status_code == 503
    assert anthropic.json()["error"]["type"] == "overloaded_error"
    assert "Retry-After" in anthropic.headers

    assert waiter.is_alive()  # still waiting for its place
    running.close()  # the client goes away: its place frees
    waiter.join(timeout=300)
    assert queued["status"] == 200, queued
    assert queued["body"]["choices"][0]["message"]["content"]
    wait_for(lambda: limited.health()["scheduler"]["running"] == 0, 30, "the requests to end")
