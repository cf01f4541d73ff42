"""A TCP proxy between two nodes (test helper): it records every byte it forwards, can
flip one byte of a large chunk in flight, as an attacker on the path would, and can stall:
swallow every byte from then on without closing anything, as a dead path does."""

from __future__ import annotations

import contextlib
import socket
import threading
from dataclasses import dataclass, field

CAPTURE_LIMIT = 256 << 20


@dataclass
class TcpProxy:
    """Listens on `listen`, forwards each connection to `upstream`, connecting from
    `source_ip` (so the node behind it sees calls coming from that address)."""

    listen: tuple[str, int]
    upstream: tuple[str, int]
    source_ip: str
    captured: bytearray = field(default_factory=bytearray)
    flipped: int = 0  # bytes flipped so far
    stalled: bool = False  # bytes are swallowed, both ways; the connections stay open
    _flip_at_least: int | None = None  # arm: flip in the next chunk of at least this size
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: socket.socket | None = None
    _sockets: list[socket.socket] = field(default_factory=list)

    def start(self) -> TcpProxy:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(self.listen)
        server.listen(16)
        self._server = server
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def arm_flip(self, min_chunk: int) -> None:
        """Flip one byte in the middle of the next forwarded chunk of `min_chunk` bytes or
        more (a prefill's hidden states, not a heartbeat), in either direction."""
        with self._lock:
            self._flip_at_least = min_chunk

    def capture_size(self) -> int:
        with self._lock:
            return len(self.captured)

    def captured_since(self, offset: int) -> bytes:
        with self._lock:
            return bytes(self.captured[offset:])

    def close(self) -> None:
        if self._server is not None:
            with contextlib.suppress(OSError):
                self._server.close()
        for sock in list(self._sockets):
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self) -> None:
        assert self._server is not None
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.socket()
            try:
                upstream.bind((self.source_ip, 0))
                upstream.connect(self.upstream)
            except OSError:
                client.close()
                upstream.close()
                continue
            self._sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                chunk = source.recv(1 << 16)
                if not chunk:
                    break
                if self.stalled:
                    continue
                with self._lock:
                    if len(self.captured) < CAPTURE_LIMIT:
                        self.captured += chunk
                    if self._flip_at_least is not None and len(chunk) >= self._flip_at_least:
                        self._flip_at_least = None
                        altered = bytearray(chunk)
                        altered[len(altered) // 2] ^= 0x01
                        chunk = bytes(altered)
                        self.flipped += 1
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
