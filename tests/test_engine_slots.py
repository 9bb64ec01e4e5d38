"""The engine's handshake slots (issue 7, point 6): the wait has a deadline and an order."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from fanny_tui.engine import _Exchange, _HandshakeSlots
from tests.broker.kit import running
from tests.helpers import TIME_UNIT, device_config, fixed_at, running_device


def exchange(ordinal: int, deadline_in_s: float, offer: bool = False) -> _Exchange:
    inbox: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    if offer:
        inbox.put_nowait(("offer", "v=0"))
    return _Exchange(ordinal, "responder", SimpleNamespace(inbox=inbox),  # type: ignore[arg-type]
                     deadline=time.monotonic() + deadline_in_s)


async def test_a_wait_past_its_deadline_gives_up_and_takes_no_slot():
    slots = _HandshakeSlots(1)
    assert await slots.acquire(exchange(1, 60.0))
    started = time.monotonic()
    assert not await slots.acquire(exchange(2, 0.2 * TIME_UNIT))
    assert time.monotonic() - started >= 0.2 * TIME_UNIT
    assert (slots.free, slots.waiting) == (0, 0)
    slots.release()
    assert slots.free == 1


async def test_a_freed_slot_goes_first_to_a_peer_that_signalled_then_to_the_earliest_deadline():
    slots = _HandshakeSlots(1)
    assert await slots.acquire(exchange(0, 60.0))
    order: list[int] = []

    async def wait(item: _Exchange) -> None:
        assert await slots.acquire(item)
        order.append(item.ordinal)

    items = [exchange(1, 30.0), exchange(2, 50.0, offer=True), exchange(3, 40.0)]
    tasks = [asyncio.create_task(wait(item)) for item in items]
    while slots.waiting < 3:
        await asyncio.sleep(0)
    for expected in (2, 1, 3):
        slots.release()
        while len(order) < [2, 1, 3].index(expected) + 1:
            await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    assert order == [2, 1, 3]
    slots.release()
    assert slots.free == 1


async def test_a_waiter_cancelled_after_the_hand_over_gives_the_slot_back():
    slots = _HandshakeSlots(1)
    assert await slots.acquire(exchange(0, 60.0))
    waiter = asyncio.create_task(slots.acquire(exchange(1, 60.0)))
    while slots.waiting < 1:
        await asyncio.sleep(0)
    slots.release()           # handed over to the waiter...
    waiter.cancel()           # ...which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert (slots.free, slots.waiting) == (1, 0)


async def test_an_exchange_without_a_slot_in_time_fails_no_slot_and_does_not_start(tmp_path):
    timeout_s = 2.0 * TIME_UNIT
    async with running(tmp_path) as broker:
        config = device_config(broker.url, handshake_timeout_s=timeout_s)
        async with running_device(config, tmp_path / "a", fixed_at()) as a:
            a.engine._handshake_slots = _HandshakeSlots(0)       # every slot busy elsewhere
            async with running_device(config, tmp_path / "b", fixed_at(3.0)) as b:
                failed = await a.wait_event("handshake_failed", timeout=4 * timeout_s)
                assert failed.reason == "no_slot"
                assert not a.of("channel_open")
                # The peer gave up at the same deadline (it never got an answer).
                other = await b.wait_event("handshake_failed", timeout=4 * timeout_s)
                assert other.reason != "no_slot"
                assert not a.of("token_stored") and not b.of("token_stored")
