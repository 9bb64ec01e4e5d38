"""Command line of the field device: ``fanny-tui``.

::

    fanny-tui [--config FILE] [--data-dir DIR] [--headless]   run the app (or the bare engine)
    fanny-tui tokens [--data-dir DIR] [--json]                 list the token store and alerts
    fanny-tui declare-positive [--code CODE] [--broker NAME] [--config FILE] [--data-dir DIR]
                                                               upload all tokens (paper 4, 5)
    fanny-tui demo [--devices N] [--headless]                  the whole kit on this machine
    fanny-tui report [--json] JOURNAL...                       merge devices' run journals
    fanny-tui --version                                        the kit's version

``--headless`` prints one JSON object per line on stdout per engine event (see
:mod:`fanny_tui.events`); logs go to stderr. Every user error (bad config, unusable data dir,
broker down) is one line on stderr and a non-zero exit code, never a traceback.

Exit codes: 0 done; 1 failed (a declaration not acknowledged, the data directory in use by
another process); 2 usage or configuration error (e.g. a ``[journal] path`` whose directory
does not exist: it is never created; ``declare-positive`` on a data directory that holds no
token store, a mistyped ``--data-dir``: nothing is created; ``tokens`` on a data directory
that does not exist); 130 interrupted (SIGINT before the
engine ran); 141 (128 + SIGPIPE, as Unix tools killed by SIGPIPE) when stdout was closed by its
reader (``fanny-tui --headless | head -n 2``): the engine is stopped cleanly, nothing more is
printed. The app stops cleanly on SIGINT, SIGTERM or SIGHUP (its terminal closed) and exits
128 + N (130, 143, 129); if its shutdown takes more than a few seconds after the signal, or a
second signal comes meanwhile, the process ends at once (:mod:`fanny_tui.stopping`; nothing is
lost: the store commits as it goes). ``--headless`` stops its engine on the same signals and
exits 0. The run and ``declare-positive`` hold the data directory's lock
(:mod:`fanny_tui.datadir`); ``tokens`` only reads. Without ``--config`` and without the default
config file, the run and ``declare-positive`` say once on stderr (and the app in a
notification) that they use the defaults, with the path they looked for.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import platformdirs

from . import kit_version
from .config import Config, ConfigError, load_config, parse_config
from .datadir import DataDirBusy, DataDirLock
from .describe import explain
from .events import Event, SessionStarted, to_json_dict
from .pipe import EXIT_BROKEN_PIPE as EXIT_BROKEN_PIPE
from .pipe import silence_stdout
from .protocol import validate
from .stopping import STOP_SIGNALS as STOP_SIGNALS
from .stopping import StopSignals
from .store import StoreError, TokenStore

if TYPE_CHECKING:
    import ssl

    from textual.app import App

    from .engine import Engine
    from .gps import PositionSource

APP_NAME = "fanny-tui"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130

log = logging.getLogger(__name__)


class UsageError(Exception):
    """A user error: printed as one line, exit code 2."""


def default_config_path() -> Path:
    """``config.toml`` in the platformdirs user config dir (read only if it exists)."""
    return platformdirs.user_config_path(APP_NAME) / "config.toml"


def resolve_config(path: str | None) -> Config:
    """Load ``path``, else the default config file if present, else the defaults.

    Raises:
        ConfigError: the file is unreadable or has a bad value (message names the key).
    """
    if path is not None:
        return load_config(Path(path))
    default = default_config_path()
    return load_config(default) if default.exists() else parse_config({})


def missing_config_notice(path: str | None) -> str | None:
    """The one line saying that no config file is read, or None when one is.

    Args:
        path: the ``--config`` argument (None: not given).

    Returns:
        ``"no config file at PATH: running on the defaults ..."`` when ``path`` is None and
        the default config file (:func:`default_config_path`) does not exist, else None.
    """
    if path is not None:
        return None
    default = default_config_path()
    if default.exists():
        return None
    return (f"no config file at {default}: running on the defaults (broker "
            f"{parse_config({}).broker.url}); write one there or pass --config FILE "
            "(see config.example.toml)")


def resolve_data_dir(config: Config, override: str | None) -> Path:
    """``--data-dir`` > ``[storage] data_dir`` > platformdirs user data dir."""
    if override:
        return Path(override).expanduser()
    if config.storage.data_dir is not None:
        return config.storage.data_dir
    return platformdirs.user_data_path(APP_NAME)


MAX_WAIT_S = 30 * 86400.0
"""The longest ``--timeout`` / ``--duration`` given with a unit (30 days)."""


def seconds_text(key: str, text: str) -> float:
    """A command-line wait in seconds: a bare number (``"20"``, ``"2.5"``: seconds, > 0) or a
    number with its unit as ``fanny-broker issue-code --ttl`` takes it (``"3s"``, ``"2m"``).

    Returns:
        Seconds, > 0 (with a unit: at most :data:`MAX_WAIT_S`).

    Raises:
        validate.Invalid: neither (the message says what is accepted).
    """
    try:
        float(text)
    except ValueError:
        try:
            return validate.duration_text(key, text, high_s=MAX_WAIT_S)
        except validate.Invalid as exc:
            if exc.expected.startswith("a duration >"):   # a unit, but out of range
                raise
            raise validate.Invalid(key, "seconds > 0, as a number or with its unit (3s, 2m)",
                                   text) from None
    return validate.number_text(key, text, low=0.0, low_open=True)


_positive_seconds = validate.argument_type(seconds_text)


def _demo_devices(text: str) -> int:
    from .demo import devices_argument  # the demo imports this module

    return devices_argument(text)


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                        help="TOML configuration (see config.example.toml)")
    common.add_argument("--data-dir", metavar="DIR", default=argparse.SUPPRESS,
                        help="where the token store lives (default: the user data dir)")
    common.add_argument("--log-level", default=argparse.SUPPRESS,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser = argparse.ArgumentParser(
        prog=APP_NAME, parents=[common],
        description="FANNY field kit: witness nearby devices, declare positive, get alerts.")
    parser.add_argument("--version", action="version",
                        version=f"{APP_NAME} {kit_version()}",
                        help="print the kit's version and exit")
    parser.add_argument("--headless", action="store_true",
                        help="run the engine without UI; JSON events on stdout, one per line")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    tokens = sub.add_parser("tokens", parents=[common], help="list the stored tokens")
    tokens.add_argument("--json", action="store_true",
                        help='one JSON object on stdout: {"tokens": [...], "alerts": [...]}')
    declare = sub.add_parser("declare-positive", parents=[common],
                             help="upload every stored token as positive (no UI)")
    declare.add_argument("--code", metavar="CODE", default=None,
                         help="the single-use declaration code from the health authority or "
                              "test site, e.g. K7QF-3M9X-TR2B-8HJD (omit only for a broker "
                              "with open declarations)")
    declare.add_argument("--broker", metavar="NAME", default=None,
                         help="the broker to declare to: [broker] name (the default) or the "
                              "name of a [[positives]] broker of the config")
    declare.add_argument("--timeout", type=_positive_seconds, default=60.0, metavar="S",
                         help="give up waiting for the broker's ack after S seconds, or a "
                              "number with its unit: 90s, 2m (default 60)")
    demo = sub.add_parser("demo", help="broker + this app + simulated devices on loopback")
    from .demo import CONNECTIONS_PER_ADDRESS, MAX_DEVICES  # the demo imports this module

    demo.add_argument("--devices", type=_demo_devices, default=3,
                      help=f"simulated devices (default 3, at most {MAX_DEVICES}: the demo "
                           f"broker takes {CONNECTIONS_PER_ADDRESS} connections from one "
                           f"address)")
    demo.add_argument("--headless", action="store_true", dest="demo_headless",
                      help="print the tester's events as JSON lines instead of the UI")
    demo.add_argument("--duration", type=_positive_seconds, default=None, metavar="S",
                      help="stop after S seconds, or a number with its unit: 90s, 2m "
                           "(default: until quit, or after the alert when headless)")
    _add_report_parser(sub)
    return parser


def _add_report_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    report = sub.add_parser(
        "report", help="merge several devices' run journals ([journal] path) into one report",
        description="Merge the run journals of several devices: matches, handshake success, "
                    "match-to-token latency, failure reasons, contacts, GPS fix and accuracy. "
                    "Exit code 0: all read; 1: some input skipped; 2: nothing readable.")
    report.add_argument("journals", nargs="+", metavar="JOURNAL",
                        help="a journal file written by a device ([journal] path)")
    report.add_argument("--json", action="store_true",
                        help="one JSON object on stdout (schema: fanny_tui.report)")


def _cmd_report(journals: Sequence[str], as_json: bool) -> int:
    from .report import run_report

    return run_report(journals, as_json=as_json, prog=f"{APP_NAME} report")


def _setup_logging(level: str, *, to_file: Path | None = None) -> None:
    handler: logging.Handler
    if to_file is not None:
        to_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(to_file, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level), handlers=[handler], force=True)


class JsonLinesOut:
    """Prints events as JSON lines on stdout; notices once when the reader went away.

    Shared by ``fanny-tui --headless`` and ``fanny-tui demo --headless``. At the first
    :class:`BrokenPipeError` (``| head -n 2`` exited) stdout is pointed at ``/dev/null`` (so the
    interpreter's last flush cannot fail either), nothing more is written, and ``on_broken()``
    is called once: the caller stops its engine and exits with :data:`EXIT_BROKEN_PIPE`.

    Args:
        on_broken: called once, on the event loop, at the first broken pipe.
    """

    def __init__(self, on_broken: Callable[[], None]) -> None:
        self._on_broken = on_broken
        self.broken = False

    def __call__(self, event: Event) -> None:
        """Print ``event`` as one JSON line (an engine subscriber)."""
        if self.broken:
            return
        try:
            sys.stdout.write(json.dumps(to_json_dict(event), separators=(",", ":")) + "\n")
            sys.stdout.flush()
        except BrokenPipeError:
            self.broken = True
            silence_stdout()
            self._on_broken()




async def run_headless(engine: Engine) -> int:
    """Run the engine until SIGINT/SIGTERM/SIGHUP or a closed stdout, printing JSON events.

    Returns:
        The exit code: 0 after a signal, :data:`EXIT_BROKEN_PIPE` after a closed stdout.

    Raises:
        DataDirBusy: another process holds the data directory.
        StoreError: the token store cannot be opened.
    """
    loop = asyncio.get_running_loop()
    stopping: set[asyncio.Task[None]] = set()

    def stop() -> None:
        task = loop.create_task(engine.stop())
        stopping.add(task)
        task.add_done_callback(stopping.discard)

    out = JsonLinesOut(stop)
    engine.subscribe(out)
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop)
    try:
        await engine.run()
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
    return EXIT_BROKEN_PIPE if out.broken else EXIT_OK


def _position_source(config: Config) -> PositionSource:
    """The ``[gps]`` source, built before anything is written (data directory, log file).

    Raises:
        ConfigError: ``source = "nmea"`` with a ``gps.path`` that cannot be read or holds no
            NMEA sentence (:func:`fanny_tui.gps.make_source`).
    """
    from .gps import make_source

    return make_source(config.gps)


def _cmd_run(config: Config, data_dir: Path, headless: bool, log_level: str,
             notice: str | None = None, source: PositionSource | None = None) -> int:
    from .engine import Engine

    # Built first: a bad [broker] ca_file is a ConfigError before the log file is created.
    engine = Engine(config, data_dir, source=source)
    if headless:
        _setup_logging(log_level)
        if notice:
            print(f"{APP_NAME}: {notice}", file=sys.stderr, flush=True)
        return asyncio.run(run_headless(engine))
    try:
        _setup_logging(log_level, to_file=data_dir / "fanny-tui.log")
    except OSError as exc:
        raise UsageError(f"cannot use the data directory {data_dir}: "
                         f"{exc.strerror or exc}") from None
    return asyncio.run(run_app(_app_around(engine, notice)))


async def run_app(app: App[None]) -> int:
    """Run the app until it quits, or until SIGINT, SIGTERM or SIGHUP (the terminal closed),
    which stop it as ``q`` does, within a bounded time (:class:`~fanny_tui.stopping.StopSignals`).

    Returns:
        The exit code: the app's, or 128 + N after signal N.
    """
    with StopSignals(asyncio.get_running_loop(), lambda signum: app.exit()) as signals:
        await app.run_async()
    if signals.signum is not None:
        return 128 + signals.signum
    return int(app.return_code or 0)


def tui_app(config: Config, data_dir: Path, *, notice: str | None = None,
            source: PositionSource | None = None) -> App[None]:
    """The Textual app that ``fanny-tui`` runs, around a new engine (not running yet).

    Args:
        config: the configuration.
        data_dir: the data directory.
        notice: one line to show once, as a warning notification, when the engine has
            started (the missing config file), and to log.
        source: the position source (None: the engine builds the one ``[gps]`` asks for).
    """
    from .engine import Engine

    return _app_around(Engine(config, data_dir, source=source), notice)


def _app_around(engine: Engine, notice: str | None) -> App[None]:
    """The Textual app around ``engine`` (not running yet), with ``notice`` (see tui_app)."""
    from .ui.app import make_app

    app = make_app(engine)
    if notice:
        log.warning("%s", notice)
        _notify_when_started(engine, lambda: app.notify(
            notice, title="No config file", severity="warning", timeout=20, markup=False))
    return app


def _notify_when_started(engine: Engine, notify: Callable[[], None]) -> None:
    """Call ``notify()`` once, at the engine's ``session_started`` (the app is up by then)."""

    def on_event(event: Event) -> None:
        if isinstance(event, SessionStarted):
            unsubscribe()
            notify()

    unsubscribe = engine.subscribe(on_event)


def _utc(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def plural(count: int, word: str) -> str:
    """``1 token``, ``2 tokens`` (as fanny_tui.ui.formatting.plural, which the command line
    does not import: importing fanny_tui.ui loads Textual, about a second on a Pi)."""
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _cmd_tokens(data_dir: Path, as_json: bool, *, chosen: bool = True) -> int:
    """``fanny-tui tokens``: the token store and the exposure alerts already raised.

    A data directory that exists without a store (a fresh device) lists nothing, exit 0; one
    that does not exist is a mistake (:class:`UsageError`, exit 2) when it was ``chosen``
    (``--data-dir`` or ``[storage] data_dir``), as in ``declare-positive``; the default one of
    a device that never ran lists nothing.

    ``--json`` prints one object (times UTC, ISO 8601; seconds, metres)::

        {"tokens": [{"token": str, "expires_at": str, "pending_upload": bool,
                     "contact": {"duration_s": float, "closest_m": float | null,
                                 "median_m": float | null, "samples": int} | null,
                     "meetings": int}],
         "alerts": [{"noticed_at": str, "count": int}]}
    """
    def metres(value: float | None) -> str:
        return "?" if value is None else f"{value:.1f} m"

    if data_dir.exists() and not data_dir.is_dir():
        raise StoreError(f"no token store in {data_dir}: it is a file, not a directory "
                         f"(check --data-dir or [storage] data_dir)")
    if chosen and not data_dir.exists():   # a typo: not "no tokens"
        raise UsageError(f"no token store in {data_dir}: no such directory (check --data-dir "
                         f"or [storage] data_dir)")
    if not (data_dir / "tokens.sqlite3").exists():
        if as_json:
            print(json.dumps({"tokens": [], "alerts": []}, indent=2))
        else:
            print(f"no token store in {data_dir}")
        return EXIT_OK
    store = TokenStore.in_dir(data_dir, read_only=True)
    try:
        tokens = store.tokens()
        alerts = store.alerts()
    finally:
        store.close()
    if as_json:
        print(json.dumps({
            "tokens": [{"token": t.token, "expires_at": _utc(t.expires_at),
                        "pending_upload": t.pending,
                        "contact": None if t.contact is None else {
                            "duration_s": t.contact.duration_s,
                            "closest_m": t.contact.closest_m,
                            "median_m": t.contact.median_m,
                            "samples": t.contact.samples},
                        "meetings": t.meetings} for t in tokens],
            "alerts": [{"noticed_at": _utc(a.noticed_at), "count": a.count} for a in alerts]},
            indent=2))
        return EXIT_OK
    now = datetime.now(UTC)
    if not tokens:
        print(f"no tokens in {data_dir}")
    for t in tokens:
        left = t.expires_at - now
        mark = "  (positive upload pending)" if t.pending else ""
        print(f"{t.token}  expires {t.expires_at:%Y-%m-%d %H:%M}Z  in {left.days}d "
              f"{left.seconds // 3600}h{mark}")
        if t.contact is not None:
            c = t.contact  # e.g. "62 s within the radius, closest 1.4 m, median 2.1 m, 13 samples"
            print(f"    contact: {c.duration_s:.0f} s within the radius, closest "
                  f"{metres(c.closest_m)}, median {metres(c.median_m)}, {c.samples} samples"
                  + (f", {t.meetings} meetings" if t.meetings > 1 else ""))
    for alert in alerts:
        # Matched tokens are deleted when the alert is raised (paper 4, step 4).
        print(f"exposure alert {alert.noticed_at:%Y-%m-%d %H:%M}Z: "
              f"{plural(alert.count, 'stored token')} declared positive (deleted from the store)")
    return EXIT_OK


def _declaration_target(config: Config, name: str | None
                        ) -> tuple[str | None, str, tuple[str, ...], ssl.SSLContext | None]:
    """``--broker NAME``: (store target, name, URLs, TLS context); None for ``[broker]``.

    Raises:
        UsageError: no configured broker has that name.
        ConfigError: its ``ca_file`` is unusable.
    """
    from .link import ssl_context_for

    if name is None or name == config.broker.name:
        return None, config.broker.name, config.broker.urls, ssl_context_for(config.broker)
    for i, other in enumerate(config.positives):
        if other.name == name:
            return name, name, other.urls, ssl_context_for(other, key=f"positives[{i}]")
    names = ", ".join([config.broker.name, *(o.name for o in config.positives)])
    raise UsageError(f"--broker: no broker named {name!r} in the config (one of: {names})")


async def _declare_positive(config: Config, data_dir: Path, timeout_s: float,
                            code: str | None, broker: str | None = None) -> int:
    from .link import backoff
    from .positives import UploadOutcome, declare, upload_pending

    target, name, urls, ssl_context = _declaration_target(config, broker)
    lock = DataDirLock(data_dir)
    lock.acquire()
    try:
        store = TokenStore.in_dir(data_dir)
    except BaseException:
        lock.release()
        raise
    try:
        declare(store, code, broker=target)

        def pending() -> int:
            return store.pending_counts().get(target, 0)

        if pending() == 0:
            print("no tokens to upload: nothing declared")
            return EXIT_OK
        url = urls[0]
        which = "" if target is None else f"{name} "
        others = "" if len(urls) == 1 else f", then the next of its {len(urls)} URLs in turn"
        print(f"{APP_NAME}: uploading {plural(pending(), 'token')}: waiting for the broker "
              f"{which}at {url}{others} (up to {timeout_s:g} s)...", file=sys.stderr, flush=True)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        delays = backoff(1.0, 10.0)()
        outcomes: list[UploadOutcome] = []
        reason = str(explain("timeout", url=url))
        attempt = 0
        while pending() and loop.time() < deadline:
            url = urls[attempt % len(urls)]     # one region's brokers: fail over in turn
            attempt += 1
            try:
                await asyncio.wait_for(
                    upload_pending(store, url, ssl_context=ssl_context,
                                   on_outcome=outcomes.append, broker=target),
                    max(0.1, deadline - loop.time()))
            except StoreError:
                raise
            except Exception as exc:
                explained = explain(exc, url=url)
                reason = str(explained)
                log.info("upload failed: %s", explained.detail)
                await asyncio.sleep(min(next(delays), max(0.0, deadline - loop.time())))
        return _report_declaration(store, outcomes, reason, target)
    finally:
        store.close()
        lock.release()


def _report_declaration(store: TokenStore, outcomes: Sequence[object], reason: str,
                        target: str | None = None) -> int:
    """Print what became of a declaration to ``target`` (None: ``[broker]``); the exit code
    (0 only if all was acknowledged)."""
    from .positives import UploadOutcome

    done = [o for o in outcomes if isinstance(o, UploadOutcome)]
    deleted = sum(o.count for o in done if o.acknowledged)
    status = EXIT_OK
    if any(o.acknowledged for o in done):
        print(f"positive declared: {plural(deleted, 'token')} acknowledged by the broker and "
              f"deleted from this device")
    for outcome in done:
        if not outcome.acknowledged:
            hint = ("run again with --code CODE" if outcome.refused == "code_required"
                    else "run again with a valid code (--code CODE)")
            print(f"fanny-tui: the broker refused the declaration code ({outcome.refused}: "
                  f"{outcome.message}); {plural(outcome.count, 'token')} "
                  f"{'is' if outcome.count == 1 else 'are'} kept on this device, not "
                  f"uploaded: {hint}", file=sys.stderr)
            status = EXIT_FAILED
    kept = store.pending_counts().get(target, 0)
    if kept:
        print(f"fanny-tui: the broker did not acknowledge: {reason}; {plural(kept, 'token')} "
              f"{'is' if kept == 1 else 'are'} kept on this device and will be sent again (run "
              f"this command again or start fanny-tui)", file=sys.stderr)
        status = EXIT_FAILED
    return status


def _check_code(code: str | None) -> str | None:
    """The code of ``--code``, checked before anything is marked (UsageError on a typo)."""
    if code is None:
        return None
    from .protocol.codes import normalize_code

    try:
        normalize_code(code)
    except ValueError as exc:
        raise UsageError(f"--code: {exc}") from None
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fanny-tui``. Returns the exit code (see the module docstring)."""
    try:
        status = _main(argv)
        sys.stdout.flush()     # a closed pipe shows here, not as an error at interpreter exit
    except BrokenPipeError:    # stdout closed by its reader (| head): quiet, as Unix tools
        silence_stdout()
        return EXIT_BROKEN_PIPE
    return status


def _main(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    log_level = getattr(args, "log_level", "WARNING")
    config_file: str | None = None    # named in a config error raised after parsing
    try:
        if args.command == "demo":
            from .demo import run_demo

            _setup_logging(log_level) if args.demo_headless else logging.disable(logging.INFO)
            return run_demo(devices=args.devices, headless=args.demo_headless,
                            duration_s=args.duration)
        if args.command == "report":
            return _cmd_report(args.journals, args.json)
        config_path = getattr(args, "config", None)
        config = resolve_config(config_path)
        config_file = config_path if config_path is not None else (
            str(default_config_path()) if default_config_path().exists() else None)
        data_dir = resolve_data_dir(config, getattr(args, "data_dir", None))
        if args.command == "tokens":
            chosen = bool(getattr(args, "data_dir", None)) or config.storage.data_dir is not None
            return _cmd_tokens(data_dir, args.json, chosen=chosen)
        notice = missing_config_notice(config_path)
        if args.command == "declare-positive":
            code = _check_code(args.code)
            _setup_logging(log_level)
            if notice:
                print(f"{APP_NAME}: {notice}", file=sys.stderr, flush=True)
            _declaration_target(config, args.broker)   # a wrong name changes nothing
            if not (data_dir / "tokens.sqlite3").exists():   # a typo: nothing is created
                raise UsageError(f"no token store in {data_dir}: nothing to declare from there "
                                 f"(check --data-dir or [storage] data_dir)")
            return asyncio.run(_declare_positive(config, data_dir, args.timeout, code,
                                                 args.broker))
        if config.journal.path is not None:
            from .journal import check_path

            problem = check_path(config.journal.path)
            if problem:
                raise UsageError(problem)
        source = _position_source(config)   # a bad gps.path: nothing created
        return _cmd_run(config, data_dir, args.headless, log_level, notice, source)
    except ConfigError as exc:
        where = f"{config_file}: " if exc.source is None and config_file is not None else ""
        print(f"{APP_NAME}: config error: {where}{exc}", file=sys.stderr)
        return EXIT_USAGE
    except DataDirBusy as exc:
        print(f"{APP_NAME}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except (StoreError, UsageError) as exc:
        print(f"{APP_NAME}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
