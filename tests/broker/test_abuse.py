"""broker.server under abuse and bad input (issue 3): declaration codes, decoys, padding and the
minimum answer delay, size/token/rate/connection limits, ranges. Real broker on loopback port 0,
real websockets clients, real SQLite."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from datetime import timedelta

import pytest
from websockets.exceptions import ConnectionClosed

from broker.server import BrokerSettings
from fanny_tui.protocol.codes import code_hash, format_code
from fanny_tui.protocol.messages import (
    ACK_SIZE_BYTES,
    MAX_TOKENS_PER_UPLOAD,
    UPLOAD_SIZE_BYTES,
    Error,
    Match,
    PositiveAck,
    Positives,
    PositivesPoll,
    PositiveUpload,
    Signal,
    decode_broker_message,
    encode,
    encode_padded,
)
from tests.helpers import TIME_UNIT

from .kit import (
    EXPIRY,
    LAT,
    LON,
    WALL_NOW,
    Client,
    FakeMonotonic,
    FakeWall,
    eventually,
    flood_signals,
    healthz,
    new_id,
    positive,
    running,
    token,
)


def db_rows(path, sql: str, *params: object) -> list[tuple]:
    with sqlite3.connect(path) as db:
        return db.execute(sql, params).fetchall()


def new_code(broker, expires_at=WALL_NOW + timedelta(hours=1)) -> str:
    """Issue a code on the running broker's board (what ``fanny-broker issue-code`` does)."""
    code = format_code(os.urandom(10))
    broker.board.add_code(code_hash(code), expires_at)
    return code


def upload(n_tokens: int = 1, first: int = 1, **fields) -> PositiveUpload:
    return PositiveUpload(upload_id=new_id(),
                          tokens=[positive(first + i) for i in range(n_tokens)], **fields)


async def ack_text(client: Client) -> tuple[PositiveAck, str]:
    raw = await client.recv_text()
    message = decode_broker_message(raw)
    assert isinstance(message, PositiveAck), message
    return message, raw


def test_product_defaults_require_codes_and_fit_a_padded_upload(tmp_path):
    settings = BrokerSettings("127.0.0.1", 0, tmp_path / "b.sqlite3")
    assert settings.open_declarations is False
    assert settings.upload_answer_delay_s == 1.0
    assert settings.max_message_bytes >= UPLOAD_SIZE_BYTES
    good = {"host": "127.0.0.1", "port": 0, "db_path": tmp_path / "x"}
    for field, value in (("upload_answer_delay_s", -0.1), ("position_rate_per_s", 0),
                         ("position_burst", 0), ("max_connections_per_address", -1),
                         ("max_uploads_per_code", 0), ("code_grace_s", float("inf")),
                         ("open_declarations", "yes"), ("certfile", "")):
        with pytest.raises(ValueError, match=f"BrokerSettings.{field}"):
            BrokerSettings(**{**good, field: value})
    # TLS needs both files: the error names the missing one.
    with pytest.raises(ValueError, match="BrokerSettings.keyfile: TLS needs both"):
        BrokerSettings(**good, certfile="c.pem")
    with pytest.raises(ValueError, match="BrokerSettings.certfile: TLS needs both"):
        BrokerSettings(**good, keyfile="k.pem")


# --- declaration codes over the wire --------------------------------------------------------


