"""Run agent CLIs headless and offline against a node: Claude Code (`claude -p`, Anthropic
Messages), Codex (`codex exec`, OpenAI Responses) and opencode (`opencode run`, chat
completions; its config is in `tests.helpers.opencode`).

Each `*_session` runs one prompt in a project directory and reads the CLI's JSON events
into a `Session`: which tools ran, whether it ended with a text answer, and the error
events. The e2e tests and `benchmarks/opencode_sessions.py` share them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.helpers.nodes import REPO

# What the tests and the benchmark give Claude Code: its default prompt (~20k tokens, 24
# tools) does not fit the default model's 8k context.
CLAUDE_SYSTEM_PROMPT = (
    "You are a coding agent. Use the Read tool to read files and the Bash tool to run "
    "commands, then answer in one or two sentences."
)
CLAUDE_TOOLS = ("Read", "Bash")
# A node for agent CLIs on the default model: a user's turn is answered with a call;
# Codex, which sets no output limit, gets one; and the CLIs, which set no sampling
# parameters, get SmolLM2's card's and a repetition penalty (at the APIs' 1.0 its answers
# ramble to the limit; at 0.2 without the penalty they loop there); an answer past half
# its limit ends at its next sentence end (the CLIs report an answer cut at the limit as
# an error).
AGENT_NODE_FLAGS = (
    "--require-tool-on-user-turn",
    "--default-max-tokens",
    "256",
    "--wrap-up-share",
    "0.5",
    "--default-temperature",
    "0.2",
    "--default-top-p",
    "0.9",
    "--default-repetition-penalty",
    "1.3",
)
# Codex's own base instructions are ~14k tokens; this file replaces them.
CODEX_INSTRUCTIONS = (
    "You are a coding agent in a terminal. Run shell commands with the shell tool to look "
    "at files, then answer in one or two sentences."
)


def cli_binary(name: str) -> str | None:
    """The copy `scripts/install.sh --test` installs into .tools, else one on PATH."""
    local = REPO / ".tools" / "node_modules" / ".bin" / name
    return str(local) if local.exists() else shutil.which(name)


@dataclass
class Session:
    prompt: str
    tools: list[str] = field(default_factory=list)  # tools that ran: "name:status"
    answer: str = ""  # the text the agent ended with
    errors: list[str] = field(default_factory=list)  # error events, abridged
    events: list[str] = field(default_factory=list)  # the CLI's JSON lines
    returncode: int | None = None
    stderr: str = ""  # the end of it
    seconds: float = 0.0
    timed_out: bool = False

    @property
    def ran_a_tool(self) -> bool:
        return bool(self.tools)

    @property
    def answered(self) -> bool:
        return bool(self.answer.strip())


def claude_environment(root: Path, url: str, model: str, output_limit: int) -> dict[str, str]:
    """Claude Code pointed at the node at `url` and at nothing else (offline)."""
    return dict(
        os.environ,
        HOME=str(root),
        ANTHROPIC_BASE_URL=url,
        ANTHROPIC_API_KEY="unused",
        ANTHROPIC_MODEL=model,
        # Its small fast model writes titles and checks commands: the node too.
        ANTHROPIC_DEFAULT_HAIKU_MODEL=model,
        ANTHROPIC_SMALL_FAST_MODEL=model,
        # Its default output budget (32000) exceeds the model's context.
        CLAUDE_CODE_MAX_OUTPUT_TOKENS=str(output_limit),
        CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
        DISABLE_AUTOUPDATER="1",
        DISABLE_TELEMETRY="1",
        DISABLE_ERROR_REPORTING="1",
    )


def claude_command(binary: str, model: str, prompt: str, max_turns: int) -> list[str]:
    tools = ",".join(CLAUDE_TOOLS)
    return [
        binary,
        "-p",
        "--output-format",
        "stream-json",
        "--verbose",
        "--model",
        model,
        "--system-prompt",
        CLAUDE_SYSTEM_PROMPT,
        "--tools",
        tools,
        "--allowedTools",
        tools,
        "--max-turns",
        str(max_turns),
        prompt,
    ]


def read_claude_event(event: dict[str, Any], session: Session) -> None:
    kind = event.get("type")
    message = event.get("message") or {}
    content = message.get("content") if isinstance(message, dict) else None
    if kind == "user" and isinstance(content, list):
        for block in content:
            if isinstance(block, dict) and block.get("type") == "tool_result":
                status = "error" if block.get("is_error") else "completed"
                session.tools.append(f"{block.get('tool_use_id')}:{status}")
    elif kind == "result":
        if event.get("is_error") or event.get("subtype") != "success":
            # Its text is then the CLI's own error ("API Error: ..."), not an answer.
            session.errors.append(json.dumps(event)[:300])
        else:
            session.answer = str(event.get("result") or "")


def codex_environment(root: Path, url: str, model: str) -> dict[str, str]:
    """Codex with one model provider, the node at `url` (Responses API), in its own home."""
    home = root / ".codex"
    home.mkdir(parents=True, exist_ok=True)
    instructions = home / "instructions.md"
    instructions.write_text(CODEX_INSTRUCTIONS + "\n")
    (home / "config.toml").write_text(
        f'model = "{model}"\n'
        'model_provider = "exo"\n'
        f'model_instructions_file = "{instructions}"\n'
        "model_context_window = 8192\n"
        'approval_policy = "never"\n'
        'sandbox_mode = "danger-full-access"\n'
        'web_search = "disabled"\n'
        # Tools a small model would pick by mistake (goals, sub-agents, images): the shell
        # (exec_command, write_stdin) is what a coding session needs.
        "\n[features]\n"
        "unified_exec = false\n"  # one "shell" tool instead of exec_command + write_stdin
        "goals = false\n"
        "multi_agent = false\n"
        "view_image = false\n"
        "image_generation = false\n"
        "\n[model_providers.exo]\n"
        'name = "exo-tools"\n'
        f'base_url = "{url}/v1"\n'
        'wire_api = "responses"\n'
        "request_max_retries = 0\n"
        "stream_max_retries = 0\n"
    )
    return dict(os.environ, HOME=str(root), CODEX_HOME=str(home))


def codex_command(binary: str, prompt: str) -> list[str]:
    return [binary, "exec", "--json", "--skip-git-repo-check", prompt]


# `codex exec --json` items that are a tool the model called.
CODEX_TOOL_ITEMS = frozenset(
    {"command_execution", "file_change", "mcp_tool_call", "web_search", "todo_list"}
)


def read_codex_event(event: dict[str, Any], session: Session) -> None:
    kind = event.get("type")
    item = event.get("item") or {}
    if kind == "item.completed" and isinstance(item, dict):
        item_type = item.get("type")
        if item_type in CODEX_TOOL_ITEMS:
            failed = item.get("status") == "failed" or item.get("exit_code") not in (None, 0)
            session.tools.append(f"{item_type}:{'error' if failed else 'completed'}")
        elif item_type == "agent_message":
            session.answer = str(item.get("text") or "")
    elif kind in ("error", "turn.failed"):
        session.errors.append(json.dumps(event)[:300])


def opencode_command(binary: str, model: str, prompt: str) -> list[str]:
    return [binary, "run", "--format", "json", "--model", f"exo/{model}", "--title", "t", prompt]


def read_opencode_event(event: dict[str, Any], session: Session) -> None:
    part = event.get("part")
    if event.get("type") == "error":
        session.errors.append(json.dumps(event.get("error"))[:300])
    if not isinstance(part, dict):
        return
    if part.get("type") == "tool":
        status = (part.get("state") or {}).get("status")
        if status in {"completed", "error"}:
            session.tools.append(f"{part.get('tool')}:{status}")
    elif part.get("type") == "text" and part.get("text"):
        session.answer = str(part["text"])


@dataclass(frozen=True)
class Client:
    """How to run one CLI: its binary, its environment for a node, its command, its events."""

    binary: str
    environment: Callable[[Path, str, str, int], dict[str, str]]
    command: Callable[[str, str, str], list[str]]
    read_event: Callable[[dict[str, Any], Session], None]


CLIENT_BINARIES = {"claude": "claude", "codex": "codex", "opencode": "opencode"}


def client(name: str, max_turns: int = 4) -> Client | None:
    """The CLI `name` (claude, codex, opencode); None when it is not installed."""
    binary = cli_binary(CLIENT_BINARIES[name])
    if binary is None:
        return None
    if name == "claude":
        return Client(
            binary,
            claude_environment,
            lambda b, model, prompt: claude_command(b, model, prompt, max_turns),
            read_claude_event,
        )
    if name == "codex":
        return Client(
            binary,
            lambda root, url, model, _limit: codex_environment(root, url, model),
            lambda b, _model, prompt: codex_command(b, prompt),
            read_codex_event,
        )
    from tests.helpers.opencode import opencode_environment  # it imports this module

    return Client(binary, opencode_environment, opencode_command, read_opencode_event)


def run_session(
    cli: Client,
    root: Path,
    url: str,
    model: str,
    prompt: str,
    *,
    output_limit: int = 96,
    timeout: float = 300,
    stop_at_first_tool: bool = False,
) -> Session:
    """One headless session in the project directory `root`."""
    session = Session(prompt)
    env = cli.environment(root, url, model, output_limit)
    started = time.perf_counter()
    stderr_path = root / ".cli-stderr.log"
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen(
            cli.command(cli.binary, model, prompt),
            cwd=root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,  # a file: a full stderr pipe would stall the CLI
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
            with contextlib.suppress(json.JSONDecodeError):
                cli.read_event(json.loads(line), session)
            if stop_at_first_tool and session.tools:
                break
        if not (stop_at_first_tool and session.tools):
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=30)
    finally:
        timer.cancel()
        _stop(process, None)
    session.returncode = process.returncode
    session.stderr = stderr_path.read_text(errors="replace")[-4000:]
    session.seconds = time.perf_counter() - started
    return session


def _stop(process: subprocess.Popen[str], session: Session | None) -> None:
    """Stop the CLI's process group; `session` is marked timed out when given."""
    if process.poll() is not None:
        return
    if session is not None:
        session.timed_out = True
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
