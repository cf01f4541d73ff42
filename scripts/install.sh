#!/usr/bin/env bash
# Install exo-tools into .venv inside the repository (works on PEP 668 systems).
#   scripts/install.sh          the node and its CLI
#   scripts/install.sh --test   plus the test, lint and client dependencies
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "exo-tools needs Python >= 3.11 (found: $("$python" --version 2>&1)); set PYTHON=..." >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
echo "Installing exo-tools${extras} into .venv ..."
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".${extras}"

# The end-to-end tests drive agent CLIs (npm) against a node: opencode (it needs ripgrep
# for its tools), Claude Code and Codex, each pinned to the version the tests were run with.
if [ "${1:-}" = "--test" ]; then
  if command -v npm >/dev/null; then
    for package in opencode-ai@1.18.33 @anthropic-ai/claude-code@2.1.197 @openai/codex@0.171.0; do
      echo "Installing ${package} (npm) into .tools ..."
      npm install --prefix .tools --no-audit --no-fund --silent "${package}" >/dev/null ||
        echo "note: npm install of ${package} failed; its end-to-end test will be skipped" >&2
    done
  else
    echo "note: npm not found; the agent CLI end-to-end tests will be skipped" >&2
  fi
fi

# Linux CPU nodes: an optimized BLAS makes float32 inference ~20x faster at prefill.
if [ "$(uname -s)" = Linux ] && ! ls /usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0 >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get install -y -qq libopenblas0-pthread >/dev/null 2>&1 ||
      { apt-get update -qq && apt-get install -y -qq libopenblas0-pthread >/dev/null; } ||
      echo "note: could not install libopenblas0-pthread; CPU inference will be slower" >&2
  else
    echo "tip: 'sudo apt-get install libopenblas0-pthread' makes CPU inference much faster" >&2
  fi
fi
# The dashboard test opens the page in headless Chromium (Debian's `chromium`).
if [ "${1:-}" = "--test" ] && [ "$(uname -s)" = Linux ] && ! command -v chromium >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "Installing chromium (apt) for the dashboard test ..."
    apt-get install -y -qq chromium >/dev/null 2>&1 ||
      { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } ||
      echo "note: could not install chromium; the dashboard browser test will be skipped" >&2
  else
    echo "note: install chromium ('sudo apt-get install chromium') for the dashboard test" >&2
  fi
fi
# The chaos tests drop packets with nftables inside network namespaces (root only).
if [ "${1:-}" = "--test" ] && [ "$(uname -s)" = Linux ] && [ "$(id -u)" = 0 ] &&
  ! command -v nft >/dev/null && command -v apt-get >/dev/null; then
  echo "Installing nftables (apt) for the network chaos tests ..."
  apt-get install -y -qq nftables >/dev/null 2>&1 ||
    { apt-get update -qq && apt-get install -y -qq nftables >/dev/null; } ||
    echo "note: could not install nftables; the network chaos tests will be skipped" >&2
fi
echo "Installed. Run: .venv/bin/exo-tools --help"
