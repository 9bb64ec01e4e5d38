"""The ``fanny-broker`` command.

Usage::

    fanny-broker serve --host 127.0.0.1 --port 8765 --db PATH
                       [--radius-max-m M] [--cooldown-s S] [--position-timeout-s S]
                       [--open-declarations] [--certfile PEM --keyfile PEM]
                       [--max-connections-per-address N] [--max-connections N]
                       [--position-rate-per-s R] [--upload-answer-delay-s S] [--log-level LEVEL]
    fanny-broker issue-code --db PATH [--ttl 1h]

``serve`` prints ``listening on ws://HOST:PORT`` (``wss://`` with ``--certfile``/``--keyfile``)
on stdout once the socket is bound, runs until SIGTERM or SIGINT, then stops gracefully (closes
the server, waits for the handlers, closes the board) and exits 0. Without
``--open-declarations`` a positive upload needs a declaration code.

``issue-code`` prints one declaration code (paper section 5) on stdout, e.g.
``K7QF-3M9X-TR2B-8HJD``, and stores only its SHA-256 and expiry in the board's database (the same
file ``serve`` uses; it may be running). ``--ttl`` accepts ``90s``, ``30m``, ``1h``, ``2d`` (or
plain seconds); the code must be used within it.

Bad arguments, an unusable database file or unreadable TLS files print one line on stderr and
exit 2; an address that cannot be bound exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import re
import signal
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import NoReturn

from fanny_tui.protocol.codes import code_hash, format_code

from .positives import BoardError, SqlitePositiveBoard
from .server import BrokerSettings, SetupError, start_broker

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


def _number(*, zero_ok: bool) -> Callable[[str], float]:
    """An argparse type: a finite number > 0 (or >= 0 when ``zero_ok``)."""
    expected = "a number >= 0" if zero_ok else "a positive number"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not (math.isfinite(value) and (value >= 0 if zero_ok else value > 0)):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_positive = _number(zero_ok=False)
_non_negative = _number(zero_ok=True)


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


_TTL_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_TTL = timedelta(days=30)
"""The longest a declaration code may stay valid."""


def parse_ttl(text: str) -> timedelta:
    """Parse a code lifetime: a number with an optional unit ``s``, ``m``, ``h`` or ``d``.

    Args:
        text: e.g. ``"90s"``, ``"30m"``, ``"1h"``, ``"1.5d"``, ``"600"`` (seconds).

    Returns:
        The lifetime, > 0 and at most :data:`MAX_TTL` (30 days).

    Raises:
        argparse.ArgumentTypeError: anything else (the message says what is accepted).
    """
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text.lower())
    if not found:
        raise argparse.ArgumentTypeError(
            f"expected a duration like 90s, 30m, 1h or 2d, got {text!r}")
    seconds = float(found.group(1)) * _TTL_UNITS[found.group(2) or "s"]
    if not 0 < seconds <= MAX_TTL.total_seconds():
        raise argparse.ArgumentTypeError(
            f"expected a duration > 0 and at most 30d, got {text!r}")
    return timedelta(seconds=seconds)


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
    serve.add_argument("--open-declarations", action="store_true",
                       help="accept positive uploads WITHOUT a declaration code (field tests "
                            "only; a code that is sent is still checked)")
    serve.add_argument("--certfile", metavar="PEM",
                       help="TLS certificate chain: serve wss:// (needs --keyfile)")
    serve.add_argument("--keyfile", metavar="PEM", help="TLS private key (needs --certfile)")
    serve.add_argument("--max-connections-per-address", type=_count, default=128, metavar="N",
                       help="open connections allowed from one address, 0 for no cap (behind "
                            "a reverse proxy every client has its address) "
                            "(default: %(default)s)")
    serve.add_argument("--max-connections", type=_count, default=20_000, metavar="N",
                       help="open connections allowed in all, 0 for no cap; more are refused "
                            "too_many_connections (default: %(default)s)")
    serve.add_argument("--position-rate-per-s", type=_positive, default=10.0, metavar="R",
                       help="positions per second one connection may send on average "
                            "(default: %(default)s)")
    serve.add_argument("--upload-answer-delay-s", type=_non_negative, default=1.0, metavar="S",
                       help="least time before answering a positive upload "
                            "(default: %(default)s)")
    serve.add_argument("--redis", metavar="URL",
                       help="Redis shared by a region's brokers for live positions and routing "
                            "(redis://HOST:PORT/DB; run it without persistence); default: this "
                            "process's memory")
    serve.add_argument("--postgres", metavar="URL",
                       help="PostgreSQL database of the positive board shared by a region's "
                            "brokers (postgresql://...); default: the SQLite file --db")
    serve.add_argument("--log-level", type=_level, default="INFO", metavar="LEVEL",
                       help="DEBUG, INFO, WARNING or ERROR (default: %(default)s)")
    issue = commands.add_parser(
        "issue-code", help="print a declaration code (one declaration) and store its hash")
    issue.add_argument("--db", required=True, metavar="PATH",
                       help="SQLite file of the positive-token board (created if missing)")
    issue.add_argument("--ttl", type=parse_ttl, default=timedelta(hours=1), metavar="DURATION",
                       help="how long the code may be used: 90s, 30m, 1h, 2d (default: 1h)")
    return parser


def _option_names(text: str) -> str:
    """Name command-line options, not dataclass fields, in a settings error."""
    def option(found: re.Match[str]) -> str:
        name = found.group(1)
        special = {"db_path": "--db", "redis_url": "--redis", "postgres_url": "--postgres"}
        return special.get(name, "--" + name.replace("_", "-"))

    return re.sub(r"BrokerSettings\.(\w+)", option, text)


def issue_code(db: str, ttl: timedelta, now: datetime | None = None) -> tuple[str, datetime]:
    """Make a declaration code and store its hash and expiry in the board at ``db``.

    Args:
        db: the board's SQLite file (created if missing; the broker may be running on it).
        ttl: how long the code may be used.
        now: the current aware UTC time (default: now).

    Returns:
        ``(code, expires_at)``: the code as printed (``XXXX-XXXX-XXXX-XXXX``) and its expiry.

    Raises:
        BoardError: the file cannot be opened or written.
    """
    now = datetime.now(UTC) if now is None else now
    code = format_code(os.urandom(10))
    expires_at = now + ttl
    board = SqlitePositiveBoard(db)
    try:
        board.add_code(code_hash(code), expires_at)
    finally:
        board.close()
    _match_directory_owner(Path(db))
    return code, expires_at


def _match_directory_owner(db: Path) -> None:
    """Give files root just created in the service's state directory to its owner.

    The unit runs the broker as a dynamic user that owns ``/var/lib/fanny-broker``; an
    operator running ``issue-code`` as root on a board that did not exist yet would otherwise
    leave a root-owned file the broker cannot write.
    """
    if os.geteuid() != 0:
        return
    try:
        owner = db.parent.stat()
        for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
            if path.exists() and path.stat().st_uid != owner.st_uid:
                os.chown(path, owner.st_uid, owner.st_gid)
    except OSError as exc:
        print(f"{PROG}: warning: could not give {db} to the owner of its directory: "
              f"{exc.strerror or exc}", file=sys.stderr)


def _issue(args: argparse.Namespace) -> int:
    try:
        code, expires_at = issue_code(args.db, args.ttl)
    except BoardError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    print(code, flush=True)
    print(f"{PROG}: declaration code for one declaration, valid until "
          f"{expires_at.strftime('%Y-%m-%dT%H:%M:%SZ')}", file=sys.stderr)
    return 0


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
        print(f"{PROG}: error: a command is required: serve or issue-code (see {PROG} --help)",
              file=sys.stderr)
        return 2
    if args.command == "issue-code":
        return _issue(args)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = BrokerSettings(
            host=args.host, port=args.port, db_path=args.db, radius_max_m=args.radius_max_m,
            cooldown_s=args.cooldown_s, position_timeout_s=args.position_timeout_s,
            open_declarations=args.open_declarations, certfile=args.certfile,
            keyfile=args.keyfile, max_connections_per_address=args.max_connections_per_address,
            max_connections=args.max_connections,
            position_rate_per_s=args.position_rate_per_s,
            upload_answer_delay_s=args.upload_answer_delay_s, redis_url=args.redis,
            postgres_url=args.postgres)
    except ValueError as exc:
        print(f"{PROG}: error: {_option_names(str(exc))}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_serve(settings))
    except (BoardError, SetupError) as exc:
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
