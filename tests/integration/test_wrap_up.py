"""`--wrap-up-share`: a real node ends a small model's run-on answer at a sentence or line
end past its share of the output limit, where a node without it cuts the answer at the
limit (which Claude Code and Codex report as an error). Greedy, so the wrapped answer is
the start of the unwrapped one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from exo_tools.engine.sampling import ends_sentence
from tests.helpers.nodes import NodeProcess, start_node

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m"
LIMIT = 48
# An answer the default model runs on with, well past LIMIT tokens.
RUN_ON = [
    {"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}
]
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def wrapping_node(model_path: Path) -> Iterator[NodeProcess]:
    process = start_node("--wrap-up-share", "0.5", "--default-max-tokens", str(LIMIT))
    yield process
    process.stop()


def anthropic_client(node: NodeProcess) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=node.url, api_key="unused", max_retries=0)


def messages(node: NodeProcess, **extra: Any) -> Any:
    return anthropic_client(node).messages.create(
        model=MODEL, max_tokens=LIMIT, messages=RUN_ON, extra_body=GREEDY, **extra
    )


def test_a_run_on_answer_ends_at_a_sentence_end_instead_of_the_limit(
    node: NodeProcess, wrapping_node: NodeProcess
) -> None:
    cut = messages(node)
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == LIMIT
    wrapped = messages(wrapping_node)
    text = wrapped.content[0].text
    assert wrapped.stop_reason == "end_turn", text
    assert LIMIT // 2 <= wrapped.usage.output_tokens < LIMIT
    assert ends_sentence(text) and cut.content[0].text.startswith(text.rstrip())
    # Streamed, the same end.
    with anthropic_client(wrapping_node).messages.stream(
        model=MODEL, max_tokens=LIMIT, messages=RUN_ON, extra_body=GREEDY
    ) as stream:
        streamed = stream.get_final_message()
    assert streamed.stop_reason == "end_turn" and streamed.content[0].text == text


def test_codex_shaped_request_completes_under_the_default_limit(
    wrapping_node: NodeProcess,
) -> None:
    """Codex sets no max_output_tokens: the node's default limit applies, and the answer
    wraps up within it, so the response is complete rather than incomplete."""
    client = openai.OpenAI(base_url=f"{wrapping_node.url}/v1", api_key="unused", max_retries=0)
    response = client.responses.create(model=MODEL, input=RUN_ON[0]["content"], temperature=0)
    assert response.status == "completed", response.incomplete_details
    assert response.usage is not None and response.usage.output_tokens < LIMIT
    assert ends_sentence(response.output_text)


def test_constrained_output_is_never_wrapped_up(wrapping_node: NodeProcess) -> None:
    """A forced tool call decodes under its grammar to the end, whatever its length."""
    tool = {
        "name": "write_story",
        "description": "Save a story.",
        "input_schema": {
            "type": "object",
            "properties": {"title": {"type": "string"}, "story": {"type": "string"}},
            "required": ["title", "story"],
        },
    }
    called = messages(
        wrapping_node, tools=[tool], tool_choice={"type": "tool", "name": tool["name"]}
    )
    # The grammar closes the call within the limit; wrapped up, it would end mid-JSON.
    assert called.stop_reason == "tool_use", called.content
    assert [block.type for block in called.content] == ["tool_use"]
