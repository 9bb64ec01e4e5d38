"""Fuzz the broker's handler (issue 3): arbitrary frames through a REAL server on loopback.

A real broker (declaration codes required, a few codes issued, real SQLite file) runs in a
background thread with its own event loop; Hypothesis sends each example's frames on a fresh
WebSocket connection (random bytes, random text, random JSON, mutated valid messages, frames
around the size limit) and then a barrier whose answer is unique. Checked for every example:

* every answer decodes as a broker message (typed), and every ``error`` carries a code listed in
  docs/protocol.md's codes table, never ``internal_error``;
* the server answers the barrier (no hang) and closes a connection only with 1009 after a frame
  over the size limit;
* a second, well-behaved client (a session and an anonymous connection opened before the
  fuzzing) keeps working after each example;
* at the end: the server is alive, nothing was logged at ERROR.

Budget: 200 examples per strategy in CI; ``FANNY_FUZZ=long`` for the run by hand (50 times
more, no time-out). Each test prints ``fuzz: NAME: N inputs (M frames)``:
``FANNY_FUZZ=long .venv/bin/pytest -s -p no:cacheprovider tests/broker/test_fuzz.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from broker.server import RunningBroker, start_broker
from fanny_tui.protocol.codes import code_hash, format_code
from fanny_tui.protocol.expiry import expiry_for
from fanny_tui.protocol.messages import (
    UPLOAD_SIZE_BYTES,
    Error,
    Match,
    PositiveAck,
    Positives,
    PositivesAvailable,
    Welcome,
    decode_broker_message,
)

from .kit import CLIENT_LOGGER, LAT, LON, north, settings_for, token

ROOT = Path(__file__).resolve().parents[2]
LONG = os.environ.get("FANNY_FUZZ", "").strip() == "long"
EXAMPLES = 200 * (50 if LONG else 1)

settings.register_profile(
    "fanny-broker-fuzz-long" if LONG else "fanny-broker-fuzz-ci",
    max_examples=EXAMPLES, deadline=None, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture])
FUZZ = settings.get_profile("fanny-broker-fuzz-long" if LONG else "fanny-broker-fuzz-ci")
"""The active budget, used as a decorator (never loaded globally)."""

MAX_BYTES = 65_536
"""The broker's default frame limit (a padded upload fits exactly)."""


def documented_error_codes() -> set[str]:
    """The ``error.code`` values of docs/protocol.md's codes table."""
    text = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")
    table = text.split("Codes:", 1)[1].split("\n\n", 2)[1]
    return set(re.findall(r"^\| `([a-z_]+)` \|", table, re.MULTILINE))


# --- the broker in a thread ----------------------------------------------------------------------


class ThreadedBroker:
    """A real broker on loopback, running in its own thread and event loop."""

    def __init__(self, tmp: Path) -> None:
        # No keepalive pings: their payload comes from the random module, which, used by
        # another thread while Hypothesis draws, looks like a strategy using random.
        # poll_burst: the well-behaved anonymous client polls after every example.
        self.settings = settings_for(tmp, open_declarations=False, upload_answer_delay_s=0.0,
                                     max_connections_per_address=0, ping_interval_s=None,
                                     poll_burst=100_000)
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.running: RunningBroker | None = None
        self.failure: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._run, name="fuzzed-broker", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._main())
        except BaseException as exc:  # reported by the tests
            self.failure = exc
            self.ready.set()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        async with start_broker(self.settings) as running:
            self.running = running
            self.ready.set()
            await self._stop.wait()

    def start(self) -> None:
        self.thread.start()
        assert self.ready.wait(30) and self.failure is None, self.failure

    def stop(self) -> None:
        assert self._stop is not None
        self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(30)
        assert not self.thread.is_alive(), "the broker did not stop"


@dataclass
class Fuzzed:
    broker: ThreadedBroker
    url: str
    codes: list[str]
    session: ClientConnection
    session_id: str
    anon: ClientConnection
    errors: list[logging.LogRecord]
    seen: Counter[str]
    """Answers seen, by message type or error code (printed with the input counts)."""