async def test_uploads_need_a_valid_unused_code_and_refusals_store_nothing(tmp_path):
    wall = FakeWall(WALL_NOW)
    async with (
        running(tmp_path, wall=wall, open_declarations=False, max_uploads_per_code=1) as broker,
        Client.open(broker.url) as anon,
    ):
        assert (await healthz(broker.port))[1]["declarations"] == "code"
        code = new_code(broker)
        expired = new_code(broker, expires_at=WALL_NOW)
        for fields, error in (
            ({}, "code_required"),
            ({"code": "hello"}, "code_invalid"),                   # malformed
            ({"code": "0000-0000-0000-0000"}, "code_invalid"),     # well formed, unknown
            ({"code": expired}, "code_expired"),
        ):
            await anon.send(upload(2, **fields))
            refusal = await anon.expect_error(error, "code")
            assert "code" in refusal.message
        path = tmp_path / "board.sqlite3"
        assert db_rows(path, "SELECT count(*) FROM positives") == [(0,)]
        first = upload(2, code=code.lower().replace("-", " "))      # as a person may type it
        await anon.send(first)
        ack, _ = await ack_text(anon)
        assert (ack.upload_id, ack.count) == (first.upload_id, 2)
        await anon.send(upload(1, first=10, code=code))
        await anon.expect_error("code_used", "code")
        # The retry of an upload whose ack was lost: answered again, code or no code.
        for retry in (first, PositiveUpload(upload_id=first.upload_id, tokens=first.tokens)):
            await anon.send(retry)
            ack, _ = await ack_text(anon)
            assert (ack.upload_id, ack.count) == (first.upload_id, 2)
        await anon.send(PositivesPoll())
        assert [t.token for t in (await anon.expect(Positives)).tokens] == [token(1), token(2)]
    assert db_rows(path, "SELECT uploads FROM codes WHERE code_hash = ?",
                   code_hash(code)) == [(1,)]


async def test_open_declarations_accept_no_code_but_check_a_sent_one(tmp_path):
    async with (
        running(tmp_path, wall=FakeWall(WALL_NOW), open_declarations=True) as broker,
        Client.open(broker.url) as anon,
    ):
        assert (await healthz(broker.port))[1]["declarations"] == "open"
        await anon.send(upload(1))
        assert (await ack_text(anon))[0].count == 1
        await anon.send(upload(1, first=5, code="0000-0000-0000-0000"))
        await anon.expect_error("code_invalid", "code")
        code = new_code(broker)
        await anon.send(upload(1, first=6, code=code))
        assert (await ack_text(anon))[0].count == 1
        assert broker.board.code_record(code_hash(code)).uploads == 1


# --- decoys, padding and the minimum delay ----------------------------------------------------


async def test_every_answer_to_an_upload_has_the_acks_size(tmp_path):
    """Trial finding 9: a refused declaration's ``error`` was 117-143 bytes against the ack's
    256, so its size told it apart. Acks and refusals of every kind are now one size."""
    async with (
        running(tmp_path, wall=FakeWall(WALL_NOW), open_declarations=False) as broker,
        Client.open(broker.url) as anon,
    ):
        answers: dict[str, int] = {}
        await anon.send(encode_padded(upload(2, first=1, code=new_code(broker)),
                                      UPLOAD_SIZE_BYTES))
        ack, raw = await ack_text(anon)
        answers["ack"] = len(raw.encode())
        refused = [
            upload(1, first=10),                                        # code_required
            upload(1, first=11, code="0000-0000-0000-0000"),            # code_invalid
            upload(1, first=12, code=format_code(b"\x01" * 10)),          # unknown code
            PositiveUpload(upload_id=new_id(), code=new_code(broker),   # expiry_out_of_window
                           tokens=[positive(13, WALL_NOW.replace(minute=0))]),
        ]
        for message in refused:
            await anon.send(encode_padded(message, UPLOAD_SIZE_BYTES))
            raw = await anon.recv_text()
            error = decode_broker_message(raw)
            assert isinstance(error, Error), error
            assert error.padding.strip() == ""
            answers[error.code] = len(raw.encode())
        # A malformed upload (a bad token; a field name the client chose, echoed back long)
        bad = json.loads(encode(upload(1, first=20)))
        bad["tokens"][0]["token"] = "zz"
        await anon.send(json.dumps(bad))
        raw = await anon.recv_text()
        answers[decode_broker_message(raw).code] = len(raw.encode())
        bad = json.loads(encode(upload(1, first=21)))
        bad["x" * 300] = 1
        await anon.send(json.dumps(bad))
        raw = await anon.recv_text()
        answers["long " + decode_broker_message(raw).code] = len(raw.encode())
    assert set(answers) >= {"ack", "code_required", "code_invalid", "expiry_out_of_window",
                            "bad_message", "long unknown_field"}, answers
    assert set(answers.values()) == {ACK_SIZE_BYTES}, answers


