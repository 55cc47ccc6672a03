"""Records no well-behaved client writes, through the real client: one is dead-lettered, its partition flows.

confluent-kafka cannot produce a header name that is not UTF-8 (it encodes ``str`` names), but Kafka
allows any bytes there, and other clients write them. The test produces a marked name and a proxy
between broker and consumers rewrites it, on the way out, into bytes that are not UTF-8 (the same
length, and librdkafka does not check record CRCs by default), so the worker's consumer receives
exactly such a record.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading

import orjson

from filter_worker.tools.broker import EmbeddedBroker, free_port
from tests.integration.kafka_helpers import (
    create_topics,
    end_offsets,
    produce,
    read_outputs,
    wait_for_commits,
    worker_settings,
)
from tests.integration.processes import start_worker, worker_env

MARK = b"INVALIDUTF8HDR"
NOT_UTF8 = b"INVALID\xff\xfe\xfdUTF8"


class RewritingProxy:
    """Forwards ``listen_port`` to ``target_port``, replacing ``MARK`` with ``NOT_UTF8`` in what the broker sends.

    A read that ends in the first bytes of ``MARK`` keeps them back until the next read (or 50 ms of
    quiet), so a mark split across two reads is still replaced.
    """

    def __init__(self, listen_port: int, target_port: int) -> None:
        self.listen_port = listen_port
        self.target_port = target_port
        self.rewritten = 0
        self._server = socket.create_server(("127.0.0.1", listen_port))

    def up(self) -> RewritingProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def down(self) -> None:
        self._server.close()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self._server.accept()
                broker = socket.create_connection(("127.0.0.1", self.target_port))
                threading.Thread(target=self._pipe, args=(client, broker, False), daemon=True).start()
                threading.Thread(target=self._pipe, args=(broker, client, True), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, rewrite: bool) -> None:
        held = b""
        source.settimeout(0.05)
        with contextlib.suppress(OSError):
            while True:
                try:
                    data = source.recv(65536)
                except TimeoutError:
                    if held:
                        sink.sendall(held)
                        held = b""
                    continue
                if not data:
                    break
                if not rewrite:
                    sink.sendall(data)
                    continue
                data = held + data
                self.rewritten += data.count(MARK)
                data = data.replace(MARK, NOT_UTF8)
                keep = next((n for n in range(len(MARK) - 1, 0, -1) if data.endswith(MARK[:n])), 0)
                held = data[len(data) - keep :] if keep else b""
                sink.sendall(data[: len(data) - keep])
        with contextlib.suppress(OSError):
            sink.sendall(held)
            sink.shutdown(socket.SHUT_WR)


def test_a_header_name_that_is_not_utf8_is_dead_lettered_and_its_partition_flows(keyword_model):
    broker = EmbeddedBroker(advertised_port=free_port()).start()
    proxy = RewritingProxy(broker.advertised_port, broker.port).up()
    try:
        settings = worker_settings(broker.bootstrap_servers, str(keyword_model))
        create_topics(settings, input_partitions=1)
        topic = settings.topics.input[0]
        produced = produce(broker.bootstrap_servers, topic, [orjson.dumps({"text": "before"})])
        produced += produce(
            broker.bootstrap_servers,
            topic,
            [orjson.dumps({"text": "hostile"})],
            key_prefix="hostile",
            headers=[(MARK.decode(), b"v"), ("trace-id", b"abc")],
        )
        produced += produce(broker.bootstrap_servers, topic, [orjson.dumps({"text": "you idiot"})], key_prefix="after")
        worker = start_worker(worker_env(settings))
        try:
            outputs = read_outputs(settings, expected=3)
            wait_for_commits(settings, end_offsets(produced), timeout_s=60)
        finally:
            worker.send_signal(signal.SIGTERM)
            log = worker.communicate(timeout=60)[0].decode()
    finally:
        proxy.down()
        broker.stop()
    assert worker.returncode == 0, log
    assert proxy.rewritten > 0, "the worker's consumer received the name as bytes that are not UTF-8"
    by_offset = {o.source[1]: o for o in outputs}
    assert sorted(by_offset) == [0, 1, 2]
    hostile = by_offset[1]
    assert hostile.topic == settings.topics.dead_letter
    assert hostile.headers["filter.error"] == b"invalid_header"
    assert hostile.value == orjson.dumps({"text": "hostile"})
    assert by_offset[2].headers["filter.action"] == b"drop", "the record after it is classified as usual"
