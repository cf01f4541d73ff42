"""Constrained decoding with the real default model, in-process (the pipeline and tensor
test classes run the same checks through two node processes:
`tests.helpers.constraint_cases.assert_constrained_requests_valid`).

Every constrained output must be valid: tool calls parse with the Hermes parser and
their raw arguments validate against the tool's schema; JSON documents validate against
the response schema. The same prompts are run unconstrained and the results printed for
comparison (run with -s to see them). The prompts share the tools system prompt, so it
is prefilled once and its KV cache reused.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import mlx.core as mx
import pytest

from exo_tools import constraints as C
from exo_tools.engine.sampling import Sampler
from exo_tools.engine.shard import ShardModel
from exo_tools.models.catalog import CATALOG, DEFAULT_MODEL_ID
from exo_tools.models.loader import LoadedModel, load_model
from exo_tools.tools import parse_tool_calls, render_tools_system_prompt
from exo_tools.types import SamplingParams
from tests.helpers.constraint_cases import (
    JSON_PROMPTS,
    JSON_SYSTEM,
    PERSON,
    SCHEMAS,
    TOOL_PROMPTS,
    TOOLS,
    valid_document,
)

pytestmark = pytest.mark.slow

MAX_TOKENS = 256
# Unconstrained runs are only a comparison (a call would start within these tokens); they
# are opt-in because on a small CPU they would take the test past its time limit.
COMPARE_TOKENS = int(os.environ.get("EXO_CONSTRAINTS_COMPARE_TOKENS", "0"))

# The suite runs a few prompts of each kind to stay quick on a 2-core CPU; set
# EXO_CONSTRAINTS_PROMPTS=10 for the whole set.
PROMPT_COUNT = int(os.environ.get("EXO_CONSTRAINTS_PROMPTS", "3"))
TOOL_PROMPTS = TOOL_PROMPTS[:PROMPT_COUNT]
JSON_PROMPTS = JSON_PROMPTS[:PROMPT_COUNT]


@dataclass
class Generated:
    text: str
    tokens: int
    finished: bool  # ended with end-of-sequence (not max_tokens)


class Generator:
    """Greedy generation the way the runner drives the Sampler, with a reusable prefix."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.grammar = C.grammar_tokenizer(DEFAULT_MODEL_ID, loaded.tokenizer)
        self.model = ShardModel(loaded.model, loaded.shard)
        self._prefix: list[int] = []
        self._prefix_state: list[Any] = []

    def prompt(self, system: str, user: str) -> list[int]:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        return self.tokenizer.encode(
            self.tokenizer.apply_chat_template(messages), add_special_tokens=True
        )

    def set_prefix(self, prompts: list[list[int]]) -> None:
        """Prefill the tokens all `prompts` share (less one, so each keeps a suffix)."""
        shared = min(len(p) for p in prompts) - 1
        for index in range(shared):
            if any(p[index] != prompts[0][index] for p in prompts):
                shared = index
                break
        cache = self.model.make_cache()
        self.model.forward(mx.array(prompts[0][:shared])[None], cache)
        mx.eval([c.state for c in cache])
        self._prefix = prompts[0][:shared]
        self._prefix_state = [c.state for c in cache]

    def generate(self, prompt: list[int], constraint: str | None, max_tokens: int) -> Generated:
        cache = self.model.make_cache()
        start = 0
        if self._prefix and prompt[: len(self._prefix)] == self._prefix:
            # The cache grows by concatenation, so the shared prefix arrays are never written.
            for layer_cache, state in zip(cache, self._prefix_state, strict=True):
                layer_cache.state = state
            start = len(self._prefix)
        self.model.forward(mx.array(prompt[start:-1])[None], cache)
        sampler = Sampler(SamplingParams(temperature=0.0, constraint=constraint), self.grammar)
        eos = self.tokenizer.eos_token_ids
        ids: list[int] = []
        next_input = prompt[-1]
        finished = False
        for _ in range(max_tokens):
            logits = self.model.forward(mx.array([[next_input]]), cache)[:, -1, :]
            token = int(sampler(logits).item())
            if token in eos:
                finished = True
                break
            ids.append(token)
            next_input = token
        sampler.close()
        return Generated(self.tokenizer.decode(ids, skip_special_tokens=False), len(ids), finished)


@pytest.fixture(scope="module")
def generator(model_path: Path) -> Iterator[Generator]:
    loaded = load_model(CATALOG[DEFAULT_MODEL_ID], model_path, dtype="auto", progress=False)
    yield Generator(loaded)


def _valid_calls(text: str) -> tuple[int, str]:
    """(number of calls, problem or ""): parsed by the Hermes parser AND raw-valid."""
    calls = parse_tool_calls(text, TOOLS, "hermes").tool_calls
    if not calls:
        return 0, "no tool call"
    blocks = [b.split("</tool_call>")[0].strip() for b in text.split("<tool_call>")[1:]]
    if len(blocks) != len(calls):
        return len(calls), "parsed calls differ from the <tool_call> blocks"
    for block, call in zip(blocks, calls, strict=True):
        try:
            raw = json.loads(block)  # before the parser's normalization
            jsonschema.validate(raw["arguments"], SCHEMAS[raw["name"]])
        except (ValueError, KeyError, jsonschema.ValidationError) as error:
            return len(calls), f"invalid: {str(error).splitlines()[0]}"
        if raw["name"] != call.name:
            return len(calls), "name mismatch"
    return len(calls), ""