class _Keep(logging.Handler):
    def __init__(self, sink: list[logging.LogRecord]) -> None:
        super().__init__(logging.ERROR)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(record)


def open_client(url: str) -> contextlib.AbstractContextManager[ClientConnection]:
    """A synchronous websockets client of the broker (a context manager)."""
    return connect(url, proxy=None, compression=None, open_timeout=5, max_size=2**20,
                   ping_interval=None, logger=CLIENT_LOGGER)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    errors: list[logging.LogRecord] = []
    handler = _Keep(errors)
    logging.getLogger("broker").addHandler(handler)
    broker = ThreadedBroker(tmp_path_factory.mktemp("fuzz"))
    broker.start()
    try:
        assert broker.running is not None
        codes = [format_code(os.urandom(10)) for _ in range(3)]
        for code in codes:
            broker.running.board.add_code(code_hash(code),
                                          datetime.now(UTC) + timedelta(hours=1))
        url = broker.running.url
        with open_client(url) as session, open_client(url) as anon:
            session_id = str(uuid.uuid4())
            session.send(json.dumps({"type": "hello", "session_id": session_id,
                                     "radius_m": 50}))
            assert isinstance(decode_broker_message(session.recv(timeout=5)), Welcome)
            session.send(json.dumps({"type": "position", "latitude": LAT, "longitude": LON}))
            yield Fuzzed(broker, url, codes, session, session_id, anon, errors, Counter())
    finally:
        broker.stop()
        logging.getLogger("broker").removeHandler(handler)
    assert broker.failure is None, broker.failure


# --- one example -----------------------------------------------------------------------------


ALLOWED_MESSAGES = (Error, Welcome, Match, PositiveAck, Positives, PositivesAvailable)
DOCUMENTED = documented_error_codes()


def barrier(ws: ClientConnection, nonce: str) -> list[Any]:
    """Send a frame refused with a unique field name; return every message before its answer."""
    ws.send(json.dumps({"type": "positives_poll", f"barrier_{nonce}": 1}))
    seen = []
    while True:
        raw = ws.recv(timeout=10)            # TimeoutError: the broker hangs
        assert isinstance(raw, str), "the broker sent a binary frame"
        message = decode_broker_message(raw)  # MessageError: not a typed broker message
        if isinstance(message, Error) and message.field == f"barrier_{nonce}":
            assert message.code == "unknown_field"
            return seen
        seen.append(message)


def check_answers(answers: list[Any], seen: Counter[str] | None = None) -> None:
    for message in answers:
        if seen is not None:
            seen[message.code if isinstance(message, Error) else type(message).__name__] += 1
        assert isinstance(message, ALLOWED_MESSAGES), message
        if isinstance(message, Error):
            assert message.code in DOCUMENTED, f"undocumented error code {message.code!r}"
            assert message.code != "internal_error", message
            assert message.message


def run_example(fuzzed: Fuzzed, frames: list[str | bytes], counter: dict[str, int]) -> None:
    """Send ``frames`` on a fresh connection, check every answer, then the good clients."""
    counter["inputs"] += 1
    counter["frames"] += len(frames)
    oversized = any(len(f.encode() if isinstance(f, str) else f) > MAX_BYTES for f in frames)
    try:
        with open_client(fuzzed.url) as ws:
            for frame in frames:
                ws.send(frame)
            answers = barrier(ws, uuid.uuid4().hex)
            check_answers(answers, fuzzed.seen)
            assert not oversized, "a frame over the limit was accepted"
    except ConnectionClosed as closed:
        code = closed.rcvd.code if closed.rcvd else None
        assert oversized and code == 1009, f"closed with {code} ({closed})"
        fuzzed.seen["closed 1009"] += 1
    # The well-behaved clients keep working.
    fuzzed.session.send(json.dumps({"type": "hello", "session_id": fuzzed.session_id,
                                    "radius_m": 1}))
    while True:
        message = decode_broker_message(fuzzed.session.recv(timeout=10))
        if isinstance(message, Error) and message.code == "already_hello":
            break
        assert isinstance(message, Match | Error | PositivesAvailable), message
        if isinstance(message, Error):
            assert message.code == "rate_limited", message
    fuzzed.anon.send(json.dumps({"type": "positives_poll", "cursor": 0}))
    assert isinstance(decode_broker_message(fuzzed.anon.recv(timeout=10)), Positives)


