"""Run opencode (the npm package `opencode-ai`) headless and offline against a node."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.helpers.agent_clis import cli_binary


def opencode_binary() -> str | None:
    """The copy `scripts/install.sh --test` installs into .tools, else one on PATH."""
    return cli_binary("opencode")


def opencode_environment(root: Path, url: str, model: str, output_limit: int) -> dict[str, str]:
    """Write an opencode config in `root` whose only provider is the node at `url`, and the
    environment that makes opencode use it (and nothing of the user's own setup)."""
    config = {
        "$schema": "https://opencode.ai/config.json",
        "provider": {
            "exo": {
                "npm": "@ai-sdk/openai-compatible",
                "name": "exo-tools",
                "options": {"baseURL": f"{url}/v1", "apiKey": "unused"},
                # opencode's default output budget (32000) exceeds the model's context; a
                # small one also keeps sessions short on a small CPU.
                "models": {
                    model: {"tool_call": True, "limit": {"context": 8192, "output": output_limit}}
                },
            }
        },
        "model": f"exo/{model}",
        # Titles are written by the "small model"; it must be the node too (offline).
        "small_model": f"exo/{model}",
        "autoupdate": False,
        "share": "disabled",
        # `opencode run` rejects every permission prompt, and the 135M model often names a
        # workdir outside the project; a rejection ends the session without an answer.
        # The project is a throwaway folder, so the sessions may go anywhere.
        "permission": {"external_directory": "allow"},
    }
    (root / "opencode.json").write_text(json.dumps(config))
    return dict(
        os.environ,
        HOME=str(root),
        XDG_CONFIG_HOME=str(root / ".config"),
        OPENCODE_CONFIG=str(root / "opencode.json"),
    )
