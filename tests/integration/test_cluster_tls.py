"""What an attacker on the path between two nodes sees and can do (#21).

Two real nodes serve a 2-stage pipeline and reach each other only through `TcpProxy`s: each
node's gRPC server listens on its own loopback address, the other node knows it only by the
proxy's, and each proxy connects from the address where the other proxy listens, so the
dial-back a node makes to a caller lands on a proxy too. The proxies record every byte
between the nodes, and one can flip a byte in flight.
"""

from __future__ import annotations

import json
import struct
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from exo_tools.models.tokenizer import TextTokenizer
from exo_tools.placement.streams import CUT_UNDER_TLS
from tests.helpers.cluster_runs import MODEL, SECRET, Cluster
from tests.helpers.nodes import free_port, node_environment, start_node, wait_for_cluster_layer
from tests.helpers.tcp_proxy import TcpProxy

A_HOST, B_HOST = "127.0.0.2", "127.0.0.3"  # where each node's gRPC server listens
TO_A_HOST, TO_B_HOST = "127.0.0.5", "127.0.0.4"  # where each node's proxy listens

CANARY = "Pelican-Quartz-7731 keeps the vault code"
SCHEMA_CANARY = "walrus_vault_field"
PROMPT = f"Remember this: {CANARY}. Reply with a short JSON object."
SCHEMA = {
    "type": "object",
    "properties": {SCHEMA_CANARY: {"type": "string", "maxLength": 12}},
    "required": [SCHEMA_CANARY],
    "additionalProperties": False,
}


class ProxiedPair:
    def __init__(self, cluster: Cluster, proxies: list[TcpProxy]) -> None:
        self.cluster = cluster
        self.proxies = proxies

    def captured(self) -> list[int]:
        return [proxy.capture_size() for proxy in self.proxies]

    def captured_since(self, marks: list[int]) -> bytes:
        return b"".join(p.captured_since(m) for p, m in zip(self.proxies, marks, strict=True))


def _start_pair(*flags: str) -> Iterator[ProxiedPair]:
    env = node_environment()
    env["EXO_TOOLS_SECRET"] = SECRET
    name = f"test-tls-{uuid.uuid4().hex[:8]}"
    # Each node's control port and data plane port (activations: what the test watches).
    a_port, a_data, b_port, b_data = (free_port() for _ in range(4))
    proxies = [
        TcpProxy((TO_A_HOST, port), (A_HOST, port), source_ip=TO_B_HOST).start()
        for port in (a_port, a_data)
    ] + [
        TcpProxy((TO_B_HOST, port), (B_HOST, port), source_ip=TO_A_HOST).start()
        for port in (b_port, b_data)
    ]
    common = ("--cluster", name, "--min-nodes", "2", "--no-discovery", *flags)
    first = start_node(
        *common,
        "--grpc-host",
        A_HOST,
        "--grpc-port",
        str(a_port),
        "--data-port",
        str(a_data),
        env=env,
        wait=False,
    )
    wait_for_cluster_layer(first)  # so it is the master: the election prefers the oldest
    second = start_node(
        *common,
        "--grpc-host",
        B_HOST,
        "--grpc-port",
        str(b_port),
        "--data-port",
        str(b_data),
        "--peer",
        f"{TO_A_HOST}:{a_port}",
        env=env,
        wait=False,
    )
    cluster = Cluster([first, second], name)
    try:
        cluster.wait_placed(2)
        yield ProxiedPair(cluster, proxies)
    finally:
        cluster.stop()
        for proxy in proxies:
            proxy.close()


def _ask(pair: ProxiedPair) -> requests.Response:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPT}],
        "temperature": 0,
        "max_tokens": 24,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "vault", "schema": SCHEMA, "strict": True},
        },
    }
    return requests.post(f"{pair.cluster.master.url}/v1/chat/completions", json=body, timeout=120)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _encodings(ids: list[int], window: int) -> list[bytes]:
    """Every way a run of `window` token ids could sit in a message: packed varints (protobuf
    repeated ints), int32 and int64 little-endian arrays."""
    found: list[bytes] = []
    for start in range(max(1, len(ids) - window + 1)):
        run = ids[start : start + window]
        found.append(b"".join(_varint(i) for i in run))
        found.append(struct.pack(f"<{len(run)}i", *run))
        found.append(struct.pack(f"<{len(run)}q", *run))
    return found


