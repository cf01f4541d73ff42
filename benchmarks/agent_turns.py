"""Agent turns: does turn N cost only its new tokens? exo-tools against mlx-lm's server.

    .venv/bin/python benchmarks/agent_turns.py [--turns 8] [--system-tokens 2600]
        [--turn-tokens 150] [--targets node,pipeline,mlx-lm]
    .venv/bin/python benchmarks/agent_turns.py --replay requests.jsonl

An agent re-sends its whole conversation every turn: a long system prompt (instructions
and tool descriptions), then every earlier turn. This runs that workload, greedy and
streamed, against each target in one run on the same weights, and prints the time to
first token of every turn:

- `node`: one exo-tools node serving the default model (2 BLAS threads);
- `pipeline`: two exo-tools nodes, a 2-stage pipeline (1 BLAS thread each);
- `mlx-lm`: `python -m mlx_lm.server` (mlx-lm's own server, with its LRU prompt cache) on
  the same weights written as an MLX folder, with the same OpenBLAS preload (2 threads).

Each turn's user message is ~`--turn-tokens` tokens of tool output and a question; the
assistant's answer (up to 16 tokens) joins the history. `--replay FILE` instead sends the
request bodies a node recorded with `--log-requests FILE` (a real client's session) to a
fresh node, in order, and prints how many prompt tokens after the first request came
from the prefix cache.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import load_default, mlx_lm_server, print_table
from tests.helpers.cluster_runs import start_cluster
from tests.helpers.model_export import export_hf_folder
from tests.helpers.nodes import node_environment, start_node

MODEL = "smollm2-135m"
ANSWER_TOKENS = 16
TARGETS = ("node", "pipeline", "mlx-lm")
TOOLS = ["read_file", "write_file", "run_shell", "search_code", "list_directory"]


def system_prompt(tokenizer: Any, tokens: int) -> str:
    """An agent's system prompt of about `tokens` tokens: rules, then tool descriptions."""
    parts = [
        "You are a coding agent working in the user's repository. Follow the rules below.",
    ]
    rule = 0
    while len(tokenizer.encode("\n".join(parts))) < tokens:
        tool = TOOLS[rule % len(TOOLS)]
        parts.append(
            f"Rule {rule}: before you call {tool}, say in one line why; keep edits small, "
            f"run the tests after each change, and never touch files outside the project. "
            f"The {tool} tool takes a JSON object; report its errors to the user verbatim."
        )
        rule += 1
    return "\n".join(parts)


def turn_message(tokenizer: Any, turn: int, tokens: int) -> str:
    """A user turn of about `tokens` tokens: a tool's output, then a question."""
    lines = [f"Output of step {turn}:"]
    line = 0
    while len(tokenizer.encode("\n".join(lines))) < tokens:
        lines.append(f"src/module_{turn}_{line}.py:{10 + line}: def handler_{line}(event): pass")
        line += 1
    lines.append(f"Question {turn}: which file should I open next, and why?")
    return "\n".join(lines)


def streamed_turn(
    url: str, model: str, messages: list[dict[str, str]], timeout: float = 900.0
) -> tuple[float, str, dict[str, Any]]:
    """One streamed greedy request: seconds to the first token, the text, the usage."""
    body = {
        "model": model,
        "messages": messages,
        "temperature": 0,
        "max_tokens": ANSWER_TOKENS,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first: float | None = None
    parts: list[str] = []
    usage: dict[str, Any] = {}
    with requests.post(
        f"{url}/v1/chat/completions", json=body, stream=True, timeout=timeout
    ) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[len(b"data: ") :])
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices", []):
                text = (choice.get("delta") or {}).get("content") or ""
                if text or choice.get("finish_reason"):
                    if first is None:
                        first = time.perf_counter() - started
                    parts.append(text)
    return (first if first is not None else time.perf_counter() - started), "".join(parts), usage


def run_conversation(
    url: str, model: str, system: str, turns: list[str], label: str
) -> list[tuple[float, int, int]]:
    """TTFT, prompt tokens and cached tokens of each turn."""
    messages = [{"role": "system", "content": system}]
    results: list[tuple[float, int, int]] = []
    for index, question in enumerate(turns, start=1):
        messages.append({"role": "user", "content": question})
        ttft, text, usage = streamed_turn(url, model, messages)
        prompt = int(usage.get("prompt_tokens", 0))
        cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0))
        print(f"  {label} turn {index}: TTFT {ttft:.2f} s, prompt {prompt}, cached {cached}")
        results.append((ttft, prompt, cached))
        messages.append({"role": "assistant", "content": text})
    return results


def measure(
    target: str, folder: Path, system: str, turns: list[str]
) -> list[tuple[float, int, int]]:
    print(f"== {target}", flush=True)
    if target == "mlx-lm":
        with mlx_lm_server(folder) as url:
            return run_conversation(url, str(folder), system, turns, target)
    if target == "node":
        node = start_node(env=node_environment(threads=2))
        try:
            return run_conversation(node.url, MODEL, system, turns, target)
        finally:
            node.stop()
    cluster = start_cluster(2)
    try:
        return run_conversation(cluster.master.url, MODEL, system, turns, target)
    finally:
        cluster.stop()


