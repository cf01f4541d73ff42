"""Headless Chromium for the dashboard tests: the DOM after the page's scripts ran, and a
screenshot kept as a test artifact."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_CANDIDATES = (
    "chromium",
    "chromium-browser",
    "google-chrome",
    "/Applications/Google Chrome.app/Contents/MacOS/Google Chrome",
    "/Applications/Chromium.app/Contents/MacOS/Chromium",
)


def chromium() -> str:
    """The browser's executable; skips the test where there is none (fails under CI, whose
    install puts Debian's `chromium` in place)."""
    for candidate in _CANDIDATES:
        found = shutil.which(candidate) or (candidate if Path(candidate).is_file() else None)
        if found:
            return found
    message = "no Chromium found (scripts/install.sh --test installs Debian's `chromium` as root)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def _run(url: str, *flags: str, budget_ms: int) -> str:
    # --no-sandbox: Chromium refuses to run as root otherwise (CI runs as root). The virtual
    # time budget lets the page's timers (its polling) run that long before the dump.
    command = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        f"--virtual-time-budget={budget_ms}",
        *flags,
        url,
    ]
    # The test run preloads OpenBLAS (tests/fast_blas.py); Chromium's GPU process dies of it.
    env = {name: value for name, value in os.environ.items() if name != "LD_PRELOAD"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=90, check=False, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def dump_dom(url: str, budget_ms: int = 5000) -> str:
    return _run(url, "--dump-dom", budget_ms=budget_ms)


def screenshot(url: str, name: str, budget_ms: int = 5000) -> Path:
    """A 1400x1250 screenshot of `url` in the artifacts folder."""
    path = artifacts_dir() / name
    _run(
        url,
        f"--screenshot={path}",
        "--window-size=1400,1250",
        "--hide-scrollbars",
        budget_ms=budget_ms,
    )
    assert path.is_file() and path.stat().st_size > 10_000
    return path


def artifacts_dir() -> Path:
    """Where tests leave files for people to look at ($EXO_TOOLS_TEST_ARTIFACTS, by default
    .test-artifacts/ in the repository)."""
    path = Path(os.environ.get("EXO_TOOLS_TEST_ARTIFACTS", REPO / ".test-artifacts"))
    path.mkdir(parents=True, exist_ok=True)
    return path
