"""How often tool calls and JSON documents are valid, with and without constraints.

    .venv/bin/python benchmarks/constrained_accuracy.py [--count 50] [--max-tokens 80]

Starts a real 2-node pipeline cluster (two `exo-tools node` processes, the default model)
and sends, greedily:
- `--count` prompts with `tool_choice: "required"` over opencode-like tools (read, bash,
  edit, glob); every returned call's arguments are validated with `jsonschema` against its
  tool's schema. The same prompts with `tool_choice: "auto"` are the unconstrained baseline
  (the tools system prompt tells the model the call syntax either way).
- `--count` requests with `response_format: json_schema` over varied schemas; the document
  is validated against its schema. The baseline sends the same messages (which spell out
  the schema) without `response_format`; its content is accepted after stripping
  whitespace and a Markdown code fence.

Prints one table: valid / total per case, plus how the failures failed.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import print_table
from tests.helpers.agent_tools import TOOL_SCHEMAS, TOOLS

MODEL = "smollm2-135m"

# Varied coding-agent requests: each tool is the natural pick for some of them.
TOOL_PROMPTS = [
    "Read the file src/main.py",
    "Show me what's in README.md",
    "Open /home/dev/project/setup.cfg and tell me the version",
    "Read lines 40 to 80 of src/server/routes.py",
    "What does the Makefile contain?",
    "Look at package.json to see which test runner we use",
    "Print the first 20 lines of CHANGELOG.md",
    "Check the contents of .github/workflows/ci.yml",
    "Read tests/test_parser.py starting at line 100",
    "Inspect the Dockerfile",
    "Run the test suite with pytest",
    "Show me the git status",
    "Install the dependencies with npm install",
    "Count the lines of Python code in this repository",
    "Run `make build` and tell me if it fails",
    "List the files in the current directory",
    "Check which version of node is installed",
    "Start the dev server with a 30 second timeout",
    "Show the last 5 commits in the git log",
    "Run the linter: ruff check src",
    "Find every TODO comment in the codebase with grep",
    "Create a new directory called build/output",
    "Replace foo with bar in app.js",
    "Change the port from 8080 to 9090 in config.yaml",
    "Rename the function getUser to fetchUser in src/api.ts",
    "In README.md, fix the typo 'recieve' -> 'receive' everywhere",
    "Set DEBUG = False in settings.py",
    "Update the copyright year from 2023 to 2024 in LICENSE",
    "In main.go change the log level from info to debug",
    "Bump the version in pyproject.toml from 1.2.0 to 1.3.0",
    "Replace all tabs with four spaces in Makefile.inc",
    "Change 'localhost' to '0.0.0.0' in server.js",
    "List all Python files in the repo",
    "Find all markdown files under docs",
    "Which TypeScript files are in src/components?",
    "Find every test file named test_*.py",
    "Locate all YAML files in the config folder",
    "Are there any .env files in this project?",
    "Find the Rust sources under crates/",
    "List all JSON files at the top level",
    "Find images (*.png) in the assets directory",
    "Search for files named Dockerfile anywhere",
    "Why does the build fail? Start by reading build.log",
    "Add a docstring to the parse function in utils/parse.py",
    "Fix the failing test in tests/test_math.py",
    "How is the project structured? Look around first.",
    "Delete the temporary files in /tmp/cache",
    "What Python version does this project require?",
    "Refactor the database module to use async",
    "Summarize what src/cli.py does",
]

JSON_CASES: list[tuple[dict[str, Any], list[str]]] = [
    (
        {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "age": {"type": "integer", "minimum": 0, "maximum": 150},
                "city": {"type": "string"},
            },
            "required": ["name", "age"],
            "additionalProperties": False,
        },
        [
            "Alice is a 34 year old engineer from Paris.",
            "Describe a retired teacher named Bob who lives in Leeds.",
            "Tom is 12 and plays football in Madrid.",
            "Make up a character for a fantasy novel.",
            "My grandmother is 90 and lives in Rome.",
        ],
    ),
    (
        {
            "type": "object",
            "properties": {
                "title": {"type": "string"},
                "priority": {"enum": ["low", "medium", "high"]},
                "done": {"type": "boolean"},
                "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
            },
            "required": ["title", "priority", "done"],
            "additionalProperties": False,
        },
        [
            "Todo: buy milk, not urgent.",
            "Urgent task: fix the production outage.",
            "I already finished writing the report.",
            "Remember to call the dentist next week, medium priority.",
            "Plan the team offsite; tag it work and travel.",
        ],
    ),
    (
        {
            "type": "object",
            "properties": {
                "product": {"type": "string"},
                "price": {"type": "number", "minimum": 0},
                "currency": {"enum": ["USD", "EUR", "GBP"]},
                "in_stock": {"type": "boolean"},
            },
            "required": ["product", "price", "currency", "in_stock"],
            "additionalProperties": False,
        },
        [
            "A red bicycle for 299 dollars, available now.",
            "Wireless headphones, 89.99 euros, sold out.",
            "A cup of coffee costs 3 pounds.",
            "Laptop stand, $45, in stock.",
            "Describe any product you like.",
        ],
    ),
    (
        {
            "type": "object",
            "properties": {
                "street": {"type": "string"},
                "city": {"type": "string"},
                "postcode": {"type": "string", "pattern": "^[0-9]{5}$"},
                "country": {"type": "string"},
            },
            "required": ["street", "city", "postcode", "country"],
            "additionalProperties": False,
        },
        [
            "10 Rue de Rivoli, 75001 Paris, France.",
            "The office is at Hauptstrasse 5 in 10115 Berlin.",
            "Give me an address in Spain.",
            "1600 Pennsylvania Avenue, Washington DC 20500, USA.",
            "Invent an address for a bakery in Italy.",
        ],
    ),
    (
        {
            "type": "object",
            "properties": {
                "sentiment": {"enum": ["positive", "negative", "neutral"]},
                "confidence": {"type": "number", "minimum": 0, "maximum": 1},
            },
            "required": ["sentiment", "confidence"],
            "additionalProperties": False,
        },
        [
            "Classify: 'I love this phone, the battery lasts forever.'",
            "Classify: 'The delivery was late and the box was broken.'",
            "Classify: 'It is a chair.'",
            "Classify: 'Best concert of my life!'",
            "Classify: 'I want a refund.'",
        ],
    ),
    (
        {
            "type": "object",
            "properties": {
                "event": {"type": "string"},
                "date": {"type": "string", "format": "date"},
                "attendees": {
                    "type": "array",
                    "items": {"type": "string"},
                    "minItems": 1,
                    "maxItems": 5,
                },
            },
            "required": ["event", "date", "attendees"],
            "additionalProperties": False,
        },
        [
            "Lunch with Ann and Raj on 2024-05-03.",
            "Team standup tomorrow with the whole backend team.",
            "Schedule a birthday party for Lisa on March 14th 2025.",
            "Board meeting on 2024-12-01 with the CEO and CFO.",
            "A wedding next summer.",
        ],
    ),
    (
        {
            "type": "object",
            "properties": {
                "server": {
                    "type": "object",
                    "properties": {
                        "host": {"type": "string"},
                        "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                    },
                    "required": ["host", "port"],
                    "additionalProperties": False,
                },
                "debug": {"type": "boolean"},
                "workers": {"type": "integer", "minimum": 1, "maximum": 64},
            },
            "required": ["server", "debug"],
            "additionalProperties": False,
        },
        [
            "Configure a server on localhost port 8080 with debug on.",
            "Production config: host 0.0.0.0, port 443, 8 workers, no debug.",
            "A development setup on port 3000.",
            "Use example.com on port 80 with 2 workers.",
            "Give me a sensible default configuration.",
        ],
    ),
    (
        {
            "type": "object",
            "properties": {
                "type": {"enum": ["feat", "fix", "docs", "refactor", "test", "chore"]},
                "scope": {"type": "string", "maxLength": 20},
                "subject": {"type": "string", "maxLength": 72},
            },
            "required": ["type", "subject"],
            "additionalProperties": False,
        },
        [
            "Commit message for: fixed a crash when the config file is empty.",
            "Commit message for: added dark mode to the settings page.",
            "Commit message for: updated the README installation steps.",
            "Commit message for: renamed variables in the parser for clarity.",
            "Commit message for: added unit tests for the date utils.",
        ],
    ),
    (
        {
            "type": "object",
            "properties": {
                "answer": {"type": "string"},
                "sources": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "title": {"type": "string"},
                            "url": {"type": "string"},
                        },
                        "required": ["title"],
                        "additionalProperties": False,
                    },
                    "maxItems": 3,
                },
            },
            "required": ["answer", "sources"],
            "additionalProperties": False,
        },
        [
            "What is the capital of France?",
            "Who wrote Hamlet?",
            "How many legs does a spider have?",
            "What is the boiling point of water at sea level?",
            "Name the largest planet in the solar system.",
        ],
    ),
    (
        {
            "type": "object",
            "properties": {
                "status": {"enum": ["ok", "error"]},
                "result": {
                    "anyOf": [
                        {"type": "integer"},
                        {"type": "string"},
                    ]
                },
                "message": {"type": "string"},
            },
            "required": ["status", "result"],
            "additionalProperties": False,
        },
        [
            "Compute 2 + 2.",
            "What is 7 times 6?",
            "Divide 10 by 0.",
            "Reverse the string 'hello'.",
            "What is the square root of -1 in the reals?",
        ],
    ),
]


@dataclass
class Outcome:
    valid: bool
    reason: str  # "" when valid, else a short failure class
    tokens: int
    text: str = ""  # the reply's content, shown for a few failures


def chat(url: str, body: dict[str, Any]) -> dict[str, Any]:
    import requests

    reply = requests.post(f"{url}/v1/chat/completions", json=body, timeout=900)
    if reply.status_code != 200:
        raise RuntimeError(f"HTTP {reply.status_code}: {reply.text[:500]}")
    return reply.json()


def check_tool_calls(reply: dict[str, Any]) -> Outcome:
    """Valid = at least one call, and every call names a declared tool whose schema its
    arguments (as the client receives them) satisfy."""
    import jsonschema

    choice = reply["choices"][0]
    tokens = int(reply["usage"]["completion_tokens"])
    calls = choice["message"].get("tool_calls") or []
    if not calls:
        reason = "cut at max_tokens" if choice["finish_reason"] == "length" else "no call"
        return Outcome(False, reason, tokens, choice["message"].get("content") or "")
    for call in calls:
        schema = TOOL_SCHEMAS.get(call["function"]["name"])
        if schema is None:
            return Outcome(False, "unknown tool", tokens)
        try:
            jsonschema.validate(json.loads(call["function"]["arguments"]), schema)
        except ValueError:
            return Outcome(False, "arguments not JSON", tokens)
        except jsonschema.ValidationError:
            return Outcome(False, "schema violation", tokens)
    return Outcome(True, "", tokens)


_FENCE = re.compile(r"^```(?:json)?\s*\n?(.*?)\n?```$", re.DOTALL)


def check_document(schema: dict[str, Any]) -> Callable[[dict[str, Any]], Outcome]:
    import jsonschema

    def check(reply: dict[str, Any]) -> Outcome:
        tokens = int(reply["usage"]["completion_tokens"])
        choice = reply["choices"][0]
        text = (choice["message"].get("content") or "").strip()
        fenced = _FENCE.match(text)
        try:
            document = json.loads(fenced.group(1) if fenced else text)
        except ValueError:
            cut = choice["finish_reason"] == "length"
            return Outcome(False, "cut at max_tokens" if cut else "not JSON", tokens, text)
        try:
            jsonschema.validate(document, schema, format_checker=jsonschema.FormatChecker())
        except jsonschema.ValidationError:
            return Outcome(False, "schema violation", tokens, text)
        return Outcome(True, "", tokens)

    return check


def tool_request(prompt: str, constrained: bool, max_tokens: int) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "tools": TOOLS,
        "tool_choice": "required" if constrained else "auto",
        # One call per reply: parallel mode lets the model repeat calls up to the bound.
        "parallel_tool_calls": False,
        "temperature": 0,
        "max_tokens": max_tokens,
    }


def json_request(
    schema: dict[str, Any], prompt: str, constrained: bool, max_tokens: int
) -> dict[str, Any]:
    system = (
        "Reply with only a JSON object, no prose, that is valid against this JSON schema:\n"
        + json.dumps(schema)
    )
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": max_tokens,
    }
    if constrained:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": schema, "strict": True},
        }
    return body


def run_case(
    url: str,
    requests_and_checks: list[tuple[dict[str, Any], Callable[[dict[str, Any]], Outcome]]],
    concurrency: int,
) -> tuple[list[Outcome], float]:
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        outcomes = list(pool.map(lambda item: item[1](chat(url, item[0])), requests_and_checks))
    return outcomes, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=50, help="requests per case (max 50)")
    parser.add_argument("--max-tokens", type=int, default=80)
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    parser.add_argument("--nodes", type=int, default=2, help="pipeline stages")
    parser.add_argument("--url", help="use a running node instead of starting a cluster")
    parser.add_argument("--show", type=int, default=2, help="failed replies to print per case")
    parser.add_argument("--only", choices=["tools", "json"], help="run one kind only")
    args = parser.parse_args()

    tool_prompts = TOOL_PROMPTS[: args.count]
    json_items = [
        (schema, p)
        for index in range(5)
        for schema, ps in JSON_CASES
        for p in ps[index : index + 1]
    ]
    json_items = json_items[: args.count]

    def cases(constrained: bool) -> dict[str, list[tuple[dict[str, Any], Any]]]:
        return {
            "tools": [
                (tool_request(p, constrained, args.max_tokens), check_tool_calls)
                for p in tool_prompts
            ],
            "json": [
                (json_request(s, p, constrained, args.max_tokens), check_document(s))
                for s, p in json_items
            ],
        }

    nodes: list[Any] = []
    if args.url:
        url = args.url
    else:
        from benchmarks.pipeline import start_pipeline

        nodes = start_pipeline(args.nodes)
        url = nodes[0].url
    results: dict[tuple[str, bool], tuple[list[Outcome], float]] = {}
    try:
        for constrained in (True, False):
            for kind, items in cases(constrained).items():
                if args.only and kind != args.only:
                    continue
                results[kind, constrained] = run_case(url, items, args.concurrency)
                outcomes, seconds = results[kind, constrained]
                print(
                    f"{kind} constrained={constrained}: "
                    f"{sum(o.valid for o in outcomes)}/{len(outcomes)} valid, {seconds:.0f}s",
                    flush=True,
                )
    finally:
        for node in nodes:
            node.stop()

    labels = {
        ("tools", True): 'tool_choice "required" (constrained)',
        ("tools", False): 'tool_choice "auto" (unconstrained)',
        ("json", True): "response_format json_schema (constrained)",
        ("json", False): "schema in prompt only (unconstrained)",
    }
    rows: list[list[str]] = []
    labels = {key: label for key, label in labels.items() if key in results}
    for key, label in labels.items():
        outcomes, seconds = results[key]
        valid = sum(o.valid for o in outcomes)
        failures = Counter(o.reason for o in outcomes if not o.valid)
        rows.append(
            [
                label,
                f"{valid}/{len(outcomes)}",
                f"{100 * valid / len(outcomes):.0f}%",
                f"{sum(o.tokens for o in outcomes) / len(outcomes):.1f}",
                ", ".join(f"{reason} {n}" for reason, n in failures.most_common()) or "-",
                f"{seconds:.0f}",
            ]
        )
    for key, label in labels.items():
        shown = [o for o in results[key][0] if not o.valid][: args.show]
        for outcome in shown:
            print(f"{label}: {outcome.reason}: {outcome.text[:160]!r}")
    where = args.url or f"{args.nodes}-node pipeline"
    print_table(
        f"Validity, {MODEL} on a {where}, greedy, max_tokens {args.max_tokens}",
        ["case", "valid", "rate", "mean tokens", "failures", "seconds"],
        rows,
    )


if __name__ == "__main__":
    main()
