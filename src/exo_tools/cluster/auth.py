"""Cluster secret and the HMAC proofs built on it.

Admission is a mutual challenge-response (Hello + Admit) over both nonces and both node ids.
Every later inter-node call carries metadata signed with a key derived from the secret
(node id, timestamp, random nonce, method); a server interceptor checks it and refuses
replays (timestamp outside a window, or a nonce already seen inside it). The secret itself
never crosses the wire. Request bodies are not signed: integrity of payloads would need TLS.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SECRET_ENV = "EXO_TOOLS_SECRET"
SECRET_FILENAME = "cluster_secret"
NONCE_BYTES = 16
REPLAY_WINDOW_S = 30.0

# gRPC metadata keys of a signed call
METADATA_NODE = "x-exo-node"
METADATA_TIMESTAMP = "x-exo-ts"
METADATA_NONCE = "x-exo-nonce"
METADATA_SIGNATURE = "x-exo-sig"


class AuthError(Exception):
    """A peer failed to prove the cluster secret."""


def _secret_from_text(text: str) -> bytes:
    value = text.strip()
    if not value:
        raise ValueError("cluster secret is empty")
    return value.encode()


def load_or_create_secret(secret_file: Path | None, home: Path) -> tuple[bytes, str]:
    """Return (secret, where it came from).

    Order: --secret-file, then $EXO_TOOLS_SECRET, then <home>/cluster_secret, created (0600)
    with a fresh random value when absent.
    """
    if secret_file is not None:
        return _secret_from_text(secret_file.read_text()), f"file {secret_file}"
    env = os.environ.get(SECRET_ENV)
    if env:
        return _secret_from_text(env), f"environment variable {SECRET_ENV}"
    path = home / SECRET_FILENAME
    if path.exists():
        return _secret_from_text(path.read_text()), f"file {path}"
    home.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(32)
    # O_EXCL + 0600 so the secret is never world-readable, even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(value + "\n")
    log.warning(
        "generated a new cluster secret in %s; to let other machines join, copy this file to "
        "them and start them with --secret-file PATH (or set %s to its content)",
        path,
        SECRET_ENV,
    )
    return value.encode(), f"file {path} (newly generated)"


def _mac(key: bytes, *parts: bytes | str) -> bytes:
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        # Length-prefix every field so concatenations cannot be ambiguous.
        mac.update(len(data).to_bytes(4, "big"))
        mac.update(data)
    return mac.digest()


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


class ClusterAuth:
    """All proofs of one node; pure (no I/O) apart from the replay cache."""

    def __init__(
        self, secret: bytes, cluster_name: str, replay_window_s: float = REPLAY_WINDOW_S
    ) -> None:
        if not secret:
            raise ValueError("cluster secret is empty")
        self.cluster_name = cluster_name
        # Distinct derived keys so a proof of one kind can never be replayed as another.
        self._handshake_key = _mac(secret, "exo-tools/handshake/v1", cluster_name)
        self._call_key = _mac(secret, "exo-tools/call/v1", cluster_name)
        self.replay_window_s = replay_window_s
        self._seen: OrderedDict[tuple[str, str], float] = OrderedDict()

    # -- admission
    def hello_proof(
        self, client_nonce: bytes, server_nonce: bytes, client_id: str, server_id: str
    ) -> bytes:
        return _mac(self._handshake_key, "hello", client_nonce, server_nonce, client_id, server_id)

    def admit_proof(
        self, client_nonce: bytes, server_nonce: bytes, client_id: str, server_id: str
    ) -> bytes:
        return _mac(self._handshake_key, "admit", client_nonce, server_nonce, client_id, server_id)

    def heartbeat_response_proof(self, request_nonce: bytes, responder_id: str) -> bytes:
        return _mac(self._handshake_key, "heartbeat-response", request_nonce, responder_id)

    @staticmethod
    def check(expected: bytes, given: bytes) -> bool:
        return hmac.compare_digest(expected, given)

    # -- per-call metadata
    def sign_call(
        self, node_id: str, method: str, now: float | None = None
    ) -> list[tuple[str, str]]:
        timestamp = f"{(time.time() if now is None else now):.3f}"
        nonce = base64.urlsafe_b64encode(new_nonce()).decode()
        signature = _mac(self._call_key, method, node_id, timestamp, nonce).hex()
        return [
            (METADATA_NODE, node_id),
            (METADATA_TIMESTAMP, timestamp),
            (METADATA_NONCE, nonce),
            (METADATA_SIGNATURE, signature),
        ]

    def verify_call(
        self,
        method: str,
        metadata: Sequence[tuple[str, str | bytes]] | None,
        now: float | None = None,
    ) -> str:
        """Return the caller's node id, or raise AuthError."""
        values: dict[str, str] = {}
        for key, value in metadata or ():
            values[key] = value.decode() if isinstance(value, bytes) else value
        try:
            node_id = values[METADATA_NODE]
            timestamp = values[METADATA_TIMESTAMP]
            nonce = values[METADATA_NONCE]
            signature = values[METADATA_SIGNATURE]
        except KeyError:
            raise AuthError("missing auth metadata") from None
        expected = _mac(self._call_key, method, node_id, timestamp, nonce).hex()
        if not hmac.compare_digest(expected, signature):
            raise AuthError(f"bad signature from {node_id!r}")
        current = time.time() if now is None else now
        try:
            sent = float(timestamp)
        except ValueError:
            raise AuthError("bad timestamp") from None
        if abs(current - sent) > self.replay_window_s:
            raise AuthError(
                f"timestamp of {node_id!r} outside the {self.replay_window_s:.0f}s window"
            )
        self._forget_older_than(current - self.replay_window_s)
        key = (node_id, nonce)
        if key in self._seen:
            raise AuthError(f"replayed call from {node_id!r}")
        self._seen[key] = sent
        return node_id

    def _forget_older_than(self, cutoff: float) -> None:
        # Insertion order is roughly time order; timestamps outside the window are refused
        # anyway, so dropping old entries from the front keeps the cache bounded.
        while self._seen:
            key, sent = next(iter(self._seen.items()))
            if sent >= cutoff and len(self._seen) < 200_000:
                break
            del self._seen[key]


@dataclass
class RejectLog:
    """Logs a refusal once per peer (then at debug level) so a bad peer cannot spam the log."""

    seen: set[str]

    def __init__(self) -> None:
        self.seen = set()

    def refused(self, peer: str, reason: str) -> None:
        if peer in self.seen:
            log.debug("refused %s again: %s", peer, reason)
            return
        self.seen.add(peer)
        log.warning("refused peer %s: %s", peer, reason)

    def forgive(self, peer: str) -> None:
        self.seen.discard(peer)
