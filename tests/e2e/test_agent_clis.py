"""Real agent CLIs, headless, against a real node serving the default model with
`AGENT_NODE_FLAGS` (`--require-tool-on-user-turn`, `--default-max-tokens` for Codex,
`--wrap-up-share`, sampling defaults): Claude Code over Anthropic Messages, Codex over the
Responses API, opencode over chat completions. Each runs a tool and answers, without an
error."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.agent_clis import AGENT_NODE_FLAGS, Client, Session, client, run_session
from tests.helpers.nodes import NodeProcess, node_environment, start_node

# opencode's session alone takes ~5 minutes here (its prompt is ~4k tokens a turn).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(480)]
MODEL = "smollm2-135m"
PROMPT = "What is in notes.txt?"


@pytest.fixture(scope="module")
def request_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every generation request body the CLIs sent (`--log-requests`)."""
    return tmp_path_factory.mktemp("agent-node") / "requests.jsonl"


@pytest.fixture(scope="module")
def agent_node(model_path: Path, request_log: Path) -> Iterator[NodeProcess]:
    # The CLIs wait on the node: both cores for its BLAS.
    flags = (*AGENT_NODE_FLAGS, "--log-requests", str(request_log))
    process = start_node(*flags, env=node_environment(threads=2))
    yield process
    process.stop()


def installed(name: str) -> Client:
    found = client(name)
    if found is None:
        message = f"{name} not installed (scripts/install.sh --test installs it with npm)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def session_in(project: Path, name: str, node: NodeProcess) -> Session:
    (project / "notes.txt").write_text("Remember: release on Friday.\n")
    return run_session(
        installed(name), project, node.url, MODEL, PROMPT, output_limit=96, timeout=400
    )


def transcript(session: Session) -> str:
    return ("".join(session.events) + session.stderr)[-6000:]


def test_claude_code_runs_a_tool_and_finishes(agent_node: NodeProcess, tmp_path: Path) -> None:
    session = session_in(tmp_path, "claude", agent_node)
    assert not session.timed_out, transcript(session)
    assert session.ran_a_tool, transcript(session)
    # `--wrap-up-share` ends the answer within Claude Code's output limit, which it
    # otherwise reports as an error ("... output token maximum").
    assert not session.errors, json.dumps(session.errors)
    assert session.answered, transcript(session)
    assert session.returncode == 0, transcript(session)


def test_codex_exec_runs_a_tool_and_finishes(agent_node: NodeProcess, tmp_path: Path) -> None:
    session = session_in(tmp_path, "codex", agent_node)
    assert not session.timed_out, transcript(session)
    assert session.ran_a_tool, transcript(session)
    # After the tool result Codex got the model's answer, ended by `--wrap-up-share`
    # within `--default-max-tokens` (cut there, Codex reports its turn as failed:
    # "Incomplete response returned, reason: max_output_tokens").
    assert session.answered, transcript(session)
    assert not session.errors, json.dumps(session.errors)
    assert session.returncode == 0, transcript(session)


def test_opencode_runs_a_tool_and_answers(agent_node: NodeProcess, tmp_path: Path) -> None:
    session = session_in(tmp_path, "opencode", agent_node)
    assert not session.timed_out, transcript(session)
    assert not session.errors, json.dumps(session.errors)
    assert session.ran_a_tool, transcript(session)
    assert session.answered, transcript(session)
    assert session.returncode == 0, transcript(session)


def test_the_access_log_has_a_line_per_request(agent_node: NodeProcess, request_log: Path) -> None:
    """After the sessions above: each request the CLIs sent (as `--log-requests` recorded
    its body) has exactly one access line, on its route."""
    if not request_log.exists():
        pytest.skip("no agent CLI session ran")
    sent = Counter(json.loads(line)["path"] for line in request_log.read_text().splitlines())
    access = [line for line in agent_node.log().splitlines() if "exo_tools.access: POST " in line]
    logged = Counter(
        line.split("exo_tools.access: POST ", 1)[1].split(" ", 1)[0] for line in access
    )
    assert {route: logged[route] for route in sent} == dict(sent)
