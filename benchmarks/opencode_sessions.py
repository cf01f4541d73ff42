"""Do opencode sessions run tools, with and without the lazy tool-call grammar?

    .venv/bin/python benchmarks/opencode_sessions.py [--sessions 10] [--output-limit 96]

Runs `opencode run --format json` headless and offline (config as in
tests/e2e/test_tool_calling_clients.py) against one node serving the default model,
once per mode: the node without the lazy grammar (tool_choice "auto" unconstrained) and
with it (`--lazy-tool-grammar`: a call is constrained to its schema once the model starts
one). Each session gets its own small project directory and one of ten coding-agent
prompts. A session counts as "executed a tool" when opencode reports a tool part that ran
(status completed or error: the tool was called with arguments it accepted as a call).
The session is stopped at its first executed tool or after `--timeout` seconds: the count
is about starting tools, and a small model can loop on tools for many steps.

Needs opencode (scripts/install.sh --test installs it into .tools) and ripgrep.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import print_table
from tests.helpers.opencode import opencode_binary, opencode_environment

MODEL = "smollm2-135m"
# Node flags per mode; the unconstrained mode turns the grammar off explicitly so the
# comparison holds whatever the node's default is.
MODES: dict[str, list[str]] = {
    "unconstrained": ["--no-lazy-tool-grammar"],
    "lazy": ["--lazy-tool-grammar"],
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


@dataclass
class Session:
    prompt: str
    tools: list[str] = field(default_factory=list)  # tool parts that ran: "name:status"
    errors: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)  # opencode's JSON lines, as printed
    seconds: float = 0.0
    timed_out: bool = False

    @property
    def executed(self) -> bool:
        return bool(self.tools)


def require_opencode() -> str:
    found = opencode_binary()
    if found is None:
        raise SystemExit("opencode not installed: scripts/install.sh --test")
    return found


def make_project(root: Path, url: str, output_limit: int) -> dict[str, str]:
    for name, text in PROJECT_FILES.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return opencode_environment(root, url, MODEL, output_limit)


def tool_runs(event: dict[str, Any]) -> list[str]:
    """Tool parts in an opencode JSON event that were executed (completed or error)."""
    part = event.get("part")
    if not isinstance(part, dict) or part.get("type") != "tool":
        return []
    state = part.get("state") or {}
    status = state.get("status")
    return [f"{part.get('tool')}:{status}"] if status in {"completed", "error"} else []


def run_session(binary: str, url: str, prompt: str, output_limit: int, timeout: float) -> Session:
    session = Session(prompt)
    with tempfile.TemporaryDirectory(prefix="exo-opencode-") as directory:
        root = Path(directory)
        env = make_project(root, url, output_limit)
        started = time.perf_counter()
        process = subprocess.Popen(
            [binary, "run", "--format", "json", "--model", f"exo/{MODEL}", "--title", "t", prompt],
            cwd=root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,  # its own group: stopping it stops its children
        )
        timer = threading.Timer(timeout, lambda: _stop(process, session))
        timer.start()
        try:
            assert process.stdout is not None
            for line in process.stdout:
                if not line.startswith("{"):
                    continue
                session.events.append(line)
                event = json.loads(line)
                if event.get("type") == "error":
                    session.errors.append(json.dumps(event.get("error"))[:200])
                session.tools += tool_runs(event)
                if session.tools:
                    break
        finally:
            timer.cancel()
            _stop(process, None)
        session.seconds = time.perf_counter() - started
    return session


def _stop(process: subprocess.Popen[str], session: Session | None) -> None:
    if process.poll() is not None:
        return
    if session is not None:
        session.timed_out = True
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=10, help="sessions per mode (max 10)")
    parser.add_argument("--output-limit", type=int, default=96, help="opencode output tokens")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per session")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated modes")
    parser.add_argument("--events", type=Path, help="write each session's JSON events here")
    args = parser.parse_args()

    from tests.helpers.nodes import node_environment, start_node

    binary = require_opencode()
    prompts = PROMPTS[: args.sessions]
    results: dict[str, list[Session]] = {}
    for mode in args.modes.split(","):
        # One node on the machine: both cores for its BLAS.
        node = start_node(*MODES[mode], env=node_environment(threads=2))
        try:
            sessions = []
            for prompt in prompts:
                session = run_session(binary, node.url, prompt, args.output_limit, args.timeout)
                sessions.append(session)
                if args.events:
                    args.events.mkdir(parents=True, exist_ok=True)
                    name = f"{mode}-{len(sessions)}.jsonl"
                    (args.events / name).write_text("".join(session.events))
                print(
                    f"[{mode}] {prompt[:50]!r}: tools={session.tools} errors={session.errors} "
                    f"{'timeout ' if session.timed_out else ''}{session.seconds:.0f}s",
                    flush=True,
                )
            results[mode] = sessions
        finally:
            node.stop()

    rows = [
        [
            mode,
            f"{sum(s.executed for s in sessions)}/{len(sessions)}",
            str(sum(1 for s in sessions if s.errors)),
            str(sum(1 for s in sessions if s.timed_out)),
            f"{sum(s.seconds for s in sessions) / len(sessions):.0f}",
        ]
        for mode, sessions in results.items()
    ]
    print_table(
        f"opencode headless sessions, {MODEL}, one node, output limit {args.output_limit}",
        ["node mode", "sessions that ran a tool", "with error events", "timed out", "mean s"],
        rows,
    )


if __name__ == "__main__":
    main()
