"""Three real `exo-tools node` processes on loopback form one cluster over zeroconf."""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.helpers.cluster_checks import agreed_master, get_view, node_ids
from tests.helpers.nodes import NodeProcess, node_environment, start_node

pytestmark = pytest.mark.slow
BOUND_S = 5.0


@pytest.fixture
def trio(model_path: object) -> Iterator[list[NodeProcess]]:
    env = node_environment()
    env["EXO_TOOLS_SECRET"] = uuid.uuid4().hex
    cluster = f"trio-{uuid.uuid4().hex[:8]}"
    nodes = [
        start_node("--cluster", cluster, "--interface", "127.0.0.1", env=env, wait=False)
        for _ in range(3)
    ]
    yield nodes
    for node in nodes:
        node.stop()


def test_three_nodes_discover_each_other_and_forward_to_the_master(
    trio: list[NodeProcess],
) -> None:
    launched = time.monotonic()
    urls = [node.url for node in trio]
    # "Started" = serving its API: Python and MLX start-up before that is not discovery.
    while not all(get_view(url) for url in urls):
        assert time.monotonic() < launched + 60, [node.log()[-1500:] for node in trio]
        time.sleep(0.05)
    last_start = time.monotonic()
    deadline = last_start + 30
    converged_at = None
    while time.monotonic() < deadline:
        views = [get_view(url) for url in urls]
        if all(views):
            ids = {view["self"] for view in views if view}
            same_members = all(node_ids(view) == ids for view in views) and len(ids) == 3
            if same_members and agreed_master(urls, ids):
                converged_at = time.monotonic()
                break
        time.sleep(0.1)
    assert converged_at is not None, [node.log()[-1500:] for node in trio]
    elapsed = converged_at - last_start
    print(
        f"3 nodes agreed on members and master {elapsed:.2f} s after the last one served "
        f"({converged_at - launched:.2f} s after launching the processes)"
    )
    assert elapsed < BOUND_S

    views = [get_view(url) for url in urls]
    master = views[0]["master"] if views[0] else None
    assert all(view and view["master"] == master for view in views)
    by_id = {view["self"]: node for node, view in zip(trio, views, strict=True) if view}
    # The master places the model; a follower that holds no layers has nothing to load.
    by_id[master].wait_ready()
    followers = [node for node_id, node in by_id.items() if node_id != master]
    assert len(followers) == 2
    reply = requests.post(
        f"{followers[0].url}/v1/chat/completions",
        json={
            "model": "smollm2-135m",
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "temperature": 0,
            "max_tokens": 12,
        },
        timeout=120,
    )
    assert reply.status_code == 200, reply.text
    assert "Paris" in reply.json()["choices"][0]["message"]["content"]


def test_a_node_started_from_a_copied_home_is_refused(model_path: object, tmp_path: Path) -> None:
    """A home directory copied to the next machine, node_id file included: the newcomer
    refuses to start, naming the node that has the id and what to delete."""
    env = node_environment()
    env["EXO_TOOLS_SECRET"] = uuid.uuid4().hex
    flags = ("--cluster", f"copy-{uuid.uuid4().hex[:8]}", "--interface", "127.0.0.1")
    first = start_node(*flags, env=env, wait=False)
    second: NodeProcess | None = None
    try:
        deadline = time.monotonic() + 60
        while "advertising" not in first.log():
            assert time.monotonic() < deadline and first.alive(), first.log()[-2000:]
            time.sleep(0.1)
        copied = tmp_path / "copied-home"
        shutil.copytree(first.home, copied)
        second = start_node(*flags, "--home", str(copied), env=env, wait=False)
        assert second.process.wait(timeout=60) != 0
        message = second.log()
        assert "already uses this node's id" in message, message[-3000:]
        assert f"delete {copied / 'node_id'}" in message, message[-3000:]
        assert f"127.0.0.1:{first.api_port}" in message, message[-3000:]  # the other node
        assert first.alive()
        view = get_view(first.url)
        assert view is not None and node_ids(view) == {view["self"]}
    finally:
        first.stop()
        if second is not None:
            second.stop()