async def test_decoys_are_answered_like_uploads_and_discarded(tmp_path):
    async with (
        running(tmp_path, wall=FakeWall(WALL_NOW), open_declarations=False) as broker,
        Client.open(broker.url) as anon,
    ):
        code = new_code(broker)
        sizes = set()
        for decoy in (upload(3, first=1, decoy=True),                       # no code needed
                      upload(MAX_TOKENS_PER_UPLOAD, first=100, decoy=True, code=code),
                      PositiveUpload(upload_id=new_id(), decoy=True,
                                     tokens=[positive(7), positive(7), positive(8)])):
            await anon.send(encode_padded(decoy, UPLOAD_SIZE_BYTES))
            ack, raw = await ack_text(anon)
            assert ack.upload_id == decoy.upload_id
            assert ack.count == len({t.token for t in decoy.tokens})        # distinct tokens
            sizes.add(len(raw.encode()))
        real = upload(2, first=900, code=code)
        await anon.send(encode_padded(real, UPLOAD_SIZE_BYTES))
        ack, raw = await ack_text(anon)
        sizes.add(len(raw.encode()))
        assert sizes == {ACK_SIZE_BYTES}                                    # one size for all
        # A decoy is validated like a real upload.
        await anon.send(PositiveUpload(upload_id=new_id(), decoy=True,
                                       tokens=[positive(1, WALL_NOW.replace(minute=0))]))
        await anon.expect_error("expiry_out_of_window", "tokens[0].expires_at")
        assert broker.board.code_record(code_hash(code)).uploads == 1      # the real one only
    path = tmp_path / "board.sqlite3"
    assert db_rows(path, "SELECT token FROM positives") == [(token(900),), (token(901),)]
    assert db_rows(path, "SELECT count(*) FROM uploads") == [(1,)]


async def test_every_upload_answer_waits_the_minimum_delay(tmp_path):
    delay = 0.3
    async with (
        # announce_positives: the session expects only its own answer here.
        running(tmp_path, wall=FakeWall(WALL_NOW), open_declarations=False,
                upload_answer_delay_s=delay, announce_positives=False) as broker,
        Client.open(broker.url) as anon, Client.open(broker.url) as session,
    ):
        await session.hello()
        code = new_code(broker)
        too_many = json.dumps({"type": "positive_upload", "upload_id": new_id(), "tokens": [
            {"token": token(i), "expires_at": "2026-03-14T04:00:00Z"}
            for i in range(MAX_TOKENS_PER_UPLOAD + 1)]})
        cases = [
            (anon, encode_padded(upload(3, code=code), UPLOAD_SIZE_BYTES), PositiveAck),
            (anon, encode_padded(upload(3, first=50, decoy=True), UPLOAD_SIZE_BYTES),
             PositiveAck),
            (anon, encode(upload(1, first=60)), Error),                       # code_required
            (anon, encode(upload(1, code=code)).replace(token(1), "XYZ"), Error),  # malformed
            (anon, too_many, Error),                                          # too_many_tokens
            (session, encode(upload(1, first=70, code=code)), Error),         # wrong_connection
        ]
        loop = asyncio.get_running_loop()
        took = []
        for client, frame, kind in cases:
            began = loop.time()
            await client.send(frame)
            await client.expect(kind)
            took.append(loop.time() - began)
        print("upload answer times (s):", " ".join(f"{t:.3f}" for t in took))
        assert all(t >= delay for t in took), took
        # Other messages are not delayed by the rule (no timing asserted, only that they work).
        await anon.send(PositivesPoll())
        await anon.expect(Positives)


