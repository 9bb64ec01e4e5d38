"""The ``fanny-broker`` command.

Usage::

    fanny-broker serve [--config FILE] [--host 127.0.0.1] [--port 8765] [--db PATH]
                       [--redis URL] [--postgres URL]
                       [--radius-max-m M] [--cooldown-s S] [--position-timeout-s S]
                       [--open-declarations] [--certfile PEM --keyfile PEM]
                       [--max-connections-per-address N] [--max-connections N]
                       [--position-rate-per-s R] [--max-speed-mps V]
                       [--upload-answer-delay-s S] [--log-level LEVEL]
    fanny-broker create-board [--config FILE] [--db PATH | --postgres URL] [--if-missing]
    fanny-broker issue-code [--config FILE] [--db PATH | --postgres URL] [--ttl 1h]
    fanny-broker --version

``serve`` prints ``listening on ws://HOST:PORT`` (``wss://`` with ``--certfile``/``--keyfile``)
on stdout once the socket is bound, runs until SIGTERM or SIGINT, then stops gracefully (closes
the server, waits for the handlers, closes the board) and exits 0. Its settings come from the
defaults, then the TOML file ``--config FILE`` (every setting, documented in
``broker.example.toml``; see :mod:`broker.config`), then the options given, which win. Without
``--open-declarations`` a positive upload needs a declaration code.

``create-board`` creates an empty positive-token board: an SQLite file at ``--db PATH``, or the
tables of a region's board in the existing PostgreSQL database ``--postgres URL``; it refuses a
file that exists or a database that holds a board (``--if-missing``: then it does nothing, for a
service's first start). ``serve`` and ``issue-code`` never create a board: a mistyped path (or
database name) is refused in one line that names it and the ``create-board`` command, instead of
silently starting on an empty board. (The library API, :func:`broker.server.start_broker`, still
creates a missing board: tests, the demo and the simulator start brokers in fresh folders.)

``issue-code`` prints one declaration code (paper section 5) on stdout, e.g.
``K7QF-3M9X-TR2B-8HJD``, and stores only its SHA-256 and expiry in the board (the same one
``serve`` uses; it may be running). ``--ttl`` takes a number with its unit: ``90s``,
``30m``, ``2h``, ``1d`` (a bare number is refused); the code must be used within it.

All three commands find the board the same way: ``--postgres URL`` (or ``storage.postgres_url``
of ``--config FILE``) names a PostgreSQL board, else ``--db PATH`` (or ``storage.db_path``) the
SQLite file; one of them is required. ``create-board`` and ``issue-code`` read the whole config
file (a bad key is refused as by ``serve``) but use only its storage settings.

Bad arguments, a bad config file, a missing or unusable board or unreadable TLS files
print one line on stderr and exit 2 (a config file's error names the file and its key:
``fanny-broker: config error: broker.toml: limits.position_rate_per_s: expected ...``); an
address that cannot be bound exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NoReturn

from fanny_tui import kit_version
from fanny_tui.protocol import validate
from fanny_tui.protocol.codes import code_hash, format_code

from .config import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    LOG_LEVELS,
    BrokerConfigError,
    broker_settings,
    default_values,
    load_broker_config,
)
from .positives import BoardError, PositiveBoard, SqlitePositiveBoard
from .server import BrokerSettings, SetupError, start_broker

PROG = "fanny-broker"
logger = logging.getLogger("broker")


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors become one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


_typed = validate.argument_type

_port = _typed(validate.integer_text, 0, 65535)
_postgres_url = _typed(validate.url, ("postgresql", "postgres"))
_positive = _typed(validate.number_text, low=0.0, low_open=True)
_non_negative = _typed(validate.number_text, low=0.0)
_count = _typed(validate.integer_text, 0)
_level = _typed(lambda key, text: validate.choice(key, text.upper(), LOG_LEVELS))

MAX_TTL = timedelta(days=30)
"""The longest a declaration code may stay valid."""


def parse_ttl(text: str) -> timedelta:
    """Parse a code lifetime: a number and its unit ``s``, ``m``, ``h`` or ``d``.

    Args:
        text: e.g. ``"90s"``, ``"30m"``, ``"2h"``, ``"1.5d"``. A bare number (``"1"``) is
            refused: it could be read as one second as well as one hour or one day.

    Returns:
        The lifetime, > 0 and at most :data:`MAX_TTL` (30 days).

    Raises:
        argparse.ArgumentTypeError: anything else (the message says what is accepted).
    """
    try:
        seconds = validate.duration_text("", text, high_s=MAX_TTL.total_seconds())
    except validate.Invalid as exc:
        raise argparse.ArgumentTypeError(exc.detail) from None
    return timedelta(seconds=seconds)


_OPTIONS = {"db_path": "--db", "redis_url": "--redis", "postgres_url": "--postgres"}
"""Options whose name is not ``--`` + the setting with dashes."""


def _option(field: str) -> str:
    """The command-line option of a setting (``radius_max_m`` -> ``--radius-max-m``)."""
    return _OPTIONS.get(field, "--" + field.replace("_", "-"))


_NUMBER_OPTIONS: tuple[tuple[str, Callable[[str], Any], str, str], ...] = (
    ("--radius-max-m", _positive, "M", "largest matching radius in metres"),
    ("--cooldown-s", _positive, "S", "seconds before a pair can match again"),
    ("--position-timeout-s", _positive, "S",
     "seconds before a position without update is dropped"),
    ("--max-connections-per-address", _count, "N",
     "open connections allowed from one address, 0 for no cap (behind a reverse proxy every "
     "client has its address)"),
    ("--max-connections", _count, "N",
     "open connections allowed in all, 0 for no cap; more are refused too_many_connections"),
    ("--position-rate-per-s", _positive, "R",
     "positions per second one connection may send on average"),
    ("--max-speed-mps", _positive, "V",
     "implausible-jump bound in metres per second: a position implying a higher speed since "
     "the session's last accepted one is not matched"),
    ("--upload-answer-delay-s", _non_negative, "S",
     "least time before answering a positive upload"),
)
"""``serve``'s numeric options: (option, type, metavar, help); each sets the setting of its
name (``--radius-max-m`` -> ``radius_max_m``)."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``fanny-broker`` (its errors raise instead of exiting).

    Every option of ``serve`` that sets a :class:`BrokerSettings` attribute has the
    attribute as its ``dest`` and ``None`` as its default (not given: the config file or the
    default applies).
    """
    parser = _Parser(prog=PROG, description="FANNY broker: proximity matching, signaling "
                     "relay and the anonymous positive-token board.")
    parser.add_argument("--version", action="version", version=f"{PROG} {kit_version()}",
                        help="print the kit's version and exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the broker until SIGTERM/SIGINT")
    defaults = SimpleNamespace(**default_values())
    serve.add_argument("--config", metavar="FILE", type=Path,
                       help="TOML file with any of the settings (see broker.example.toml); "
                            "the options given here override it")
    serve.add_argument("--host", help=f"address to bind (default: {DEFAULT_HOST})")
    serve.add_argument("--port", type=_port,
                       help=f"TCP port, 0 for a free one (default: {DEFAULT_PORT})")
    _board_options(serve)
    serve.add_argument("--redis", dest="redis_url", metavar="URL",
                       help="redis:// URL of the Redis shared by a region's brokers (default: "
                            "live positions and routes in this process's memory)")
    for option, kind, metavar, text in _NUMBER_OPTIONS:
        default = getattr(defaults, option[2:].replace("-", "_"))
        serve.add_argument(option, type=kind, metavar=metavar,
                           help=f"{text} (default: {default:g})")
    serve.add_argument("--open-declarations", action="store_true", default=None,
                       help="accept positive uploads WITHOUT a declaration code (field tests "
                            "only; a code that is sent is still checked)")
    serve.add_argument("--certfile", metavar="PEM",
                       help="TLS certificate chain: serve wss:// (needs --keyfile)")
    serve.add_argument("--keyfile", metavar="PEM", help="TLS private key (needs --certfile)")
    serve.add_argument("--log-level", type=_level, metavar="LEVEL",
                       help="DEBUG, INFO, WARNING or ERROR (default: INFO)")
    create = commands.add_parser(
        "create-board", help="create an empty positive-token board (refuses an existing one)")
    _board_options(create, config=True, creating=True)
    create.add_argument("--if-missing", action="store_true",
                        help="do nothing when the board already exists (a service's first "
                             "start)")
    issue = commands.add_parser(
        "issue-code", help="print a declaration code (one declaration) and store its hash")
    _board_options(issue, config=True)
    issue.add_argument("--ttl", type=parse_ttl, default=timedelta(hours=1), metavar="DURATION",
                       help="how long the code may be used, with its unit: 90s, 30m, 2h, 1d "
                            "(default: 1h)")
    return parser


def _board_options(command: argparse.ArgumentParser, *, config: bool = False,
                   creating: bool = False) -> None:
    """The options naming the positive board (``--db``, ``--postgres``; ``--config``), the
    same for ``serve``, ``create-board`` and ``issue-code``."""
    if config:
        command.add_argument("--config", metavar="FILE", type=Path,
                             help="the broker's TOML file (see broker.example.toml): its "
                                  "storage settings name the board; the options here win")
    command.add_argument(
        "--db", dest="db_path", metavar="PATH",
        help=("SQLite file to create (missing folders are created, mode 0700)" if creating else
              "SQLite file of the positive-token board, made with create-board")
        + " (or storage.db_path in --config; not needed with --postgres)")
    command.add_argument(
        "--postgres", dest="postgres_url", metavar="URL",
        help="postgresql:// URL of a region's positive board, an existing database"
             + (" (its tables are created here)" if creating else
                ", made with create-board --postgres") + " (default: the SQLite file --db)")


SETTING_OPTIONS = ("host", "port", "db_path", "redis_url", "postgres_url", "radius_max_m",
                   "cooldown_s", "position_timeout_s", "open_declarations", "certfile",
                   "keyfile", "max_connections_per_address", "max_connections",
                   "position_rate_per_s", "max_speed_mps", "upload_answer_delay_s", "log_level")
"""The ``dest`` of every ``serve`` option that overrides a config file setting."""


def missing_board(db: str | Path | None, postgres_url: str | None = None) -> str | None:
    """Why the board cannot be used as an existing one (one line), or None if it exists.

    Args:
        db: the SQLite file (used without ``postgres_url``).
        postgres_url: a PostgreSQL board's URL: its database must hold the board's tables.

    Returns:
        The line, naming the path (not the URL: it may hold a password) and the command that
        creates the board; or None.

    Raises:
        BoardError: the PostgreSQL server or database cannot be reached (one line).
    """
    if postgres_url is not None:
        from .postgres_board import board_exists

        if board_exists(postgres_url):
            return None
        return (f"postgres_url: the database holds no positive board (create it with: {PROG} "
                f"create-board --postgres URL, or --config FILE)")
    if db is not None and os.path.lexists(db):
        return None
    return (f"cannot open the positive board {db}: no such file (create it with: "
            f"{PROG} create-board --db {db})")


def create_postgres_board(url: str, *, if_missing: bool = False) -> bool:
    """Create the tables of an empty positive-token board in the PostgreSQL database ``url``.

    Args:
        url: ``postgresql://`` URL of an existing database (``createdb`` makes one).
        if_missing: a database that holds a board is left as it is (else it is refused).

    Returns:
        True when the board was created, False when ``if_missing`` and it exists.

    Raises:
        BoardError: the database holds a board already (never emptied), or cannot be
            reached or written (one line starting with ``postgres_url:``).
    """
    from .postgres_board import PostgresPositiveBoard, board_exists

    if board_exists(url):
        if if_missing:
            return False
        raise BoardError("postgres_url: the database already holds a positive board: left as "
                         "it is (a board is created once; serve and issue-code use it)")
    PostgresPositiveBoard(url).close()       # CREATE TABLE IF NOT EXISTS, under a lock
    return True


def create_board(db: str | Path, *, if_missing: bool = False) -> bool:
    """Create an empty positive-token board at ``db`` (and its missing folders, mode 0700).

    Args:
        db: the SQLite file to create.
        if_missing: an existing ``db`` is left as it is (else it is refused).

    Returns:
        True when a board was created, False when ``if_missing`` and ``db`` exists.

    Raises:
        BoardError: ``db`` exists (never overwritten), or cannot be created.
    """
    path = Path(db)
    if os.path.lexists(path):
        if if_missing:
            return False
        raise BoardError(f"{path} already exists: not overwritten (a board is created once; "
                         "serve and issue-code use it as it is)")
    try:
        if not path.parent.is_dir():
            path.parent.mkdir(parents=True, mode=0o700)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError as exc:
        if exc.filename is not None and Path(exc.filename) == path:   # made meanwhile
            if if_missing:
                return False
            raise BoardError(f"{path} already exists: not overwritten") from None
        raise BoardError(f"cannot create the positive board {path}: {exc.filename} is not "
                         "a folder") from None
    except OSError as exc:
        raise BoardError(f"cannot create the positive board {path}: "
                         f"{exc.strerror or exc}") from None
    try:
        SqlitePositiveBoard(path).close()         # an empty file: the schema is written
    except BoardError:
        path.unlink(missing_ok=True)
        raise
    _match_directory_owner(path)
    return True


def issue_code(db: str | Path | None, ttl: timedelta, now: datetime | None = None, *,
               postgres_url: str | None = None) -> tuple[str, datetime]:
    """Make a declaration code and store its hash and expiry in the board.

    Args:
        db: the board's SQLite file, made by :func:`create_board` (never created here; the
            broker may be running on it). Unused with ``postgres_url``.
        ttl: how long the code may be used.
        now: the current aware UTC time (default: now).
        postgres_url: a region's PostgreSQL board, made by :func:`create_postgres_board`
            (its brokers may be running on it).

    Returns:
        ``(code, expires_at)``: the code as printed (``XXXX-XXXX-XXXX-XXXX``) and its expiry.

    Raises:
        BoardError: the board does not exist (the message names ``create-board``), or
            cannot be opened or written.
    """
    refused = missing_board(db, postgres_url)
    if refused:
        raise BoardError(refused)
    now = datetime.now(UTC) if now is None else now
    code = format_code(os.urandom(10))
    expires_at = now + ttl
    board: PositiveBoard
    if postgres_url is not None:
        from .postgres_board import PostgresPositiveBoard

        board = PostgresPositiveBoard(postgres_url)
    else:
        assert db is not None                 # missing_board refused None
        board = SqlitePositiveBoard(db)
    try:
        board.add_code(code_hash(code), expires_at)
    finally:
        board.close()
    if postgres_url is None and db is not None:
        _match_directory_owner(Path(db))      # the -wal and -shm files root may have made
    return code, expires_at


def _match_directory_owner(db: Path) -> None:
    """Give files root just created in the service's state directory to its owner.

    The unit runs the broker as a dynamic user that owns ``/var/lib/fanny-broker``; an
    operator running ``create-board`` or ``issue-code`` as root would otherwise leave a
    root-owned file the broker cannot write.
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