def _request_traffic(pair: ProxiedPair) -> tuple[bytes, str]:
    """One request's bytes between the nodes, and its answer."""
    marks = pair.captured()
    response = _ask(pair)
    assert response.status_code == 200, response.text
    time.sleep(0.5)  # the release message follows the last token
    answer = response.json()["choices"][0]["message"]["content"]
    return pair.captured_since(marks), answer


@pytest.fixture(scope="class")
def tls_pair() -> Iterator[ProxiedPair]:
    yield from _start_pair()


@pytest.fixture(scope="class")
def plain_pair() -> Iterator[ProxiedPair]:
    yield from _start_pair("--no-cluster-tls")


class TestWithTLS:
    @pytest.fixture
    def pair(self, tls_pair: ProxiedPair) -> ProxiedPair:
        return tls_pair

    def test_traffic_between_nodes_shows_no_prompt_ids_or_answer(
        self, pair: ProxiedPair, tokenizer: TextTokenizer
    ) -> None:
        traffic, answer = _request_traffic(pair)
        # The prefill's hidden states alone are tens of KB: the request went through.
        assert len(traffic) > 20_000, len(traffic)
        prompt_ids = tokenizer.encode(PROMPT)
        answer_ids = tokenizer.encode(answer)
        assert json.loads(answer)  # the constrained answer, readable by the client
        needles = [
            CANARY.encode(),
            SCHEMA_CANARY.encode(),
            answer.encode(),
            *_encodings(prompt_ids[1:-1], 6),
            *_encodings(answer_ids, 4),
        ]
        leaked = [needle for needle in needles if needle in traffic]
        assert not leaked, f"found in the traffic between nodes: {leaked[:5]}"

    def test_a_byte_flipped_in_flight_fails_the_request_cleanly(self, pair: ProxiedPair) -> None:
        clean = _ask(pair)
        assert clean.status_code == 200, clean.text
        expected = clean.json()["choices"][0]["message"]["content"]
        epoch = pair.cluster.view()["placement"]["epoch"]
        for proxy in pair.proxies:
            # A decode step's hidden states (2.3 KB), not a heartbeat (a few hundred bytes).
            proxy.arm_flip(1500)
        altered = _ask(pair)
        assert sum(proxy.flipped for proxy in pair.proxies) >= 1
        # Refused, with the reason, and never an answer made from altered activations.
        assert altered.status_code >= 500, altered.text
        error = altered.json()["error"]
        assert "broke" in error["message"] and CUT_UNDER_TLS in error["message"], error
        # The receiving node's TLS layer logged what it refused.
        assert any("TSI_DATA_CORRUPTED" in node.log() for node in pair.cluster.nodes)
        for proxy in pair.proxies:
            proxy.arm_flip(1 << 40)  # disarm what the failed request did not reach
        # The cluster heals (a new placement over fresh connections) and answers as before.
        pair.cluster.wait_placed(2, after_epoch=epoch)
        again = _ask(pair)
        assert again.status_code == 200, again.text
        assert again.json()["choices"][0]["message"]["content"] == expected


class TestWithoutTLS:
    """The control: the same capture of a `--no-cluster-tls` pair does show the request,
    so the test above would fail if TLS were off or the capture missed the traffic."""

    @pytest.fixture
    def pair(self, plain_pair: ProxiedPair) -> ProxiedPair:
        return plain_pair

    def test_the_same_capture_shows_the_request_in_clear(self, pair: ProxiedPair) -> None:
        traffic, _ = _request_traffic(pair)
        assert SCHEMA_CANARY.encode() in traffic
