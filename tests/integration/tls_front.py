"""A TLS-terminating front for the embedded broker, which cannot speak TLS itself (Tansu 0.6 refuses
``--cert`` together with ``--key``).

The broker advertises the front's port, so every client, bootstrap and partition leaders alike,
reaches the broker through the front and must speak TLS to it. The front presents whichever server
certificate the test chose (trusted, untrusted, for another host, expired) and can require a client
certificate signed by a given CA (mutual TLS). Both can change between connections, so one broker
serves every scenario.

asyncio rather than a thread per direction: one TLS connection must not be read and written from two
threads at once, and a single thread per connection could deadlock when both directions fill.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from pathlib import Path

from tests.tls_certs import Pair


class TlsFront:
    """Listens on ``listen_port`` (TLS), forwards each connection in plain text to ``target_port``."""

    def __init__(self, listen_port: int, target_port: int, server: Pair, client_ca: Path | None = None) -> None:
        self.listen_port = listen_port
        self.target_port = target_port
        self.server = server
        self.client_ca = client_ca
        self.handshakes = 0  # completed TLS handshakes
        self.refused = 0  # connections whose handshake failed (a plain-text client, an untrusted certificate)
        self.client_subjects: set[str] = set()  # the common names of client certificates presented
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()

    def serve(self, server: Pair, client_ca: Path | None = None) -> None:
        """Present ``server`` from the next connection on, requiring client certificates signed by ``client_ca``."""
        self.server, self.client_ca = server, client_ca

    def _context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.server.cert, self.server.key)
        if self.client_ca is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cafile=self.client_ca)
        return context

    def up(self) -> TlsFront:
        self._loop.set_exception_handler(lambda _loop, _context: None)  # failed handshakes are counted, not logged
        self._thread.start()
        start = asyncio.start_server(self._connection, "127.0.0.1", self.listen_port)
        self._server = asyncio.run_coroutine_threadsafe(start, self._loop).result(timeout=10)
        return self

    def down(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for writer in self._open:
                writer.transport.abort()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    async def _connection(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self._open.add(client_writer)
        try:
            await self._forward(client_reader, client_writer)
        finally:
            self._open.discard(client_writer)

    async def _forward(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            await client_writer.start_tls(self._context())
        except (ssl.SSLError, OSError, ConnectionError):
            self.refused += 1
            client_writer.close()  # not abort(): the TLS alert saying why must reach the client
            return
        self.handshakes += 1
        peer = client_writer.get_extra_info("peercert") or {}
        for field in peer.get("subject", ()):
            for key, value in field:
                if key == "commonName":
                    self.client_subjects.add(value)
        try:
            broker_reader, broker_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_writer.transport.abort()
            return
        self._open.add(broker_writer)
        await asyncio.gather(
            self._pipe(client_reader, broker_writer), self._pipe(broker_reader, client_writer), return_exceptions=True
        )

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()