async def test_a_padded_upload_of_65536_bytes_fits_and_one_byte_more_closes_1009(tmp_path):
    async with (
        running(tmp_path, wall=FakeWall(WALL_NOW)) as broker,
        Client.open(broker.url) as anon, Client.open(broker.url) as bystander,
    ):
        for n in (1, MAX_TOKENS_PER_UPLOAD):
            text = encode_padded(upload(n, first=1000 * n), UPLOAD_SIZE_BYTES)
            assert len(text.encode()) == UPLOAD_SIZE_BYTES == 65536
            await anon.send(text)
            assert (await ack_text(anon))[0].count == n
        over = encode_padded(upload(1, first=7), UPLOAD_SIZE_BYTES + 1)
        await anon.send(over)
        with pytest.raises(ConnectionClosed) as closed:
            await anon.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
        await bystander.send(PositivesPoll())
        page = await bystander.expect(Positives)
        assert len(page.tokens) == 1 + MAX_TOKENS_PER_UPLOAD and token(7) not in {
            t.token for t in page.tokens}


async def test_too_many_tokens_is_a_typed_refusal_and_the_connection_survives(tmp_path):
    async with (
        running(tmp_path, wall=FakeWall(WALL_NOW)) as broker,
        Client.open(broker.url) as anon,
    ):
        await anon.send(encode_padded(upload(MAX_TOKENS_PER_UPLOAD + 1), UPLOAD_SIZE_BYTES))
        error = await anon.expect_error("too_many_tokens", "tokens")
        assert "500" in error.message
        await anon.send(upload(MAX_TOKENS_PER_UPLOAD))
        assert (await ack_text(anon))[0].count == MAX_TOKENS_PER_UPLOAD


# --- rate, connections, time-out ---------------------------------------------------------------


async def test_positions_over_the_rate_are_refused_and_ignored(tmp_path):
    clock = FakeMonotonic()
    async with (
        # max_speed_mps: a's 500 m back in 1 s below is no implausible jump here.
        running(tmp_path, mono=clock, position_rate_per_s=1.0, position_burst=3,
                position_timeout_s=1e6, max_speed_mps=1000.0) as broker,
        Client.open(broker.url) as a, Client.open(broker.url) as b,
    ):
        await a.hello()
        await b.hello()
        for _ in range(3):                                   # the burst: accepted
            await a.at(500)
        await a.at(0)                                        # over the rate: ignored
        assert await a.barrier() == [Error(
            code="rate_limited", field=None,
            message="too many positions: at most 1 per second on average; this one was ignored")]
        await b.at(2)                                        # a is still 500 m away
        assert await b.barrier() == []
        for _ in range(2):                                   # b has its own bucket (3 in all)
            await b.at(2)
        assert await b.barrier() == []
        clock.advance(1.0)                                   # one token back
        await a.at(0)
        assert [type(m) for m in await a.barrier()] == [Match]
        await a.at(0)
        await a.expect_error("rate_limited", None)


async def test_connections_over_the_global_cap_are_refused_from_any_address(tmp_path):
    async with running(tmp_path, max_connections=2, max_connections_per_address=0) as broker:
        async with Client.open(broker.url) as c1, \
                Client.open(broker.url, local_addr=("127.0.0.2", 0)) as c2:
            await c1.hello()
            await c2.hello()
            async with Client.open(broker.url, local_addr=("127.0.0.3", 0)) as c3:
                error = await c3.expect_error("too_many_connections", None)
                assert "full" in error.message
                with pytest.raises(ConnectionClosed) as closed:
                    await c3.recv()
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
            await c1.at(0)                                   # the admitted ones are unharmed
            await c2.at(3)
            assert [type(m) for m in await c2.barrier()] == [Match]
        # Closed connections free their places.
        async with Client.open(broker.url) as c4, Client.open(broker.url) as c5:
            await c4.hello()
            await c5.hello()


