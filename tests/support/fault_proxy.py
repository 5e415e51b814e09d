"""A TCP proxy on 127.0.0.1 that can lose one Redis command, or its reply, on purpose."""

from __future__ import annotations

import socket
import threading

from imgserve.launch.local_redis import free_port

PHASES = ("before", "after", "mid")


class FaultProxy:
    """Forwards connections to a Redis on 127.0.0.1 until armed; then drops the first connection that
    sends `token`: before the command reaches Redis ("before"), after Redis ran it but before any of
    its reply comes back ("after"), or in the middle of the reply ("mid")."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.fired = threading.Event()
        self._rule: tuple[bytes, str] | None = None
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, token: bytes, phase: str) -> None:
        assert phase in PHASES, phase
        with self._lock:
            self._rule = (token, phase)
            self.fired.clear()

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            link = _Link(self, client, server)
            threading.Thread(target=link.upstream, daemon=True).start()
            threading.Thread(target=link.downstream, daemon=True).start()

    def _match(self, chunk: bytes) -> str | None:
        """The phase to fail in, if this chunk carries the armed token (and disarm)."""
        with self._lock:
            if self._rule and self._rule[0] in chunk:
                phase = self._rule[1]
                self._rule = None
                return phase
        return None


class _Link:
    """One proxied connection: two pumps, and the fault waiting for its reply, if any."""

    def __init__(self, proxy: FaultProxy, client: socket.socket, server: socket.socket) -> None:
        self.proxy, self.client, self.server = proxy, client, server
        self.pending: str | None = None

    def upstream(self) -> None:
        while chunk := self._recv(self.client):
            phase = self.proxy._match(chunk)
            if phase == "before":
                return self._cut()
            self.pending = phase or self.pending
            if not self._send(self.server, chunk):
                return None
        return self._cut(fired=False)

    def downstream(self) -> None:
        while chunk := self._recv(self.server):
            if self.pending == "mid":
                self._send(self.client, chunk[: max(1, len(chunk) // 2)])
            if self.pending:
                return self._cut()
            if not self._send(self.client, chunk):
                return None
        return self._cut(fired=False)

    def _cut(self, fired: bool = True) -> None:
        for sock in (self.client, self.server):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        if fired:
            self.proxy.fired.set()

    @staticmethod
    def _recv(sock: socket.socket) -> bytes:
        try:
            return sock.recv(65536)
        except OSError:
            return b""

    @staticmethod
    def _send(sock: socket.socket, data: bytes) -> bool:
        try:
            sock.sendall(data)
            return True
        except OSError:
            return False
