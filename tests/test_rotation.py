"""Session and contact ID rotation (issue 6, point 1): a real broker, real engines on loopback.

What is checked: after a rotation the broker sees a new session ID (its ``hello`` frames) and
the old session and its position are gone (a newcomer is matched with the new session only);
two devices that meet before and after a rotation make different tokens; a rotation waits for a
running exchange and declines matches meanwhile; a positive declaration cancels the running
exchanges and rotates at once, so the declared token is never made again; the engine keeps no
reference to the old IDs. The privacy test (IDs never on disk or in DEBUG logs, across
rotations) is in tests/test_privacy.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import Any

import msgspec

from broker.server import BrokerSettings, start_broker
from fanny_tui.config import Config, parse_config
from fanny_tui.engine import ROTATION_JITTER, Engine
from fanny_tui.events import Event
from fanny_tui.protocol.messages import Match, Position
from fanny_tui.protocol.tokens import is_uuid4
from fanny_tui.store import TokenStore

from .broker.kit import Client, eventually
from .helpers import (
    LAT,
    LON,
    TIME_UNIT,
    Device,
    device_config,
    device_pair,
    fixed_at,
    running_device,
)

FIRST = "00000000-0000-4000-8000-000000000001"
"""A raw client's session ID that sorts before any device's: the raw client is the initiator,
so a device matched with it waits, as responder, for an offer that never comes."""
SECOND = "00000000-0000-4000-8000-000000000002"


class Recorder:
    """The session IDs of every ``hello`` the broker received, in order."""

    def __init__(self) -> None:
        self.hellos: list[str] = []

    def __call__(self, kind: str, raw: str) -> None:
        message = json.loads(raw)
        if message.get("type") == "hello":
            self.hellos.append(message["session_id"])


def _settings(tmp_path: Path) -> BrokerSettings:
    return BrokerSettings(host="127.0.0.1", port=0, db_path=tmp_path / "broker.sqlite3",
                          open_declarations=True, upload_answer_delay_s=0.05,
                          cooldown_s=600.0, position_timeout_s=30.0)


def _config(url: str, rotation_interval_s: float = 3600.0, **protocol: float) -> Config:
    config = device_config(url, **protocol)
    return dataclasses.replace(config, privacy=dataclasses.replace(
        config.privacy, rotation_interval_s=rotation_interval_s))


def _index(device: Device, name: str) -> int:
    return next(i for i, e in enumerate(device.events) if e.event == name)


async def _raw_peer_next_to(url: str, session_id: str) -> Any:
    """A raw session client at the devices' spot (it never sends an offer or an answer)."""
    context = Client.open(url)
    client = await context.__aenter__()
    await client.hello(session_id, radius_m=15.0)
    await client.send(Position(latitude=LAT, longitude=LON, accuracy_m=3.0))
    return context, client


async def _match(client: Client, timeout: float) -> Match:
    """The next match with a device (raw clients standing together also match each other)."""
    while True:
        message = await client.recv(timeout)
        if isinstance(message, Match) and message.peer_session_id not in (FIRST, SECOND):
            return message


def test_the_interval_has_a_bounded_random_jitter(tmp_path):
    engine = Engine(parse_config({"privacy": {"rotation_interval_s": 900.0}}), tmp_path)
    delays = [engine._rotation_delay_s() for _ in range(500)]
    assert all(900 * (1 - ROTATION_JITTER) <= d <= 900 * (1 + ROTATION_JITTER) for d in delays)
    assert 900 * (1 - ROTATION_JITTER) < min(delays) < 800 < 1000 < max(delays)


async def test_scheduled_rotation_starts_a_new_session_and_the_old_one_is_gone(tmp_path):
    recorder = Recorder()
    async with start_broker(_settings(tmp_path), recorder=recorder) as broker:
        config = _config(broker.url, rotation_interval_s=2.0 * TIME_UNIT)
        async with running_device(config, tmp_path / "d", fixed_at(accuracy_m=3.0)) as d:
            await d.wait_event("broker_connected", timeout=5 * TIME_UNIT)
            old_session, old_contact = d.engine._session_id, d.engine._contact_id
            rotated = await d.wait_event("ids_rotated", timeout=5 * TIME_UNIT)
            assert rotated.reason == "schedule"
            new_session = d.engine._session_id
            assert is_uuid4(new_session) and new_session != old_session
            assert d.engine._contact_id not in (old_contact, old_session, new_session)
            assert recorder.hellos[0] == old_session

            # ids_rotated is emitted before the new session sends its hello
            async def the_new_session_said_hello() -> bool:
                return new_session in recorder.hellos[1:]

            await eventually(the_new_session_said_hello, timeout=5 * TIME_UNIT)

            async def only_the_new_session_left() -> bool:
                return broker.counts()["sessions"] == 1 and broker.counts()["positions"] == 1

            await eventually(only_the_new_session_left, timeout=5 * TIME_UNIT)
            context, newcomer = await _raw_peer_next_to(broker.url, FIRST)
            try:
                match = await _match(newcomer, timeout=5 * TIME_UNIT)
            finally:
                await context.__aexit__(None, None, None)
            assert match.peer_session_id != old_session   # the old position is gone
            assert match.peer_session_id in recorder.hellos[1:]
    assert [e.event for e in d.events].count("broker_connected") >= 2