def _settings(args: argparse.Namespace, names: Sequence[str]
              ) -> tuple[BrokerSettings, str] | None:
    """The settings from ``--config`` and the options ``names`` given; None after printing a
    config error in one line (the option's name when an option was wrong, else the file's
    name and key)."""
    try:
        from_file = {} if args.config is None else load_broker_config(args.config)
        given = {name: getattr(args, name) for name in names
                 if getattr(args, name) is not None}
        return broker_settings(from_file, given, source=args.config and str(args.config))
    except BrokerConfigError as exc:
        if exc.source is None and exc.field in SETTING_OPTIONS:
            print(f"{PROG}: error: {_option(exc.field)}: {exc.detail}", file=sys.stderr)
        else:
            print(f"{PROG}: config error: {exc}", file=sys.stderr)
        return None


_BOARD_OPTIONS = ("db_path", "postgres_url")
"""The settings ``create-board`` and ``issue-code`` take as options."""


def _create(args: argparse.Namespace) -> int:
    found = _settings(args, _BOARD_OPTIONS)
    if found is None:
        return 2
    settings = found[0]
    try:
        if settings.postgres_url is not None:
            created = create_postgres_board(settings.postgres_url, if_missing=args.if_missing)
            done = ("created an empty positive board in the PostgreSQL database" if created
                    else "the PostgreSQL database holds a positive board: left as it is")
        else:
            assert settings.db_path is not None       # BrokerSettings refuses neither
            created = create_board(settings.db_path, if_missing=args.if_missing)
            done = (f"created an empty positive board at {settings.db_path}" if created else
                    f"{settings.db_path} exists: left as it is")
    except BoardError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    print(f"{PROG}: {done}", file=sys.stderr)
    return 0