async def test_a_client_that_reads_nothing_is_dropped_after_the_send_timeout(tmp_path):
    """The outbox is large, so the queue-full rule does not fire: the sleeper's TCP window and
    the library's write buffer fill, one send waits longer than send_timeout_s: dropped."""
    async with (
        running(tmp_path, send_timeout_s=0.5, outbox_size=100_000,
                signal_rate_per_s=10_000.0, signal_burst=100_000) as broker,
        Client.open(broker.url) as sender,
        Client.open(broker.url, max_queue=1) as sleeper,
    ):
        await sender.hello()
        await sleeper.hello()
        sleeper.ws.transport.pause_reading()                 # nothing read at the TCP level
        await sender.at(0)
        await sleeper.at(2)
        await sender.expect(Match)
        sent = await flood_signals(sender, sleeper.session_id,
                                   lambda: _connections(broker.port, 1))
        await eventually(lambda: _connections(broker.port, 1), timeout=10 * TIME_UNIT)
        print(f"the broker dropped the client that read nothing after {sent} signals")
        await sender.at(0)                                   # the sender is served on
        await sender.barrier()


async def _connections(port: int, expected: int) -> bool:
    return (await healthz(port))[1]["connections"] == expected


async def test_connections_over_the_per_address_cap_are_refused_then_closed(tmp_path):
    async with running(tmp_path, max_connections_per_address=2) as broker:
        async with Client.open(broker.url) as c1, Client.open(broker.url) as c2:
            await c1.hello()
            await c2.hello()
            async with Client.open(broker.url) as c3:
                await c3.expect_error("too_many_connections", None)
                with pytest.raises(ConnectionClosed) as closed:
                    await c3.recv()
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
            # Another loopback source address has its own count.
            async with Client.open(broker.url, local_addr=("127.0.0.2", 0)) as other:
                assert other.ws.local_address[0] == "127.0.0.2"
                await other.hello()
                await other.at(0)
                assert await other.barrier() == []
            await c1.at(0)                                   # the admitted ones are unharmed
            await c2.at(3)
            assert [type(m) for m in await c2.barrier()] == [Match]
        await eventually(lambda: _connections(broker.port, 0))
        async with Client.open(broker.url) as c4, Client.open(broker.url) as c5:
            await c4.hello()                                 # slots are given back
            await c5.hello()


async def test_garbage_does_not_extend_the_first_message_time_out(tmp_path):
    async with (
        running(tmp_path, first_message_timeout_s=0.5) as broker,
        Client.open(broker.url) as silent, Client.open(broker.url) as session,
    ):
        await session.hello()

        async def chatter() -> None:
            while True:
                await silent.send("not json")
                await asyncio.sleep(0.05)

        talking = asyncio.create_task(chatter())
        try:
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    message = await silent.recv(timeout=10)
                    assert isinstance(message, Error) and message.code == "bad_message"
        finally:
            talking.cancel()
            await asyncio.gather(talking, return_exceptions=True)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
        await asyncio.sleep(0.1)
        await session.at(0)                              # past the time-out, hello'd: open
        assert await session.barrier() == []


# --- ranges and formats through the server ------------------------------------------------------


POSITION_FRAMES = [
    ('{"type":"position","latitude":90.0001,"longitude":2}', "latitude"),
    ('{"type":"position","latitude":-90.5,"longitude":2}', "latitude"),
    ('{"type":"position","latitude":1,"longitude":180.5}', "longitude"),
    ('{"type":"position","latitude":1,"longitude":-181}', "longitude"),
    ('{"type":"position","latitude":1,"longitude":2,"accuracy_m":-1}', "accuracy_m"),
    ('{"type":"position","latitude":1,"longitude":2,"accuracy_m":100001}', "accuracy_m"),
    ('{"type":"position","latitude":1e999,"longitude":2}', "latitude"),          # inf
    ('{"type":"position","latitude":1,"longitude":-1e999}', "longitude"),        # -inf
    ('{"type":"position","latitude":1,"longitude":2,"accuracy_m":1e999}', "accuracy_m"),
    ('{"type":"position","latitude":"nan","longitude":2}', "latitude"),
    ('{"type":"position","latitude":true,"longitude":2}', "latitude"),
    ('{"type":"position","latitude":NaN,"longitude":2}', None),                  # not JSON
    ('{"type":"position","latitude":Infinity,"longitude":2}', None),
]


