"""``filter-worker produce``: a load generator sending sample messages to the input topic at a rate.

A topic that does not exist is refused unless ``--create-topic`` asks for it, as ``run`` refuses a
missing input topic: many brokers create a topic on the first record sent to it, so a typo in
``--topic`` would otherwise succeed, filling a topic nobody reads.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from filter_worker.cli.common import subcommand
from filter_worker.config import Settings, load_settings
from filter_worker.exit_codes import ExitCode

# Partitions of a topic --create-topic creates: those `filter-worker broker --topics` gives its topics.
CREATED_PARTITIONS = 3
_METADATA_TIMEOUT_S = 10.0


def add_parser(commands: Any) -> None:
    parser = subcommand(commands, "produce", "load generator: sample messages to the input topic at a rate")
    parser.add_argument("--rate", type=float, default=50.0, help="messages per second (default 50)")
    parser.add_argument("--count", type=int, default=1000, help="messages to send; 0 sends until stopped")
    parser.add_argument("--topic", help="target topic (default: the first FILTER_TOPICS__INPUT)")
    parser.add_argument(
        "--create-topic",
        action="store_true",
        help=f"create the topic ({CREATED_PARTITIONS} partitions) if it does not exist; without it a missing "
        "topic is refused (exit 4)",
    )
    parser.set_defaults(handler=run)


def _topic_problem(settings: Settings, topic: str, create: bool) -> tuple[str, ExitCode] | None:
    """Why producing to ``topic`` must not start, with the exit code; None once it exists (or was created)."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    from filter_worker.kafka import clients

    config: dict[str, Any] = {**clients.admin_config(settings.kafka), "log_level": 4}  # no line when it goes
    admin = AdminClient(config)
    servers = settings.kafka.bootstrap_servers
    try:
        missing = clients.missing_topics(admin, [topic], _METADATA_TIMEOUT_S)
    except KafkaException as exc:
        silent = f"Kafka at {servers} did not answer in {_METADATA_TIMEOUT_S:.0f} s ({exc.args[0].str()})"
        return silent, ExitCode.FAILED
    if not missing:
        return None
    if not create:
        return (
            f"topic '{topic}' does not exist on {servers} (the worker reads {settings.topics.input}); check "
            "--topic, or add --create-topic to create it",
            ExitCode.TOPICS,
        )
    try:
        clients.create_topics(admin, [topic], CREATED_PARTITIONS)
    except (KafkaException, RuntimeError) as exc:
        return str(exc), ExitCode.FAILED
    print(f"created topic {topic} ({CREATED_PARTITIONS} partitions)", flush=True)
    return None


def run(args: argparse.Namespace) -> int:
    from filter_worker.kafka.client_check import check_clients
    from filter_worker.tools.loadgen import produce_samples

    settings = load_settings(args.config)
    check_clients(settings.kafka)
    topic = args.topic or settings.topics.input[0]
    problem = _topic_problem(settings, topic, args.create_topic)
    if problem is not None:
        message, code = problem
        print(f"filter-worker: {message}", file=sys.stderr)
        return code
    return produce_samples(settings, topic, args.rate, args.count)
