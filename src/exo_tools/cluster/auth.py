"""Cluster secret and the HMAC proofs built on it.

Admission is a mutual challenge-response (Hello + Admit) over both nonces and both node ids.
Every later inter-node call carries metadata signed with a key derived from the secret
(node id, timestamp, random nonce, method); a server interceptor checks it and refuses
replays (timestamp outside a window, or a nonce already seen inside it). The secret itself
never crosses the wire. Payloads are protected by the channel itself: mutual TLS keyed by
the same secret (`tls`).

Rotation: a secret file may hold several secrets, one per line. The first is this node's
own; the others are accepted too. A node proves and signs with every secret it holds
(concatenated MACs), and accepts a proof or signature that matches any of them, so nodes
that hold "new, old" talk both to nodes still on the old secret and to nodes already on
the new one alone.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import secrets
import threading
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
MAC_BYTES = 32  # HMAC-SHA256
MAX_SECRETS = 4  # per node: current plus those accepted during a rotation

# gRPC metadata keys of a signed call
METADATA_NODE = "x-exo-node"
METADATA_TIMESTAMP = "x-exo-ts"
METADATA_NONCE = "x-exo-nonce"
METADATA_SIGNATURE = "x-exo-sig"


class AuthError(Exception):
    """A peer failed to prove the cluster secret."""


def secrets_from_text(text: str) -> list[bytes]:
    """The secrets of a secret file's text: one per non-empty line, this node's own first."""
    values = [line.strip().encode() for line in text.splitlines() if line.strip()]
    if not values:
        raise ValueError("cluster secret is empty")
    if len(values) > MAX_SECRETS:
        raise ValueError(f"a secret file holds at most {MAX_SECRETS} secrets (one per line)")
    return values


@dataclass(frozen=True)
class SecretSource:
    secrets: list[bytes]  # this node's own first
    where: str
    path: Path | None  # the file to watch for a rotation (None: from the environment)


def load_or_create_secrets(secret_file: Path | None, home: Path) -> SecretSource:
    """This node's secrets and where they came from.

    Order: --secret-file, then $EXO_TOOLS_SECRET, then <home>/cluster_secret, created (0600)
    with a fresh random value when absent.
    """
    if secret_file is not None:
        return SecretSource(
            secrets_from_text(secret_file.read_text()), f"file {secret_file}", secret_file
        )
    env = os.environ.get(SECRET_ENV)
    if env:
        return SecretSource(secrets_from_text(env), f"environment variable {SECRET_ENV}", None)
    path = home / SECRET_FILENAME
    if path.exists():
        return SecretSource(secrets_from_text(path.read_text()), f"file {path}", path)
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
    return SecretSource([value.encode()], f"file {path} (newly generated)", path)


def secret_fingerprint(secret: bytes) -> str:
    """A short public name for a secret, for logs (says which, reveals nothing)."""
    return hashlib.sha256(b"exo-tools/secret-name/v1" + secret).hexdigest()[:12]


def _any_equal(ours: Sequence[bytes], theirs: Sequence[bytes]) -> bool:
    """Whether any of `theirs` equals any of `ours`; every pair is compared (no early
    exit), so timing says nothing about which matched."""
    matches = [hmac.compare_digest(mine, other) for mine in ours for other in theirs]
    return any(matches)


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
        self,
        secret: bytes | Sequence[bytes],
        cluster_name: str,
        replay_window_s: float = REPLAY_WINDOW_S,
    ) -> None:
        self.cluster_name = cluster_name
        self.set_secrets([secret] if isinstance(secret, bytes) else secret)
        self.replay_window_s = replay_window_s
        self._seen: OrderedDict[tuple[str, str], float] = OrderedDict()
        # The control server verifies on its event loop, the data plane on its threads.
        self._seen_lock = threading.Lock()

    def set_secrets(self, secrets: Sequence[bytes]) -> None:
        """Prove and sign with all of `secrets`, accept any of them (a rotation)."""
        if not secrets or not all(secrets):
            raise ValueError("cluster secret is empty")
        if len(secrets) > MAX_SECRETS:
            raise ValueError(f"at most {MAX_SECRETS} cluster secrets at once")
        # Distinct derived keys so a proof of one kind can never be replayed as another.
        self._handshake_keys = [
            _mac(secret, "exo-tools/handshake/v1", self.cluster_name) for secret in secrets
        ]
        self._call_keys = [
            _mac(secret, "exo-tools/call/v1", self.cluster_name) for secret in secrets
        ]

    def _proof(self, *parts: bytes | str) -> bytes:
        return b"".join(_mac(key, *parts) for key in self._handshake_keys)

    # -- admission
    def hello_proof(
        self, client_nonce: bytes, server_nonce: bytes, client_id: str, server_id: str
    ) -> bytes:
        return self._proof("hello", client_nonce, server_nonce, client_id, server_id)

    def admit_proof(
        self, client_nonce: bytes, server_nonce: bytes, client_id: str, server_id: str
    ) -> bytes:
        return self._proof("admit", client_nonce, server_nonce, client_id, server_id)

    def heartbeat_response_proof(self, request_nonce: bytes, responder_id: str) -> bytes:
        return self._proof("heartbeat-response", request_nonce, responder_id)

    @staticmethod
    def check(expected: bytes, given: bytes) -> bool:
        """Whether any MAC in `given` (the peer's, one per secret it holds) equals any in
        `expected` (ours, one per secret we hold)."""
        if not given or len(given) % MAC_BYTES or len(given) > MAC_BYTES * MAX_SECRETS:
            return False
        ours = [expected[i : i + MAC_BYTES] for i in range(0, len(expected), MAC_BYTES)]
        theirs = [given[i : i + MAC_BYTES] for i in range(0, len(given), MAC_BYTES)]
        return _any_equal(ours, theirs)

    # -- per-call metadata
    def _signatures(self, method: str, node_id: str, timestamp: str, nonce: str) -> list[str]:
        return [_mac(key, method, node_id, timestamp, nonce).hex() for key in self._call_keys]

    def sign_call(
        self, node_id: str, method: str, now: float | None = None
    ) -> list[tuple[str, str]]:
        timestamp = f"{(time.time() if now is None else now):.3f}"
        nonce = base64.urlsafe_b64encode(new_nonce()).decode()
        signature = ",".join(self._signatures(method, node_id, timestamp, nonce))
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
        given = [part.encode(errors="replace") for part in signature.split(",")[:MAX_SECRETS]]
        expected = [mine.encode() for mine in self._signatures(method, node_id, timestamp, nonce)]
        if not _any_equal(expected, given):
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
        key = (node_id, nonce)
        with self._seen_lock:
            self._forget_older_than(current - self.replay_window_s)
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
