"""First contact after start vs a later one vs bare aiortc peers (issue 7, point 4).

Runs in a fresh Python process (``python -m benchmarks.first_contact --child``), since
``import aiortc`` is paid once per process. In it: a broker on loopback and two headless
engines (``tests.helpers.device_config``: ICE host candidates on 127.0.0.1 only) whose
position source gets its first fix 2 s after the engine started (a receiver's time to fix),
so that the first match comes 2 s or more after start. Figures:

* ``first_contact_ms``: broker match -> token stored on both devices, for that first match
  (the engines' own ``TokenStored.match_to_token_s``, the larger of the two), beside a later
  contact in the same process (the peer).
* ``later_contact_ms``: the later contacts (the second device stopped, fresh engines meet the
  first device one after the other), beside the floor: two bare aiortc peers in one process,
  offer and answer relayed by a bare websockets relay, data channel open, a 32-byte token sent
  and acknowledged.
* ``startup_ms``: engine start -> ``broker_connected`` of the first device in the fresh process
  (while aiortc is imported in the background), beside the same for the later devices (warm
  process, nothing left to import): the preload must not slow start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from .common import LOOPBACK, Figure, Scale

FIX_AFTER_S = 2.0


class LateFix:
    """A fixed position whose first fix comes ``delay_s`` after the stream starts."""

    def __init__(self, latitude: float, longitude: float, delay_s: float) -> None:
        from fanny_tui.gps import FixedSource
        self._fixed = FixedSource(latitude, longitude, 4.0, interval_s=0.3)
        self._delay_s = delay_s

    async def stream(self) -> AsyncIterator[object]:
        await asyncio.sleep(self._delay_s)
        async for item in self._fixed.stream():
            yield item


def _token_s(device: object) -> float | None:
    stored = [e for e in device.events if e.event == "token_stored"]   # type: ignore[attr-defined]
    values = [e.match_to_token_s for e in stored if e.match_to_token_s is not None]
    return values[0] if values else None


async def _contact(a: object, b: object, timeout: float) -> float:
    """Wait until both devices stored a token; the larger of their match -> token times."""
    for device in (a, b):
        await device.wait_event("token_stored", timeout=timeout)   # type: ignore[attr-defined]
    times = [_token_s(a), _token_s(b)]
    if None in times:
        raise RuntimeError("a token_stored event without match_to_token_s")
    return max(t for t in times if t is not None)


async def _kit(later: int) -> dict[str, object]:
    from broker.server import BrokerSettings, start_broker
    from tests.helpers import LAT, LON, METRE_LAT, device_config, running_device

    imported_early = "aiortc" in sys.modules
    startups: list[float] = []

    def connected_after(start: float) -> Callable[[object], None]:
        """A subscriber recording start -> the first ``broker_connected``, seconds."""
        seen: list[bool] = []

        def on_event(event: object) -> None:
            if not seen and getattr(event, "event", None) == "broker_connected":
                seen.append(True)
                startups.append(time.monotonic() - start)
        return on_event

    with tempfile.TemporaryDirectory(prefix="fanny-bench-") as tmp:
        settings = BrokerSettings(host=LOOPBACK, port=0, db_path=Path(tmp) / "board.sqlite3")
        async with start_broker(settings) as broker:
            config = device_config(broker.url)
            started = time.monotonic()
            async with running_device(config, Path(tmp) / "a",
                                      LateFix(LAT, LON, FIX_AFTER_S),
                                      subscriber=connected_after(started)) as a:
                async with running_device(config, Path(tmp) / "b",
                                          LateFix(LAT + METRE_LAT, LON, FIX_AFTER_S)) as b:
                    first = await _contact(a, b, 30)
                    imported_at_match = "aiortc" in sys.modules
                    after_start = time.monotonic() - started
                # b has stopped: each later device meets a alone (one exchange at a time)
                later_s = []
                for i in range(later):
                    a.events.clear()
                    async with running_device(config, Path(tmp) / f"c{i}",
                                              LateFix(LAT - METRE_LAT, LON, 0.0),
                                              subscriber=connected_after(time.monotonic())
                                              ) as c:
                        later_s.append(await _contact(a, c, 30))
    return {"first_s": first, "later_s": later_s, "token_after_start_s": after_start,
            "startup_s": startups[0] if startups else None, "later_startup_s": startups[1:],
            "aiortc_imported_at_start": imported_early, "aiortc_imported": imported_at_match}


@contextlib.asynccontextmanager
async def _relay() -> AsyncIterator[str]:
    """A bare signaling relay: every text frame goes to the other connected client."""
    from websockets.asyncio.server import serve
    clients: set[object] = set()

    async def relay(ws: object) -> None:
        clients.add(ws)
        try:
            async for message in ws:   # type: ignore[attr-defined]
                for other in list(clients):
                    if other is not ws:
                        await other.send(message)   # type: ignore[attr-defined]
        finally:
            clients.discard(ws)

    async with serve(relay, LOOPBACK, 0, compression=None) as server:
        yield f"ws://{LOOPBACK}:{server.sockets[0].getsockname()[1]}"


async def _bare_once(url: str) -> float:
    """Match -> token held by both bare peers, seconds."""
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
    from websockets.asyncio.client import connect

    from fanny_tui.peer import install_host_address_filter, restrict_host_addresses

    install_host_address_filter()
    token = b"\x42" * 32
    async with (connect(url, proxy=None, compression=None) as wa,
                connect(url, proxy=None, compression=None) as wb):
        await asyncio.sleep(0.05)   # both registered with the relay
        with restrict_host_addresses([LOOPBACK]):
            pa = RTCPeerConnection(RTCConfiguration(iceServers=[]))
            pb = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        got_token = asyncio.get_running_loop().create_future()
        got_ack = asyncio.get_running_loop().create_future()

        @pb.on("datachannel")
        def on_channel(channel: object) -> None:
            @channel.on("message")   # type: ignore[attr-defined]
            def on_message(message: bytes) -> None:
                got_token.set_result(message)
                channel.send(b"ack")   # type: ignore[attr-defined]

        start = time.perf_counter()
        try:
            with restrict_host_addresses([LOOPBACK]):
                channel = pa.createDataChannel("fanny")

                @channel.on("open")
                def on_open() -> None:
                    channel.send(token)

                @channel.on("message")
                def on_ack(message: bytes) -> None:
                    got_ack.set_result(message)

                await pa.setLocalDescription(await pa.createOffer())
                await wa.send(json.dumps({"type": "offer", "sdp": pa.localDescription.sdp}))
                offer = json.loads(await asyncio.wait_for(wb.recv(), 10))
                await pb.setRemoteDescription(RTCSessionDescription(**offer))
                await pb.setLocalDescription(await pb.createAnswer())
                await wb.send(json.dumps({"type": "answer", "sdp": pb.localDescription.sdp}))
                answer = json.loads(await asyncio.wait_for(wa.recv(), 10))
                await pa.setRemoteDescription(RTCSessionDescription(**answer))
                await asyncio.wait_for(asyncio.gather(got_token, got_ack), 10)
            return time.perf_counter() - start
        finally:
            await pa.close()
            await pb.close()


async def _bare(samples: int) -> list[float]:
    async with _relay() as url:
        await _bare_once(url)   # warm-up: the kit's later contacts are warm too
        return [await _bare_once(url) for _ in range(samples)]


async def _child(later: int, bare: int) -> dict[str, object]:
    result = await _kit(later)
    result["bare_s"] = await _bare(bare)
    return result


async def _child_run(later: int, bare: int, bound: float) -> dict[str, object]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.first_contact", "--child", str(later), str(bare),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), bound)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise RuntimeError("the first-contact run did not finish within its bound") from None
    if proc.returncode != 0:
        raise RuntimeError(f"the first-contact run failed:\n{err.decode()[-2000:]}")
    return json.loads(out.decode().strip().splitlines()[-1])  # type: ignore[no-any-return]


async def run(scale: Scale) -> list[Figure]:
    later, bare, runs = scale.pick(5, 2), scale.pick(10, 3), scale.pick(3, 1)
    results = [await _child_run(later, bare, scale.pick(120, 45)) for _ in range(runs)]
    firsts = [float(r["first_s"]) for r in results]
    later_s = [t for r in results for t in r["later_s"]]   # type: ignore[attr-defined]
    bare_s = [t for r in results for t in r["bare_s"]]   # type: ignore[attr-defined]
    first_ms = 1000 * statistics.median(firsts)
    later_ms = 1000 * statistics.median(later_s)
    bare_ms = 1000 * statistics.median(bare_s)
    startups = [float(r["startup_s"]) for r in results if r["startup_s"] is not None]
    later_startups = [t for r in results for t in r["later_startup_s"]]  # type: ignore[attr-defined]
    startup_ms = 1000 * statistics.median(startups) if startups else None
    later_startup_ms = 1000 * statistics.median(later_startups) if later_startups else None
    imported = ("aiortc already imported when the engines started"
                if any(r["aiortc_imported_at_start"] for r in results)
                else "aiortc not imported at start")
    after = max(float(r["token_after_start_s"]) for r in results)   # type: ignore[arg-type]
    return [
        Figure("first_contact_ms", first_ms, later_ms, "ms", runs,
               f"median over {runs} fresh processes of the first match, {FIX_AFTER_S:g} s after "
               f"start (first fix then) -> token on both devices (all by {after:.2f} s after "
               f"start; {imported}); firsts: "
               + ", ".join(f"{1000 * f:.0f}" for f in firsts) + " ms; peer: median later contact",
               "<= 1.2x a later one"),
        Figure("first_vs_bare_ms", first_ms, bare_ms, "ms", runs,
               "the same first contacts; floor: median of bare aiortc peers (offer/answer over "
               "a bare websockets relay, channel open, 32 B token acknowledged)",
               "<= 1.5x the floor"),
        Figure("startup_ms", startup_ms, later_startup_ms, "ms", len(startups),
               "median over the fresh processes of the first device's start -> "
               "broker_connected (aiortc imported in the background meanwhile): "
               + ", ".join(f"{1000 * s:.0f}" for s in startups) + " ms; peer: median of the "
               f"{len(later_startups)} later devices' start -> broker_connected (warm process)",
               "no slower start-up (the issue: 0.19 s before the preload)"),
        Figure("later_contact_ms", later_ms, bare_ms, "ms", len(later_s),
               f"median of later contacts (a fresh engine meets the first device, warm "
               f"process); floor: median of {len(bare_s)} bare aiortc exchanges", ""),
    ]


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        outcome = asyncio.run(_child(int(sys.argv[2]), int(sys.argv[3])))
        print(json.dumps(outcome))
    else:
        sys.exit("usage: python -m benchmarks.first_contact --child LATER BARE "
                 "(run it through benchmarks/run first_contact)")