def agent_turns(args: argparse.Namespace) -> int:
    targets = [t for t in args.targets.split(",") if t]
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        print(f"--targets: unknown {', '.join(unknown)} (choose from {', '.join(TARGETS)})")
        return 2
    loaded = load_default()
    tokenizer = loaded.tokenizer
    system = system_prompt(tokenizer, args.system_tokens)
    turns = [turn_message(tokenizer, t, args.turn_tokens) for t in range(1, args.turns + 1)]
    with tempfile.TemporaryDirectory(prefix="agent-turns-") as scratch:
        folder = Path(scratch) / "SmolLM2-135M-mlx"
        if "mlx-lm" in targets:
            export_hf_folder(loaded, folder)
        del loaded
        results = {target: measure(target, folder, system, turns) for target in targets}
    header = ["turn", *[f"{t} TTFT s" for t in targets], *[f"{t} cached" for t in targets]]
    rows = []
    for index in range(args.turns):
        rows.append(
            [
                str(index + 1),
                *[f"{results[t][index][0]:.2f}" for t in targets],
                *[f"{results[t][index][2]}/{results[t][index][1]}" for t in targets],
            ]
        )
    print_table(
        f"Agent turns: {args.system_tokens}-token system prompt, +{args.turn_tokens} tokens a "
        "turn, streamed, greedy; time to first token",
        header,
        rows,
    )
    last = args.turns - 1
    summary: list[list[str]] = []
    for target in targets:
        ttft = [r[0] for r in results[target]]
        versus = ""
        if "mlx-lm" in results and target != "mlx-lm":
            versus = f"{ttft[last] / results['mlx-lm'][last][0]:.2f}x"
        growth = f"{ttft[last] / ttft[1]:.2f}" if args.turns > 1 else "-"
        summary.append([target, f"{ttft[last]:.2f}", versus, growth])
    print_table(
        f"Turn {args.turns}",
        ["target", f"TTFT turn {args.turns} s", "vs mlx-lm server", f"turn {args.turns}/turn 2"],
        summary,
    )
    return 0


# ---------------------------------------------------------------- replaying a session


def _cached_of(path: str, usage: dict[str, Any]) -> tuple[int, int]:
    """Prompt tokens and cached prompt tokens from each API's usage shape."""
    if path == "/v1/messages":
        cached = int(usage.get("cache_read_input_tokens", 0))
        return int(usage.get("input_tokens", 0)) + cached, cached
    if path == "/v1/responses":
        details = usage.get("input_tokens_details") or {}
        return int(usage.get("input_tokens", 0)), int(details.get("cached_tokens", 0))
    details = usage.get("prompt_tokens_details") or {}
    return int(usage.get("prompt_tokens", 0)), int(details.get("cached_tokens", 0))


def replay(args: argparse.Namespace) -> int:
    records = [json.loads(line) for line in args.replay.read_text().splitlines() if line.strip()]
    if not records:
        print(f"--replay: {args.replay} holds no requests")
        return 2
    node = start_node(env=node_environment(threads=2))
    rows: list[list[str]] = []
    counts: list[tuple[int, int]] = []
    try:
        for index, record in enumerate(records, start=1):
            body = dict(record["body"])
            body["stream"] = False  # the usage comes whole
            body.pop("stream_options", None)
            started = time.perf_counter()
            response = requests.post(f"{node.url}{record['path']}", json=body, timeout=900)
            seconds = time.perf_counter() - started
            if response.status_code != 200:
                rows.append([str(index), record["path"], "-", "-", response.text[:60]])
                continue
            prompt, cached = _cached_of(record["path"], response.json().get("usage") or {})
            counts.append((prompt, cached))
            rows.append([str(index), record["path"], str(prompt), str(cached), f"{seconds:.1f}"])
    finally:
        node.stop()
    print_table(
        f"Replay of {args.replay.name}", ["request", "route", "prompt", "cached", "s"], rows
    )
    later_prompt = sum(prompt for prompt, _ in counts[1:])
    later_cached = sum(cached for _, cached in counts[1:])
    if later_prompt:
        print(
            f"after the first request: {later_cached}/{later_prompt} prompt tokens from the "
            f"prefix cache ({100 * later_cached / later_prompt:.1f} %)"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=8, help="turns per conversation")
    parser.add_argument("--system-tokens", type=int, default=2600)
    parser.add_argument("--turn-tokens", type=int, default=150, help="new tokens a turn")
    parser.add_argument(
        "--targets", default=",".join(TARGETS), help=f"comma-separated of {', '.join(TARGETS)}"
    )
    parser.add_argument(
        "--replay", type=Path, default=None, help="replay a node's --log-requests file instead"
    )
    args = parser.parse_args(argv)
    if args.replay is not None:
        return replay(args)
    return agent_turns(args)


if __name__ == "__main__":
    sys.exit(main())