async def test_devices_meeting_again_after_a_rotation_make_a_different_token(tmp_path):
    async with start_broker(_settings(tmp_path)) as broker:
        config = _config(broker.url)
        async with device_pair(tmp_path, config, apart_m=2.0, accuracy_m=3.0) as (a, b):
            first = await a.wait_event("token_stored", timeout=15 * TIME_UNIT)
            assert (await b.wait_event("token_stored", timeout=15 * TIME_UNIT)).token == first.token
            await a.engine._rotate_ids()
            assert a.of("ids_rotated")[0].reason == "schedule"

            def second_token(e: Event) -> bool:
                return e.event == "token_stored" and e.token != first.token

            again_a = await a.wait_for(second_token, timeout=15 * TIME_UNIT)
            again_b = await b.wait_for(second_token, timeout=15 * TIME_UNIT)
    assert again_a.token == again_b.token != first.token
    assert again_a.new and again_b.new
    for device in (a, b):
        store = TokenStore.in_dir(device.data_dir, read_only=True)
        assert {t.token for t in store.tokens()} == {first.token, again_a.token}
        store.close()


async def test_a_due_rotation_never_cuts_a_contact_before_its_token(tmp_path):
    """min_contact_s > 0: the rotation waits for the open contact's token, then closes it."""
    min_contact_s = 2.0 * TIME_UNIT
    async with start_broker(_settings(tmp_path)) as broker:
        config = _config(broker.url, min_contact_s=min_contact_s)
        async with device_pair(tmp_path, config, apart_m=2.0, accuracy_m=3.0) as (a, b):
            await a.wait_event("channel_open", timeout=15 * TIME_UNIT)
            rotation = asyncio.create_task(a.engine._rotate_ids())
            first = await a.wait_event("token_stored", timeout=15 * TIME_UNIT)
            await asyncio.wait_for(rotation, 10 * TIME_UNIT)
            # The token came first, then the contact was closed, then the IDs rotated.
            assert _index(a, "token_stored") < _index(a, "contact_closed") < _index(
                a, "ids_rotated")
            closed = a.of("contact_closed")[0]
            # The app runs on: the contact closed because the IDs rotated, not "stopped".
            assert closed.reason == "rotated" and closed.token_stored
            assert closed.contact.duration_s >= min_contact_s - config.protocol.position_interval_s
            assert (await b.wait_event("token_stored", timeout=10 * TIME_UNIT)).token == first.token
            # The wire has no "rotated": the peer heard close "stopped", its contact closed
            # as the peer's doing.
            assert (await b.wait_event("contact_closed", timeout=10 * TIME_UNIT)).reason == (
                "peer_closed")

            def second_token(e: Event) -> bool:
                return e.event == "token_stored" and e.token != first.token

            # Still together: matched again under the new IDs, a new contact and a new token.
            again = await a.wait_for(second_token, timeout=20 * TIME_UNIT)
            assert (await b.wait_for(second_token, timeout=20 * TIME_UNIT)).token == again.token


async def test_rotation_waits_for_a_running_exchange_and_declines_matches_meanwhile(tmp_path):
    timeout_s = 4.0 * TIME_UNIT
    async with start_broker(_settings(tmp_path)) as broker:
        config = _config(broker.url, handshake_timeout_s=timeout_s)
        async with running_device(config, tmp_path / "d", fixed_at(accuracy_m=3.0)) as d:
            await d.wait_event("broker_connected", timeout=5 * TIME_UNIT)
            old_session = d.engine._session_id
            first_ctx, first = await _raw_peer_next_to(broker.url, FIRST)
            second_ctx = None
            try:
                assert (await _match(first, 5 * TIME_UNIT)).peer_session_id == old_session
                await d.wait_event("match", timeout=5 * TIME_UNIT)   # exchange #1 runs
                rotation = asyncio.create_task(d.engine._rotate_ids())
                second_ctx, second = await _raw_peer_next_to(broker.url, SECOND)
                declined = await _match(second, 5 * TIME_UNIT)
                assert declined.peer_session_id == old_session
                # Exchange #1 waits for an offer until its time-out: the rotation waits too.
                assert not d.of("handshake_failed") and not rotation.done()
                await asyncio.wait_for(rotation, timeout_s + 5 * TIME_UNIT)
                assert d.of("handshake_failed")[0].reason == "timeout"
                assert _index(d, "handshake_failed") < _index(d, "ids_rotated")
                before = d.events[:_index(d, "ids_rotated")]
                assert [e.event for e in before].count("match") == 1   # #2 was declined
                # The new session is matched with both at once (a new pair for the broker).
                for client in (first, second):
                    rematch = await _match(client, 5 * TIME_UNIT)
                    assert rematch.peer_session_id == d.engine._session_id != old_session
                await d.wait_for(lambda e: e.event == "match" and e.peer == 3,
                                 timeout=5 * TIME_UNIT)
            finally:
                await first_ctx.__aexit__(None, None, None)
                if second_ctx is not None:
                    await second_ctx.__aexit__(None, None, None)