async def test_bad_positions_are_refused_naming_the_field_and_never_stored(tmp_path):
    async with (
        running(tmp_path) as broker,
        Client.open(broker.url) as a, Client.open(broker.url) as b,
    ):
        await a.hello()
        await b.hello()
        for raw, field in POSITION_FRAMES:
            await a.send(raw)
            await a.expect_error("bad_message", field)
        assert (await healthz(broker.port))[1]["positions"] == 0
        await a.send({"type": "position", "latitude": LAT, "longitude": LON,
                      "accuracy_m": 100000})             # the bounds themselves are fine
        await b.at(1)
        # Accepted and kept, but a 100 km accuracy cannot tell 1 m from the radius: the
        # accuracy rule (fanny_tui.protocol.proximity.within_radius) gives no match.
        assert await b.barrier() == []
        assert (await healthz(broker.port))[1]["positions"] == 2
        await a.send({"type": "position", "latitude": LAT, "longitude": LON,
                      "accuracy_m": 0})
        await b.at(1)
        assert [type(m) for m in await b.barrier()] == [Match]


TOKEN_CASES = [
    ({"token": token(1).upper()[:-1] + "A"}, "tokens[0].token"),
    ({"token": "A" * 64}, "tokens[0].token"),
    ({"token": "a" * 63}, "tokens[0].token"),
    ({"token": "a" * 65}, "tokens[0].token"),
    ({"token": "g" * 64}, "tokens[0].token"),
    ({"token": "a" * 63 + "\n"}, "tokens[0].token"),
    ({"token": "a" * 64 + "\n"}, "tokens[0].token"),
    ({"expires_at": "2026-03-14T04:30:00Z"}, "tokens[0].expires_at"),        # not on the hour
    ({"expires_at": "2026-03-14T04:00:00"}, "tokens[0].expires_at"),         # no time zone
    ({"expires_at": "soon"}, "tokens[0].expires_at"),
    ({"extra": 1}, "tokens[0].extra"),
]


async def test_bad_tokens_and_expiries_are_refused_naming_the_field(tmp_path):
    async with (
        running(tmp_path, wall=FakeWall(WALL_NOW)) as broker,
        Client.open(broker.url) as anon,
    ):
        for change, field in TOKEN_CASES:
            item = {"token": token(1), "expires_at": "2026-03-14T04:00:00Z", **change}
            await anon.send({"type": "positive_upload", "upload_id": new_id(), "tokens": [item]})
            error = await anon.expect(Error)
            assert (error.code, error.field) in {("bad_message", field),
                                                 ("unknown_field", field)}, error
        # The expiry window: in the past, or further ahead than 16 days.
        for expires_at in (WALL_NOW.replace(minute=0), EXPIRY + timedelta(days=5)):
            await anon.send(PositiveUpload(upload_id=new_id(), tokens=[positive(2, expires_at)]))
            await anon.expect_error("expiry_out_of_window", "tokens[0].expires_at")
        # An upload never carries a session ID (privacy invariant 4): an unknown field.
        await anon.send({"type": "positive_upload", "upload_id": new_id(), "tokens": [],
                         "session_id": new_id()})
        await anon.expect_error("unknown_field", "session_id")
    assert db_rows(tmp_path / "board.sqlite3", "SELECT count(*) FROM positives") == [(0,)]


async def test_signals_only_between_matched_sessions(tmp_path):
    async with (
        running(tmp_path) as broker,
        Client.open(broker.url) as a, Client.open(broker.url) as b,
        Client.open(broker.url) as far,
    ):
        for client in (a, b, far):
            await client.hello()
        await a.at(0)
        await far.at(5000)
        await b.at(2)
        await b.expect(Match)
        await a.expect(Match)
        for source, destination in ((a, far.session_id), (far, a.session_id),
                                    (a, a.session_id), (a, new_id())):
            await source.send(Signal(peer_session_id=destination, sdp_type="offer", sdp="v=0"))
            await source.expect_error("not_matched", "peer_session_id")
        assert await far.barrier() == []
        await a.send(Signal(peer_session_id=b.session_id, sdp_type="offer", sdp="v=0"))
        assert (await b.expect(Signal)).peer_session_id == a.session_id
