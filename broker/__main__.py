"""The ``fanny-broker`` command.

Usage::

    fanny-broker serve --host 127.0.0.1 --port 8765 --db PATH
                       [--radius-max-m M] [--cooldown-s S] [--position-timeout-s S]
                       [--log-level LEVEL]

``serve`` prints ``listening on ws://HOST:PORT`` on stdout once the socket is bound, runs
until SIGTERM or SIGINT, then stops gracefully (closes the server, waits for the handlers,
closes the board) and exits 0. Bad arguments or an unusable database file print one line on
stderr and exit 2; an address that cannot be bound exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import re
import signal
import sys
from collections.abc import Sequence
from typing import NoReturn

from .positives import BoardError
from .server import BrokerSettings, start_broker

PROG = "fanny-broker"
logger = logging.getLogger("broker")


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors become one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535, got {text!r}")
    return value


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _level(text: str) -> str:
    level = text.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise argparse.ArgumentTypeError(
            f"expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got {text!r}")
    return level


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``fanny-broker`` (its errors raise instead of exiting)."""
    parser = _Parser(prog=PROG, description="FANNY broker: proximity matching, signaling "
                     "relay and the anonymous positive-token board.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the broker until SIGTERM/SIGINT")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default: %(default)s)")
    serve.add_argument("--port", type=_port, default=8765,
                       help="TCP port, 0 for a free one (default: %(default)s)")
    serve.add_argument("--db", required=True, metavar="PATH",
                       help="SQLite file of the positive-token board (created if missing)")
    serve.add_argument("--radius-max-m", type=_positive, default=100.0, metavar="M",
                       help="largest matching radius in metres (default: %(default)s)")
    serve.add_argument("--cooldown-s", type=_positive, default=300.0, metavar="S",
                       help="seconds before a pair can match again (default: %(default)s)")
    serve.add_argument("--position-timeout-s", type=_positive, default=60.0, metavar="S",
                       help="seconds before a position without update is dropped "
                            "(default: %(default)s)")
    serve.add_argument("--log-level", type=_level, default="INFO", metavar="LEVEL",
                       help="DEBUG, INFO, WARNING or ERROR (default: %(default)s)")
    return parser


def _option_names(text: str) -> str:
    """Name command-line options, not dataclass fields, in a settings error."""
    def option(found: re.Match[str]) -> str:
        name = found.group(1)
        return "--db" if name == "db_path" else "--" + name.replace("_", "-")
    return re.sub(r"BrokerSettings\.(\w+)", option, text)


async def _serve(settings: BrokerSettings) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):  # not on Windows
            loop.add_signal_handler(signum, stop.set)
    async with start_broker(settings) as running:
        logger.info("listening on %s", running.url)
        print(f"listening on {running.url}", flush=True)
        await stop.wait()
        logger.info("stopping on signal")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fanny-broker``.

    Args:
        argv: the arguments without the program name (default ``sys.argv[1:]``).

    Returns:
        0 after a graceful stop (or ``--help``), 1 when the address cannot be bound, 2 for
        bad arguments or an unusable database file.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code) if isinstance(exc.code, int) else 0
    if args.command is None:
        print(f"{PROG}: error: a command is required: serve (see {PROG} --help)",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = BrokerSettings(host=args.host, port=args.port, db_path=args.db,
                                  radius_max_m=args.radius_max_m, cooldown_s=args.cooldown_s,
                                  position_timeout_s=args.position_timeout_s)
    except ValueError as exc:
        print(f"{PROG}: error: {_option_names(str(exc))}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_serve(settings))
    except BoardError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        reason = exc.strerror or str(exc)
        print(f"{PROG}: error: cannot listen on {args.host} port {args.port}: {reason}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
