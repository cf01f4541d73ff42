"""Multi-turn conversations against a node, for the prefix cache checks.

Each turn re-sends the whole conversation, as agents do; the node's answers must equal
mlx-lm's cold greedy runs of the same messages while `cached_tokens` shows that every turn
after the first started from the previous turn's KV cache.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from exo_tools.models.tokenizer import TextTokenizer
from tests.helpers.mlx_lm_reference import reference_generate
from tests.helpers.nodes import NodeProcess

MODEL = "smollm2-135m"
SYSTEM = (
    "You are the terse assistant of a bicycle shop in Lyon. Answer in one short sentence. "
    "Never invent prices; say when you do not know. "
) * 3
QUESTIONS = ["What is the capital of France?", "And the capital of Italy?", "Which is larger?"]
MAX_TOKENS = 12


@dataclass(frozen=True)
class Turn:
    messages: list[dict[str, Any]]
    text: str
    prompt_tokens: int
    cached_tokens: int


def converse(
    node: NodeProcess, questions: list[str] = QUESTIONS, *, system: str = SYSTEM
) -> list[Turn]:
    """One conversation, a request per question, each carrying every earlier turn."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}]
    turns: list[Turn] = []
    for question in questions:
        messages = [*messages, {"role": "user", "content": question}]
        turns.append(ask(node, messages))
        messages = [*messages, {"role": "assistant", "content": turns[-1].text}]
    return turns


def ask(node: NodeProcess, messages: list[dict[str, Any]]) -> Turn:
    body = {"model": MODEL, "messages": messages, "temperature": 0, "max_tokens": MAX_TOKENS}
    response = requests.post(f"{node.url}/v1/chat/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text
    reply = response.json()
    usage = reply["usage"]
    return Turn(
        messages,
        reply["choices"][0]["message"]["content"],
        usage["prompt_tokens"],
        usage["prompt_tokens_details"]["cached_tokens"],
    )


def assert_matches_cold_runs(turns: list[Turn], model_path: Path, tokenizer: TextTokenizer) -> None:
    """Every turn's answer is what mlx-lm answers to the same messages from scratch."""
    cases = [{"messages": turn.messages, "max_tokens": MAX_TOKENS} for turn in turns]
    expected = reference_generate(model_path, "float32", cases)
    assert [turn.text for turn in turns] == [tokenizer.decode(ids) for ids in expected]


def assert_each_turn_reuses_the_last(turns: list[Turn]) -> None:
    """Every turn after the first reused at least the whole previous prompt."""
    for previous, turn in itertools.pairwise(turns):
        assert previous.prompt_tokens <= turn.cached_tokens < turn.prompt_tokens, turns
