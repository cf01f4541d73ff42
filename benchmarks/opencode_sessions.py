"""Do agent CLI sessions run tools and answer? opencode, Claude Code and Codex, per node mode.

    .venv/bin/python benchmarks/opencode_sessions.py [--client opencode|claude|codex]
        [--modes tool-on-user-turn,unconstrained,lazy] [--sessions 10] [--output-limit 96]

Runs one CLI headless and offline (tests/helpers/agent_clis.py: `opencode run --format
json` over chat completions, `claude -p --output-format stream-json` with a short
`--system-prompt` and `--tools Read,Bash` over Anthropic Messages, `codex exec --json`
with a `model_providers` entry over the Responses API) against one node serving the
default model, once per node mode: `unconstrained` (tool_choice "auto" free), `lazy`
(`--lazy-tool-grammar`: a call is constrained once the model starts one) and
`tool-on-user-turn` (`--require-tool-on-user-turn`: a user's turn is answered with one
call under the grammar, a tool result freely); every node gets `--default-max-tokens`,
`--default-temperature`, `--default-top-p`, `--default-repetition-penalty` and
`--default-dry-multiplier` (the CLIs set no sampling parameters; the defaults are SmolLM2's
card's, 0.2 and 0.9, a penalty of 1.3 that stops its short loops, and DRY off), and
`--wrap-up-share` (0.5: an answer past half its output limit ends at its next sentence end).
Each session gets its own small project directory and one of ten coding-agent prompts,
and runs until the CLI exits (or `--timeout`). A session "ran a tool" when the CLI reports a tool that ran (completed or
error: the call was accepted as one), "answered" when it ended with a text answer, and
has errors when the CLI printed error events (or a non-success result).

Needs the CLIs (scripts/install.sh --test installs them into .tools); opencode needs
ripgrep.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import print_table
from tests.helpers.agent_clis import CLIENT_BINARIES, Session, client, run_session

MODEL = "smollm2-135m"
# Node flags per mode; the unconstrained mode turns the grammar off explicitly so the
# comparison holds whatever the node's default is.
MODES: dict[str, list[str]] = {
    "unconstrained": ["--no-lazy-tool-grammar"],
    "lazy": ["--lazy-tool-grammar"],
    "tool-on-user-turn": ["--require-tool-on-user-turn"],
}
PROMPTS = [
    "What is in notes.txt?",
    "Read src/app.py and explain what the main function does.",
    "Run the tests in tests/test_math.py and tell me if they pass.",
    "Find all Python files in this project.",
    "In config.yaml, change the port from 8080 to 9090.",
    "List the files in the src directory.",
    "Fix the bug in src/math_utils.py: add() subtracts instead of adding.",
    "Show me the dependencies declared in requirements.txt.",
    "Search the code for TODO comments.",
    "Add a docstring to the greet function in src/app.py.",
]
PROJECT_FILES = {
    "notes.txt": "Remember: release on Friday.\nOwner: Dana\n",
    "README.md": "# demo\n\nA tiny demo project.\n",
    "requirements.txt": "requests==2.32.3\npytest==8.3.3\n",
    "config.yaml": "server:\n  host: 127.0.0.1\n  port: 8080\n",
    "src/app.py": (
        "def greet(name):\n    return f'Hello, {name}!'\n\n\n"
        "def main():\n    # TODO: read the name from argv\n    print(greet('world'))\n\n\n"
        "if __name__ == '__main__':\n    main()\n"
    ),
    "src/math_utils.py": "def add(a, b):\n    return a - b  # TODO: fix\n",
    "tests/test_math.py": (
        "from src.math_utils import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n"
    ),
}


def make_project(root: Path) -> None:
    for name, text in PROJECT_FILES.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--client", choices=list(CLIENT_BINARIES), default="opencode")
    parser.add_argument("--sessions", type=int, default=10, help="sessions per mode (max 10)")
    parser.add_argument("--output-limit", type=int, default=96, help="output tokens per turn")
    parser.add_argument("--max-turns", type=int, default=4, help="Claude Code's --max-turns")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per session")
    parser.add_argument(
        "--default-max-tokens",
        type=int,
        default=256,
        help="the node's limit for requests that set none (Codex sets none)",
    )
    parser.add_argument(
        "--default-temperature",
        type=float,
        default=0.2,
        help="the node's temperature for requests that set none (the CLIs set none); "
        "0.2 and top_p 0.9 are what SmolLM2's model card samples with",
    )
    parser.add_argument("--default-top-p", type=float, default=0.9)
    parser.add_argument(
        "--default-repetition-penalty",
        type=float,
        default=1.3,
        help="the node's repetition penalty for requests that set none (1.0: off); at 0.2 "
        "without one the 135M model's answers loop until the output limit",
    )
    parser.add_argument(
        "--default-dry-multiplier",
        type=float,
        default=0.0,
        help="the node's DRY multiplier for requests that set none (0: off, as in "
        "AGENT_NODE_FLAGS; 0.8 is llama.cpp's suggestion)",
    )
    parser.add_argument(
        "--wrap-up-share",
        type=float,
        default=0.5,
        help="the node's --wrap-up-share (0: off): an answer past this share of its output "
        "limit ends at its next sentence or line end instead of being cut at the limit",
    )
    parser.add_argument("--modes", default="tool-on-user-turn", help="comma-separated modes")
    parser.add_argument("--events", type=Path, help="write each session's JSON events here")
    parser.add_argument(
        "--record",
        type=Path,
        help="the node records every request body here (--log-requests), for "
        "benchmarks/agent_turns.py --replay",
    )
    args = parser.parse_args()

    from tests.helpers.nodes import node_environment, start_node

    cli = client(args.client, max_turns=args.max_turns)
    if cli is None:
        raise SystemExit(f"{args.client} not installed: scripts/install.sh --test")
    prompts = PROMPTS[: args.sessions]
    results: dict[str, list[Session]] = {}
    for mode in args.modes.split(","):
        # One node on the machine: both cores for its BLAS.
        flags = [
            *MODES[mode],
            "--default-max-tokens",
            str(args.default_max_tokens),
            "--default-temperature",
            str(args.default_temperature),
            "--default-top-p",
            str(args.default_top_p),
            "--default-repetition-penalty",
            str(args.default_repetition_penalty),
            "--default-dry-multiplier",
            str(args.default_dry_multiplier),
            "--wrap-up-share",
            str(args.wrap_up_share),
        ]
        if args.record:
            flags += ["--log-requests", str(args.record)]
        node = start_node(*flags, env=node_environment(threads=2))
        try:
            sessions = []
            for prompt in prompts:
                with tempfile.TemporaryDirectory(prefix=f"exo-{args.client}-") as directory:
                    root = Path(directory)
                    make_project(root)
                    session = run_session(
                        cli,
                        root,
                        node.url,
                        MODEL,
                        prompt,
                        output_limit=args.output_limit,
                        timeout=args.timeout,
                    )
                sessions.append(session)
                if args.events:
                    args.events.mkdir(parents=True, exist_ok=True)
                    name = f"{args.client}-{mode}-{len(sessions)}.jsonl"
                    (args.events / name).write_text("".join(session.events))
                print(
                    f"[{args.client} {mode}] {prompt[:50]!r}: tools={session.tools} "
                    f"answer={session.answer[:60]!r} errors={session.errors} "
                    f"{'timeout ' if session.timed_out else ''}{session.seconds:.0f}s",
                    flush=True,
                )
            results[mode] = sessions
        finally:
            node.stop()

    rows = [
        [
            args.client,
            mode,
            f"{sum(s.ran_a_tool for s in sessions)}/{len(sessions)}",
            f"{sum(s.ran_a_tool and s.answered for s in sessions)}/{len(sessions)}",
            f"{sum(s.ran_a_tool and s.answered and not s.errors for s in sessions)}"
            f"/{len(sessions)}",
            str(sum(1 for s in sessions if s.errors)),
            str(sum(1 for s in sessions if s.timed_out)),
            f"{sum(s.seconds for s in sessions) / len(sessions):.0f}",
        ]
        for mode, sessions in results.items()
    ]
    print_table(
        f"{args.client} headless sessions, {MODEL}, one node, output limit {args.output_limit}, "
        f"temperature {args.default_temperature}, top_p {args.default_top_p}, "
        f"DRY {args.default_dry_multiplier}, "
        f"repetition penalty {args.default_repetition_penalty}, "
        f"wrap-up share {args.wrap_up_share}",
        [
            "client",
            "node mode",
            "ran a tool",
            "ran a tool, then answered",
            "... with no error",
            "with error events",
            "timed out",
            "mean s",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
