"""The API over HTTPS: flags checked, a self-signed pair kept in the home with its
fingerprint logged, and a warning for an API open beyond loopback without a key."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import requests

from exo_tools.api.https import fingerprint
from tests.helpers.nodes import start_node


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tls-cert", __file__], "--tls-cert and --tls-key go together"),
        (["--tls-self-signed", "--tls-cert", __file__, "--tls-key", __file__], "alternatives"),
        (["--tls-key", "/no/such/key.pem"], "--tls-key"),
    ],
)
def test_tls_flags_are_checked(flags: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "exo_tools", "node", *flags], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert message in result.stderr, result.stderr


def test_self_signed_https_api() -> None:
    node = start_node("--tls-self-signed", "--host", "0.0.0.0", wait=False)
    try:
        cert = node.home / "api_tls" / "cert.pem"
        url = f"https://127.0.0.1:{node.api_port}"
        deadline = time.monotonic() + 120
        ready = False
        while time.monotonic() < deadline and node.alive() and not ready:
            try:
                ready = requests.get(f"{url}/ready", verify=cert, timeout=2).status_code == 200
            except (requests.RequestException, OSError):  # OSError: no cert file yet
                time.sleep(0.3)
        assert ready, node.log()[-3000:]
        log = node.log()
        assert f"SHA-256 fingerprint {fingerprint(cert)}" in log
        assert "without an API key" in log and "--api-key" in log
        # The key never world-readable.
        assert (node.home / "api_tls" / "key.pem").stat().st_mode & 0o077 == 0
        reply = requests.post(
            f"{url}/v1/chat/completions",
            json={
                "model": "smollm2-135m",
                "messages": [{"role": "user", "content": "Say hi."}],
                "max_tokens": 4,
            },
            verify=cert,
            timeout=60,
        )
        assert reply.status_code == 200, reply.text
        # Plain HTTP to the HTTPS port gets no answer.
        with pytest.raises(requests.RequestException):
            requests.get(f"http://127.0.0.1:{node.api_port}/health", timeout=5)
    finally:
        node.stop(signal.SIGTERM)