async def test_a_declaration_cancels_running_exchanges_and_rotates_at_once(tmp_path):
    """Even while a scheduled rotation waits for the same exchange."""
    async with start_broker(_settings(tmp_path)) as broker:
        config = _config(broker.url, handshake_timeout_s=120.0)
        async with running_device(config, tmp_path / "d", fixed_at(accuracy_m=3.0)) as d:
            await d.wait_event("broker_connected", timeout=5 * TIME_UNIT)
            old_session = d.engine._session_id
            context, first = await _raw_peer_next_to(broker.url, FIRST)
            try:
                await _match(first, 5 * TIME_UNIT)
                await d.wait_event("match", timeout=5 * TIME_UNIT)
                assert d.engine._exchanges
                # A scheduled rotation is waiting for that exchange: it must not hold this up.
                scheduled = asyncio.create_task(d.engine._rotate_ids())
                count = await asyncio.wait_for(d.engine.declare_positive(), 5 * TIME_UNIT)
                assert count == 0 and not d.engine._exchanges
                assert [e.reason for e in d.of("ids_rotated")] == ["declared"]
                await asyncio.wait_for(scheduled, 5 * TIME_UNIT)   # and is not needed now
                assert [e.reason for e in d.of("ids_rotated")] == ["declared"]
                assert d.engine._session_id != old_session
                rematch = await _match(first, 5 * TIME_UNIT)
                assert rematch.peer_session_id == d.engine._session_id
            finally:
                await context.__aexit__(None, None, None)


async def test_the_declared_token_is_never_made_again(tmp_path):
    async with start_broker(_settings(tmp_path)) as broker:
        config = _config(broker.url, poll_interval_s=0.5)
        async with device_pair(tmp_path, config, apart_m=2.0, accuracy_m=3.0) as (a, b):
            declared = (await a.wait_event("token_stored", timeout=15 * TIME_UNIT)).token
            await b.wait_event("token_stored", timeout=15 * TIME_UNIT)
            assert await a.engine.declare_positive() == 1
            assert [e.reason for e in a.of("ids_rotated")] == ["declared"]
            await a.wait_event("positive_declared", timeout=10 * TIME_UNIT)
            await b.wait_event("exposure_alert", timeout=10 * TIME_UNIT)
            # Still side by side: they are matched again at once, under the new IDs.
            again = await a.wait_for(
                lambda e: e.event == "token_stored" and e.token != declared,
                timeout=15 * TIME_UNIT)
            await b.wait_for(lambda e: e.event == "token_stored" and e.token == again.token,
                             timeout=15 * TIME_UNIT)
    for device in (a, b):
        stored = [e.token for e in device.of("token_stored")]
        assert stored.count(declared) == 1, stored   # the first witness only
        store = TokenStore.in_dir(device.data_dir, read_only=True)
        assert declared not in {t.token for t in store.tokens()}
        store.close()


def _strings_held_by(root: object) -> set[str]:
    """Every string reachable from ``root`` through the kit's own objects (their attributes),
    msgspec messages and containers; other libraries' objects are not entered."""
    seen: set[int] = set()
    found: set[str] = set()
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, str):
            found.add(obj)
        elif isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, list | tuple | set | frozenset):
            stack.extend(obj)
        elif isinstance(obj, msgspec.Struct):
            stack.extend(getattr(obj, f) for f in obj.__struct_fields__)
        elif type(obj).__module__.startswith("fanny_tui") and hasattr(obj, "__dict__"):
            stack.extend(vars(obj).values())
    return found


async def test_the_engine_keeps_no_reference_to_the_old_ids(tmp_path):
    async with start_broker(_settings(tmp_path)) as broker:
        device = running_device(_config(broker.url), tmp_path / "d", fixed_at(accuracy_m=3.0))
        async with device as d:
            await d.wait_event("broker_connected", timeout=5 * TIME_UNIT)
            old = {d.engine._session_id, d.engine._contact_id}
            assert old <= _strings_held_by(d.engine)   # the walk does see the IDs
            await d.engine._rotate_ids()
            await d.wait_for(lambda e: e.event == "broker_connected"
                             and len(d.of("broker_connected")) == 2, timeout=5 * TIME_UNIT)
            held = _strings_held_by(d.engine)
            assert {d.engine._session_id, d.engine._contact_id} <= held
            assert not old & held
