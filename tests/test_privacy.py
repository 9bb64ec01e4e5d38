"""Privacy invariants 1, 2 and 5 over a whole run: nothing identifying on disk or in logs.

A broker and two devices witness each other, one declares positive (which rotates its IDs), the
other is alerted and rotates its IDs too, and they witness each other again under the new IDs,
with every logger at DEBUG written to a file inside the run's directory and each device writing
its run journal ([journal] path) there too. Afterwards no session ID or contact ID of either
generation, nor any position (as text or as an IEEE-754 double), appears in any file the client
or the broker wrote, nor in the captured log, and no token appears in a journal; IDs are fresh at
every start and at every rotation (invariant 1); stored expiry is on the deletion hour
(invariant 5).
"""

from __future__ import annotations

import dataclasses
import logging
import struct

from broker.server import BrokerSettings, start_broker
from fanny_tui.config import Config, JournalConfig
from fanny_tui.engine import Engine
from fanny_tui.protocol.expiry import is_on_deletion_hour
from fanny_tui.protocol.tokens import is_uuid4
from fanny_tui.store import TokenStore

from .helpers import LAT, LON, device_config, device_pair, fixed_at, running_device


def _needles(values: list[str], positions: list[tuple[float, float]]) -> list[bytes]:
    out = [v.encode() for v in values]
    out += [v.replace("-", "").encode() for v in values]           # hex without hyphens
    out += [bytes.fromhex(v.replace("-", "")) for v in values]      # raw 16 bytes
    for lat, lon in positions:
        for value in (lat, lon):
            out.append(f"{value:.5f}".encode())
            out.append(struct.pack("<d", value))
            out.append(struct.pack(">d", value))
    return out


async def test_no_ids_or_positions_in_any_file_or_log(tmp_path):
    log_file = tmp_path / "all-debug.log"
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    lat_b = fixed_at(2.0).latitude                 # where device_pair(apart_m=2.0) puts b
    journals = [tmp_path / "a-journal.jsonl", tmp_path / "b-journal.jsonl"]
    try:
        (tmp_path / "broker").mkdir()
        settings = BrokerSettings(host="127.0.0.1", port=0, db_path=tmp_path / "broker" / "b.db",
                                  open_declarations=True)
        async with start_broker(settings) as broker:
            config = device_config(broker.url)
            config_a, config_b = (
                dataclasses.replace(config, journal=JournalConfig(path=journal))
                for journal in journals)
            async with device_pair(tmp_path, config_a, config_b, apart_m=2.0,
                                   accuracy_m=3.0) as (a, b):
                first = await a.wait_event("token_stored")
                token = first.token  # type: ignore[attr-defined]
                await b.wait_event("token_stored")
                secrets = [a.engine._session_id, a.engine._contact_id,
                           b.engine._session_id, b.engine._contact_id]
                await a.engine.declare_positive()              # rotates a's IDs
                await a.wait_event("positive_declared")
                await b.wait_event("exposure_alert")
                await b.engine._rotate_ids()                    # as its schedule would
                secrets += [a.engine._session_id, a.engine._contact_id,
                            b.engine._session_id, b.engine._contact_id]
                for device in (a, b):                            # met again, new IDs
                    await device.wait_for(lambda e: e.event == "token_stored"
                                          and e.token != first.token)
                store = TokenStore.in_dir(b.data_dir, read_only=True)
                store.close()
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()

    assert all(is_uuid4(s) for s in secrets) and len(set(secrets)) == 8
    assert [e.reason for e in a.of("ids_rotated")] == ["declared"]
    assert [e.reason for e in b.of("ids_rotated")] == ["schedule"]
    assert log_file.stat().st_size > 0, "the debug log captured nothing"
    needles = _needles(secrets, [(LAT, LON), (lat_b, LON)])
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name.endswith(".db") or p.name.endswith(".sqlite3") for p in files)
    assert all(journal in files and b'"kind":"token"' in journal.read_bytes()
               for journal in journals), "a journal is missing or recorded no token"
    for path in files:
        data = path.read_bytes()
        for needle in needles:
            assert needle not in data, f"{needle!r} found in {path.relative_to(tmp_path)}"
    tokens = {e.token for device in (a, b) for e in device.of("token_stored")}  # type: ignore[attr-defined]
    assert token in tokens and len(tokens) >= 2  # both generations of IDs made a token
    for journal in journals:  # tokens are in the stores, never in a journal
        data = journal.read_bytes()
        for stored in tokens:
            for needle in (stored.encode(), stored[:16].encode(), bytes.fromhex(stored)):
                assert needle not in data, f"{needle!r} found in {journal.name}"


def test_ids_are_fresh_at_every_start_and_never_in_events(tmp_path):
    from fanny_tui.events import SessionStarted, to_json_dict

    first = Engine(Config(), tmp_path)
    second = Engine(Config(), tmp_path)
    ids = {first._session_id, first._contact_id, second._session_id, second._contact_id}
    assert len(ids) == 4 and all(is_uuid4(i) for i in ids)
    assert first.session_short == first._session_id[:8]
    assert set(to_json_dict(SessionStarted())) == {"event", "at"}


async def test_stored_expiry_is_on_the_deletion_hour(tmp_path):
    settings = BrokerSettings(host="127.0.0.1", port=0, db_path=tmp_path / "b.db")
    async with start_broker(settings) as broker:
        config = device_config(broker.url)
        source_a = fixed_at(accuracy_m=3.0)
        source_b = fixed_at(accuracy_m=3.0)
        async with running_device(config, tmp_path / "a", source_a) as a, \
                running_device(config, tmp_path / "b", source_b) as b:
            await a.wait_event("token_stored")
            await b.wait_event("token_stored")
    for device in (a, b):
        store = TokenStore.in_dir(device.data_dir, read_only=True)
        tokens = store.tokens()
        store.close()
        assert tokens
        for token in tokens:
            assert is_on_deletion_hour(token.expires_at, config.protocol.deletion_hour_utc)


