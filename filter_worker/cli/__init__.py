"""``filter-worker`` command line: one module per command, each with ``add_parser`` and ``run``.

Exit codes (``exit_codes.ExitCode``) tell an orchestrator what happened. Bad configuration, bad input
data and model errors are one sentence on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

from filter_worker import __version__
from filter_worker.cli import bench, broker, calibrate, classify, demo, drift, evaluate, feedback, model, produce, run
from filter_worker.config import ConfigError
from filter_worker.exit_codes import ExitCode, ModelLoadError
from filter_worker.model.lockfile import LockError
from filter_worker.security.redaction import redact
from filter_worker.service.signals import Requests, release_reloads
from filter_worker.tools.broker import BrokerError

# Commands that serve until stopped: SIGHUP reloads them, so it never ends them, even while they start
# (``run`` applies a reload that came meanwhile once its loop runs; ``feedback`` does not see it).
_SERVICES = ("run", "feedback")
# In the order ``--help`` lists them.
COMMANDS: tuple[ModuleType, ...] = (
    run,
    feedback,
    classify,
    demo,
    broker,
    produce,
    bench,
    evaluate,
    calibrate,
    drift,
    model,
)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="filter-worker", description="Streaming spam/abuse filter for Kafka.")
    root.add_argument("--version", action="version", version=f"filter-worker {__version__}")
    root.add_argument("--config", metavar="FILE", help="TOML settings file (environment variables override it)")
    commands = root.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(commands)
    return root


def main(argv: Sequence[str] | None = None, requests: Requests | None = None) -> int:
    """``requests``: the stop and reload requests the entry point took before importing the commands."""
    args = parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    args.requests = requests or Requests()
    if requests is not None and args.command not in _SERVICES:
        release_reloads(requests)
    # Messages are built to leave secrets out; redact() is the last line of defence for ones that
    # quote a client's error.
    try:
        return handler(args)
    except ConfigError as exc:
        print(f"filter-worker: {redact(str(exc))}", file=sys.stderr)
        return ExitCode.CONFIG
    except (ModelLoadError, LockError) as exc:
        print(f"filter-worker: {redact(str(exc))}", file=sys.stderr)
        return ExitCode.MODEL
    except BrokerError as exc:  # the embedded broker (demo, bench, broker) could not start
        print(f"filter-worker: {redact(str(exc))}", file=sys.stderr)
        return ExitCode.FAILED


if __name__ == "__main__":
    sys.exit(main())
