"""A TCP forwarder the fault tests switch off and on: a network outage that keeps the broker's state.

It can also stall the connections of one kind of client while others flow (a partial outage: the
broker stops acknowledging the worker's outputs while its consumer still fetches), or only some of
their requests (Produce, while the transaction coordinator still answers). Kafka requests name their
client and their kind: every request header carries the API key and the client id, which the worker
sets per role (``filter-worker-producer-...``).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time

# API keys of the requests a test may hold.
PRODUCE = 0
END_TXN = 26  # commits or aborts a transaction (commit_transaction's last step)


def api_key(request: bytes) -> int:
    """The API key of a size-prefixed Kafka request."""
    return struct.unpack(">h", request[4:6])[0] if len(request) >= 6 else -1


def client_id(first_request: bytes) -> str:
    """The client id in a Kafka request (size, api key, api version, correlation id, then the id)."""
    if len(first_request) < 14:
        return ""
    (length,) = struct.unpack(">h", first_request[12:14])
    return first_request[14 : 14 + max(0, length)].decode("utf-8", "replace")


class TcpProxy:
    """Forwards ``listen_port`` to ``target_port`` on loopback while up; ``down`` drops every connection."""

    def __init__(self, listen_port: int, target_port: int) -> None:
        self.listen_port = listen_port
        self.target_port = target_port
        self._server: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stalled: str | None = None
        self._stalled_kinds: frozenset[int] | None = None

    def stall(self, client_prefix: str | None, api_keys: set[int] | None = None) -> None:
        """Hold requests of clients whose id starts with ``client_prefix`` (``None``: release them).

        With ``api_keys``, only requests of those kinds are held (and, to keep the connection's order,
        whatever follows them on the same connection). Held requests are not lost: they are forwarded
        once released (unless the client gave up on the connection meanwhile and resent them on a new one).
        """
        self._stalled_kinds = None if api_keys is None else frozenset(api_keys)
        self._stalled = client_prefix

    def _holds(self, name: str, request: bytes) -> bool:
        stalled, kinds = self._stalled, self._stalled_kinds
        return stalled is not None and name.startswith(stalled) and (kinds is None or api_key(request) in kinds)

    def up(self) -> TcpProxy:
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.listen_port))
        server.listen(64)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()
        return self

    def down(self) -> None:
        with self._lock:
            server, self._server = self._server, None
            sockets, self._sockets = self._sockets, []
        for sock in [s for s in (server,) if s is not None] + sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return  # closed by down()
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._server is not server:
                    client.close()
                    upstream.close()
                    return
                self._sockets += [client, upstream]
            threading.Thread(target=self._requests, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()

    def _requests(self, client: socket.socket, upstream: socket.socket) -> None:
        """Client to broker, request by request, holding the requests of stalled clients."""
        name: str | None = None
        pending = b""
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                pending += data
                while len(pending) >= 4:
                    (size,) = struct.unpack(">i", pending[:4])
                    if len(pending) < 4 + size:
                        break
                    request, pending = pending[: 4 + size], pending[4 + size :]
                    name = client_id(request) if name is None else name
                    while self._holds(name, request):
                        time.sleep(0.02)
                    upstream.sendall(request)
        with contextlib.suppress(OSError):
            upstream.shutdown(socket.SHUT_WR)

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
