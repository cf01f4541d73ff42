"""Guided generation through a real 2-node pipeline (two node processes, the default
model, real HTTP): regex, choice, Lark and GBNF constraints as vLLM and llama.cpp clients
send them. Every constrained output must match its constraint, checked by the test's own
`re`, membership and grammar parser; the same prompts unconstrained are counted for
comparison. Bad constraints are 400s naming the field, and the cluster keeps serving.

`-s` prints the counts (docs/CONSTRAINED_DECODING.md has a run's). All 20 prompts of each
case run constrained; the unconstrained comparison takes the first
`EXO_GUIDED_BASELINE_PROMPTS` of them (default 5, to keep CI short; 20 for the full table).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests

from tests.helpers.cluster_runs import MODEL, Cluster, start_cluster, user
from tests.helpers.guided_outputs import CASES, DATE, SENTIMENTS, GuidedCase

# Requests in flight at once: several matchers live on the sampling stage together.
CONCURRENCY = 4
BASELINE_PROMPTS = int(os.environ.get("EXO_GUIDED_BASELINE_PROMPTS", "5"))


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    cluster = start_cluster(2)
    yield cluster
    cluster.stop()


def _post(node_url: str, prompt: str, **fields: Any) -> requests.Response:
    body = {"model": MODEL, "messages": user(prompt), "temperature": 0, **fields}
    return requests.post(f"{node_url}/v1/chat/completions", json=body, timeout=300)


def _content(node_url: str, case: GuidedCase, prompt: str, constrained: bool) -> str:
    fields = case.fields if constrained else {}
    reply = _post(node_url, prompt, max_tokens=case.max_tokens, **fields)
    assert reply.status_code == 200, reply.text
    answer = reply.json()
    assert answer["usage"]["completion_tokens"] <= case.max_tokens, answer
    return answer["choices"][0]["message"]["content"]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_constrained_outputs_match_and_unconstrained_mostly_do_not(
    cluster: Cluster, case: GuidedCase
) -> None:
    assert len(cluster.view()["placement"]["stages"]) == 2
    url = cluster.master.url
    baseline = case.prompts[:BASELINE_PROMPTS]
    jobs = [(prompt, True) for prompt in case.prompts] + [(prompt, False) for prompt in baseline]
    started = time.monotonic()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        outputs = list(pool.map(lambda job: _content(url, case, *job), jobs))
    seconds = time.monotonic() - started
    valid = {True: 0, False: 0}
    failures: list[str] = []
    for (prompt, constrained), output in zip(jobs, outputs, strict=True):
        valid[constrained] += case.check(output)
        if constrained and not case.check(output):
            failures.append(f"{prompt!r} -> {output!r}")
    total = len(case.prompts)
    print(
        f"\n{case.name}: constrained {valid[True]}/{total} valid, unconstrained "
        f"{valid[False]}/{len(baseline)} ({len(jobs)} requests, {seconds:.0f} s); e.g. "
        f"{outputs[0]!r} vs {outputs[total]!r}"
    )
    assert not failures, "\n".join(failures)
    # Without the constraint the model mostly answers otherwise: the constraint did it.
    assert 2 * valid[False] < len(baseline), valid


BAD_CONSTRAINTS: list[tuple[dict[str, Any], str]] = [
    ({"guided_regex": "(\\d{4}"}, "guided_regex"),
    # Over llguidance's limits against the default model's vocabulary (not every one's).
    ({"structured_outputs": {"regex": "(.{0,50}){0,50}x"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    ({"structured_outputs": {"grammar": "start: expr"}}, "structured_outputs.grammar"),
    ({"grammar": 'root ::= "a" rest'}, "grammar"),
    ({"guided_regex": DATE, "guided_choice": SENTIMENTS}, "guided_choice"),
    ({"guided_regex": DATE, "response_format": {"type": "json_object"}}, "guided_regex"),
    (
        {
            "guided_choice": SENTIMENTS,
            "tools": [{"type": "function", "function": {"name": "lookup"}}],
            "tool_choice": "required",
        },
        "guided_choice",
    ),
]


def test_bad_constraints_are_400s_and_the_cluster_keeps_serving(cluster: Cluster) -> None:
    # The master answers, and the other node forwards to it.
    for node in (cluster.master, cluster.nodes[-1]):
        for fields, param in BAD_CONSTRAINTS:
            started = time.monotonic()
            reply = _post(node.url, "What is today's date?", max_tokens=8, **fields)
            assert reply.status_code == 400, (fields, reply.text)
            error = reply.json()["error"]
            assert (error["type"], error["param"]) == ("invalid_request_error", param), error
            assert param.split(".")[-1] in error["message"], error
            # Refused before any token: no generation ran.
            assert time.monotonic() - started < 10, fields
    for node in cluster.nodes:
        assert node.health()["active_requests"] == 0
    # Still serving: a guided request streams, through the OpenAI SDK's extra_body.
    from openai import OpenAI

    client = OpenAI(base_url=f"{cluster.master.url}/v1", api_key="unused")
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Is this review positive? 'Great phone!'"}],
        temperature=0,
        max_tokens=6,
        stream=True,
        extra_body={"structured_outputs": {"choice": SENTIMENTS}},
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text in SENTIMENTS, text