def _report(title: str, rows: list[tuple[str, str, str, str]], constrained: int) -> None:
    """Print each output, then how many were valid: the first `constrained` rows ran under
    the grammar, the rest (if any) without."""
    print(f"\n== {title}")
    for prompt, label, problem, text in rows:
        print(
            f"[{label:>13}] {'OK ' if not problem else 'BAD'} {prompt[:40]!r}: {problem} {text[:110]!r}"
        )
    valid = sum(1 for row in rows[:constrained] if not row[2])
    free = sum(1 for row in rows[constrained:] if not row[2])
    print(f"valid: constrained {valid}/{constrained}, unconstrained {free}/{constrained}")


def test_required_tool_calls_are_valid(generator: Generator) -> None:
    system = render_tools_system_prompt(TOOLS, "hermes")
    prompts = [generator.prompt(system, p) for p in TOOL_PROMPTS]
    generator.set_prefix(prompts)
    single = C.tool_call_constraint(TOOLS, "hermes", choice="required", parallel=False)
    parallel = C.tool_call_constraint(TOOLS, "hermes", choice="required", parallel=True)
    rows: list[tuple[str, str, str, str]] = []
    failures: list[str] = []
    started = time.perf_counter()
    for index, (user, prompt) in enumerate(zip(TOOL_PROMPTS, prompts, strict=True)):
        # Alternate parallel modes: exactly one call without, at least one with.
        is_parallel = index % 2 == 1
        out = generator.generate(prompt, parallel if is_parallel else single, MAX_TOKENS)
        count, problem = _valid_calls(out.text)
        if not problem and not is_parallel and count != 1:
            problem = f"{count} calls with parallel=False"
        if not problem and not out.finished:
            problem = "did not end"
        rows.append((user, "parallel" if is_parallel else "single", problem, out.text))
        if problem:
            failures.append(f"{user!r}: {problem}: {out.text!r}")
    constrained_seconds = time.perf_counter() - started
    for user, prompt in zip(TOOL_PROMPTS, prompts, strict=True) if COMPARE_TOKENS else ():
        out = generator.generate(prompt, None, COMPARE_TOKENS)
        rows.append((user, "unconstrained", _valid_calls(out.text)[1], out.text))
    title = f"tool_choice=required ({constrained_seconds:.1f}s constrained)"
    _report(title, rows, len(TOOL_PROMPTS))
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("fmt", ["llama3_json", "qwen3_coder"])
def test_required_tool_calls_in_other_formats(generator: Generator, fmt: str) -> None:
    """The model is shown the tools in `fmt`; every constrained output parses with that
    format's parser into calls whose arguments validate."""
    system = render_tools_system_prompt(TOOLS, fmt)
    spec = C.tool_call_constraint(TOOLS, fmt, choice="required", parallel=False)
    failures: list[str] = []
    for user in TOOL_PROMPTS[:2]:
        out = generator.generate(generator.prompt(system, user), spec, MAX_TOKENS)
        calls = parse_tool_calls(out.text, TOOLS, fmt).tool_calls
        problem = "" if out.finished else "did not end"
        if len(calls) != 1:
            problem = problem or f"{len(calls)} calls"
        else:
            try:
                jsonschema.validate(calls[0].arguments, SCHEMAS[calls[0].name])
            except jsonschema.ValidationError as error:
                problem = f"invalid: {error.message}"
        print(f"[{fmt}] {'OK ' if not problem else 'BAD'} {user!r}: {problem} {out.text!r}")
        if problem:
            failures.append(f"{user!r}: {problem}: {out.text!r}")
    assert not failures, "\n".join(failures)


def test_json_schema_documents_are_valid(generator: Generator) -> None:
    prompts = [generator.prompt(JSON_SYSTEM, p) for p in JSON_PROMPTS]
    generator.set_prefix(prompts)
    spec = C.json_schema_constraint(PERSON)
    rows: list[tuple[str, str, str, str]] = []
    failures: list[str] = []
    for user, prompt in zip(JSON_PROMPTS, prompts, strict=True):
        out = generator.generate(prompt, spec, MAX_TOKENS)
        problem = valid_document(out.text) or ("" if out.finished else "did not end")
        rows.append((user, "json_schema", problem, out.text))
        if problem:
            failures.append(f"{user!r}: {problem}: {out.text!r}")
    for user, prompt in zip(JSON_PROMPTS, prompts, strict=True) if COMPARE_TOKENS else ():
        out = generator.generate(prompt, None, COMPARE_TOKENS)
        rows.append((user, "unconstrained", valid_document(out.text), out.text))
    _report("response_format json_schema", rows, len(JSON_PROMPTS))
    assert not failures, "\n".join(failures)