def report(name: str, counter: dict[str, int], fuzzed: Fuzzed) -> None:
    print(f"fuzz: broker handler, {name}: {counter['inputs']} inputs "
          f"({counter['frames']} frames)")
    print("fuzz: broker answers so far: " + ", ".join(
        f"{what} {n}" for what, n in fuzzed.seen.most_common()))
    assert counter["inputs"] >= min(EXAMPLES, 50)
    assert fuzzed.broker.thread.is_alive() and fuzzed.broker.failure is None
    assert not fuzzed.errors, [r.getMessage() for r in fuzzed.errors]


# --- strategies ------------------------------------------------------------------------------


TYPES = ["hello", "position", "position_lost", "signal", "positive_upload", "positives_poll",
         "welcome", "match", "error", "positive_ack", "positives", "contact_id", "token", "ack",
         "abort", ""]

json_scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70)
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=40))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=5),
    max_leaves=25)


def dumps(value: Any) -> str:
    return json.dumps(value, allow_nan=True)   # NaN / Infinity literals: invalid JSON on purpose


def valid_messages(codes: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Valid client messages as dicts (some with the issued codes)."""
    expiry = expiry_for(datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    uuids = st.uuids(version=4).map(str)
    tokens = st.lists(st.integers(0, 2**20).map(
        lambda n: {"token": token(n), "expires_at": expiry}), max_size=8)
    code = st.none() | st.sampled_from(codes) | st.text(max_size=20)
    return st.one_of(
        st.builds(lambda s, r: {"type": "hello", "session_id": s, "radius_m": r}, uuids,
                  st.floats(0.1, 10_000)),
        st.builds(lambda m, a: {"type": "position", "latitude": north(m), "longitude": LON,
                                "accuracy_m": a}, st.floats(-200, 200),
                  st.none() | st.floats(0, 100)),
        st.just({"type": "position_lost"}),
        st.builds(lambda p, t, s: {"type": "signal", "peer_session_id": p, "sdp_type": t,
                                   "sdp": s}, uuids, st.sampled_from(["offer", "answer"]),
                  st.text(min_size=1, max_size=100)),
        st.builds(lambda u, t, c, d: {"type": "positive_upload", "upload_id": u, "tokens": t,
                                      "code": c, "decoy": d}, uuids, tokens, code, st.booleans()),
        st.builds(lambda c: {"type": "positives_poll", "cursor": c}, st.integers(0, 2**62)),
    )


@st.composite
def mutated(draw: st.DrawFn, codes: list[str]) -> str:
    """A valid message with one to three mutations, or truncated, as JSON text."""
    message: Any = dict(draw(valid_messages(codes)))
    for _ in range(draw(st.integers(1, 3))):
        keys = sorted(message) if isinstance(message, dict) else []
        action = draw(st.sampled_from(["drop", "replace", "add", "retype", "wrap", "nest"]))
        if action == "drop" and keys:
            del message[draw(st.sampled_from(keys))]
        elif action == "replace" and keys:
            message[draw(st.sampled_from(keys))] = draw(json_values)
        elif action == "add" and isinstance(message, dict):
            message[draw(st.text(max_size=12))] = draw(json_values)
        elif action == "retype" and isinstance(message, dict):
            message["type"] = draw(st.sampled_from(TYPES) | st.text(max_size=10))
        elif action == "wrap":
            message = [message]
        elif action == "nest" and isinstance(message, dict) and isinstance(
                message.get("tokens"), list) and message["tokens"]:
            message["tokens"][0] = draw(json_values)
    text = dumps(message)
    if draw(st.booleans()) and draw(st.booleans()):
        text = text[: draw(st.integers(0, len(text)))]     # cut mid-message
    return text


def around_the_limit(size: int) -> str:
    """A positives_poll padded with spaces to exactly ``size`` bytes (valid JSON)."""
    head = '{"type":"positives_poll","cursor":0'
    return head + " " * (size - len(head) - 1) + "}"


def frames_of(codes: list[str]) -> st.SearchStrategy[list[str | bytes]]:
    """What one example sends: maybe an opening message, then arbitrary frames."""
    opening = st.sampled_from([[], [dumps({"type": "hello", "session_id": str(uuid.uuid4()),
                                           "radius_m": 30})],
                               [dumps({"type": "positives_poll"})]])
    frame = st.one_of(
        st.binary(max_size=300),
        st.binary(max_size=300).map(lambda b: b.decode("latin-1")),
        st.text(max_size=300),
        json_values.map(dumps),
        st.dictionaries(st.text(max_size=10), json_values, max_size=4).flatmap(
            lambda d: st.sampled_from(TYPES).map(lambda t: dumps({"type": t, **d}))),
        mutated(codes),
        valid_messages(codes).map(dumps),
        st.integers(MAX_BYTES - 2, MAX_BYTES + 2).map(around_the_limit),
    )
    return st.builds(lambda o, f: o + f, opening, st.lists(frame, min_size=1, max_size=6))


# --- the tests -------------------------------------------------------------------------------


def fuzz(fuzzed: Fuzzed, strategy: st.SearchStrategy[list[str | bytes]], name: str) -> None:
    counter = {"inputs": 0, "frames": 0}

    @FUZZ
    @given(frames=strategy)
    def example(frames: list[str | bytes]) -> None:
        run_example(fuzzed, frames, counter)

    example()
    report(name, counter, fuzzed)


TIMEOUT = 0 if LONG else 180
"""The hand run may take long: no time-out then."""


@pytest.mark.timeout(TIMEOUT)
def test_fuzz_random_bytes_and_text(fuzzed):
    fuzz(fuzzed, st.lists(st.binary(max_size=500) | st.text(max_size=500), min_size=1,
                          max_size=6), "random bytes and text")


@pytest.mark.timeout(TIMEOUT)
def test_fuzz_random_json(fuzzed):
    typed = st.dictionaries(st.text(max_size=10), json_values, max_size=5).flatmap(
        lambda d: st.sampled_from(TYPES).map(lambda t: dumps({"type": t, **d})))
    fuzz(fuzzed, st.lists(json_values.map(dumps) | typed, min_size=1, max_size=6),
         "random JSON")


@pytest.mark.timeout(TIMEOUT)
def test_fuzz_mutated_valid_messages_and_sequences(fuzzed):
    fuzz(fuzzed, frames_of(fuzzed.codes), "mutated valid messages")


def test_the_barrier_and_checks_can_fail(fuzzed):
    """The oracle itself: an undocumented code or an untyped answer is caught."""
    with pytest.raises(AssertionError, match="undocumented"):
        check_answers([Error(code="made_up", message="x")])
    with pytest.raises(AssertionError):
        check_answers([Error(code="internal_error", message="x")])
    with pytest.raises(AssertionError):
        check_answers(["not a message"])
    assert {"code_required", "too_many_tokens", "rate_limited",
            "too_many_connections"} <= DOCUMENTED
    assert len(around_the_limit(UPLOAD_SIZE_BYTES)) == UPLOAD_SIZE_BYTES
    counter = {"inputs": 0, "frames": 0}
    run_example(fuzzed, [around_the_limit(MAX_BYTES + 1)], counter)       # 1009 expected
    with pytest.raises(AssertionError, match="closed with 1009"):
        # The same frame, claimed to be within the limit: the close is then a failure.
        _pretend_small(fuzzed, around_the_limit(MAX_BYTES + 1))


def _pretend_small(fuzzed: Fuzzed, frame: str) -> None:
    try:
        with open_client(fuzzed.url) as ws:
            ws.send(frame)
            barrier(ws, "x")
    except ConnectionClosed as closed:
        code = closed.rcvd.code if closed.rcvd else None
        raise AssertionError(f"closed with {code}") from None