def _issue(args: argparse.Namespace) -> int:
    found = _settings(args, _BOARD_OPTIONS)
    if found is None:
        return 2
    settings = found[0]
    try:
        code, expires_at = issue_code(settings.db_path, args.ttl,
                                      postgres_url=settings.postgres_url)
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
        0 after a graceful stop (or ``--help``, ``--version``), 1 when the address cannot be
        bound, 2 for bad arguments, a bad config file or a missing or unusable database file.
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
        print(f"{PROG}: error: a command is required: serve, create-board or issue-code "
              f"(see {PROG} --help)", file=sys.stderr)
        return 2
    if args.command == "issue-code":
        return _issue(args)
    if args.command == "create-board":
        return _create(args)
    found = _settings(args, SETTING_OPTIONS)
    if found is None:
        return 2
    settings, log_level = found
    try:
        refused = missing_board(settings.db_path, settings.postgres_url)
    except BoardError as exc:
        refused = str(exc)
    if refused:
        print(f"{PROG}: error: {refused}", file=sys.stderr)
        return 2
    logging.basicConfig(level=log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(_serve(settings))
    except (BoardError, SetupError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        reason = exc.strerror or str(exc)
        print(f"{PROG}: error: cannot listen on {settings.host} port {settings.port}: {reason}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
