"""Command line of the field device: ``fanny-tui``.

::

    fanny-tui [--config FILE] [--data-dir DIR] [--headless]   run the app (or the bare engine)
    fanny-tui tokens [--data-dir DIR] [--json]                 list the token store
    fanny-tui declare-positive [--code CODE] [--config FILE] [--data-dir DIR]
                                                               upload all tokens (paper 4, 5)
    fanny-tui demo [--devices N] [--headless]                  the whole kit on this machine
    fanny-tui report [--json] JOURNAL...                       merge devices' run journals

``--headless`` prints one JSON object per line on stdout per engine event (see
:mod:`fanny_tui.events`); logs go to stderr. Every user error (bad config, unusable data dir,
broker down) is one line on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import platformdirs

from .config import Config, ConfigError, load_config, parse_config
from .events import Event, to_json_dict
from .store import StoreError, TokenStore

APP_NAME = "fanny-tui"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


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


def resolve_data_dir(config: Config, override: str | None) -> Path:
    """``--data-dir`` > ``[storage] data_dir`` > platformdirs user data dir."""
    if override:
        return Path(override).expanduser()
    if config.storage.data_dir is not None:
        return config.storage.data_dir
    return platformdirs.user_data_path(APP_NAME)


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
    parser.add_argument("--headless", action="store_true",
                        help="run the engine without UI; JSON events on stdout, one per line")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    tokens = sub.add_parser("tokens", parents=[common], help="list the stored tokens")
    tokens.add_argument("--json", action="store_true", help="one JSON array on stdout")
    declare = sub.add_parser("declare-positive", parents=[common],
                             help="upload every stored token as positive (no UI)")
    declare.add_argument("--code", metavar="CODE", default=None,
                         help="the single-use declaration code from the health authority or "
                              "test site, e.g. K7QF-3M9X-TR2B-8HJD (omit only for a broker "
                              "with open declarations)")
    declare.add_argument("--timeout", type=float, default=60.0, metavar="S",
                         help="give up waiting for the broker's ack after S seconds (default 60)")
    demo = sub.add_parser("demo", help="broker + this app + simulated devices on loopback")
    demo.add_argument("--devices", type=int, default=3, help="simulated devices (default 3)")
    demo.add_argument("--headless", action="store_true", dest="demo_headless",
                      help="print the tester's events as JSON lines instead of the UI")
    demo.add_argument("--duration", type=float, default=None, metavar="S",
                      help="stop after S seconds (default: until quit, or after the alert "
                           "when headless)")
    _add_report_parser(sub)
    return parser


def _add_report_parser(sub: argparse._SubParsersAction) -> None:
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


def _print_json_event(event: Event) -> None:
    sys.stdout.write(json.dumps(to_json_dict(event), separators=(",", ":")) + "\n")
    sys.stdout.flush()


async def run_headless(engine: object) -> int:
    """Run the engine until SIGINT/SIGTERM, printing JSON events. Returns the exit code."""
    from .engine import Engine

    assert isinstance(engine, Engine)
    engine.subscribe(_print_json_event)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(engine.stop()))
    await engine.run()
    return EXIT_OK


def _cmd_run(config: Config, data_dir: Path, headless: bool, log_level: str) -> int:
    from .engine import Engine

    if headless:
        _setup_logging(log_level)
        engine = Engine(config, data_dir)
        return asyncio.run(run_headless(engine))
    try:
        _setup_logging(log_level, to_file=data_dir / "fanny-tui.log")
    except OSError as exc:
        raise UsageError(f"cannot use the data directory {data_dir}: "
                         f"{exc.strerror or exc}") from None
    from .ui.app import make_app

    app = make_app(Engine(config, data_dir))
    app.run()
    return int(app.return_code or 0)


def _cmd_tokens(data_dir: Path, as_json: bool) -> int:
    def metres(value: float | None) -> str:
        return "?" if value is None else f"{value:.1f} m"

    if not (data_dir / "tokens.sqlite3").exists():
        if as_json:
            print("[]")
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
        print(json.dumps([{"token": t.token,
                           "expires_at": t.expires_at.isoformat().replace("+00:00", "Z"),
                           "pending_upload": t.pending,
                           "contact": None if t.contact is None else {
                               "duration_s": t.contact.duration_s,
                               "closest_m": t.contact.closest_m,
                               "median_m": t.contact.median_m,
                               "samples": t.contact.samples},
                           "meetings": t.meetings} for t in tokens], indent=2))
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
        print(f"exposure alert {alert.noticed_at:%Y-%m-%d %H:%M}Z: {alert.count} stored "
              f"token(s) declared positive (deleted from the store)")
    return EXIT_OK


async def _declare_positive(config: Config, data_dir: Path, timeout_s: float,
                            code: str | None) -> int:
    from .link import backoff, ssl_context_for
    from .positives import UploadOutcome, declare, upload_pending

    ssl_context = ssl_context_for(config.broker)
    store = TokenStore.in_dir(data_dir)
    try:
        declare(store, code)
        if store.pending_count() == 0:
            print("no tokens to upload: nothing declared")
            return EXIT_OK
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        delays = backoff(1.0, 10.0)()
        outcomes: list[UploadOutcome] = []
        reason = "timeout"
        while store.pending_count() and loop.time() < deadline:
            try:
                await asyncio.wait_for(
                    upload_pending(store, config.broker.url, ssl_context=ssl_context,
                                   on_outcome=outcomes.append),
                    max(0.1, deadline - loop.time()))
            except StoreError:
                raise
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                await asyncio.sleep(min(next(delays), max(0.0, deadline - loop.time())))
        return _report_declaration(store, outcomes, reason)
    finally:
        store.close()


def _report_declaration(store: TokenStore, outcomes: Sequence[object], reason: str) -> int:
    """Print what became of a declaration; the exit code (0 only if all was acknowledged)."""
    from .positives import UploadOutcome

    done = [o for o in outcomes if isinstance(o, UploadOutcome)]
    deleted = sum(o.count for o in done if o.acknowledged)
    status = EXIT_OK
    if any(o.acknowledged for o in done):
        print(f"positive declared: {deleted} tokens acknowledged by the broker and "
              f"deleted from this device")
    for outcome in done:
        if not outcome.acknowledged:
            hint = ("run again with --code CODE" if outcome.refused == "code_required"
                    else "run again with a valid code (--code CODE)")
            print(f"fanny-tui: the broker refused the declaration code ({outcome.refused}: "
                  f"{outcome.message}); {outcome.count} tokens are kept on this device, not "
                  f"uploaded: {hint}", file=sys.stderr)
            status = EXIT_FAILED
    kept = store.pending_count()
    if kept:
        print(f"fanny-tui: the broker did not acknowledge ({reason}); {kept} tokens are kept on "
              f"this device and will be sent again (run this command again or start fanny-tui)",
              file=sys.stderr)
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
    """Entry point of ``fanny-tui``. Returns the exit code."""
    args = _parser().parse_args(argv)
    log_level = getattr(args, "log_level", "WARNING")
    try:
        if args.command == "demo":
            from .demo import run_demo

            _setup_logging(log_level) if args.demo_headless else logging.disable(logging.INFO)
            return run_demo(devices=args.devices, headless=args.demo_headless,
                            duration_s=args.duration)
        if args.command == "report":
            return _cmd_report(args.journals, args.json)
        config = resolve_config(getattr(args, "config", None))
        data_dir = resolve_data_dir(config, getattr(args, "data_dir", None))
        if args.command == "tokens":
            return _cmd_tokens(data_dir, args.json)
        if args.command == "declare-positive":
            code = _check_code(args.code)
            _setup_logging(log_level)
            return asyncio.run(_declare_positive(config, data_dir, args.timeout, code))
        return _cmd_run(config, data_dir, args.headless, log_level)
    except ConfigError as exc:
        print(f"{APP_NAME}: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (StoreError, UsageError) as exc:
        print(f"{APP_NAME}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
