"""What every benchmark shares: the figure record, the run's scale, a byte-counting loopback
relay, an event-loop stall monitor and a time budget.

Everything here talks to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

LOOPBACK = "127.0.0.1"


@dataclass
class Figure:
    """One measured figure beside its floor (or peer) measured in the same run.

    Attributes:
        name: short stable key (used in the JSON).
        value: the kit's figure, in ``unit`` (None: not measured, see ``note``).
        floor: the floor or peer, in the same unit (None: the issue names none).
        unit: e.g. ``"B"``, ``"s"``, ``"ms"``, ``"us"``, ``"KiB"``.
        n: how many things the figure is over (tokens, positions, samples...).
        note: what the floor is, how the value was obtained, what bounded it.
        target: the issue's target, as text.
    """

    name: str
    value: float | None
    floor: float | None
    unit: str
    n: int
    note: str = ""
    target: str = ""

    @property
    def ratio(self) -> float | None:
        """``value / floor`` (None when either is missing or the floor is 0)."""
        if self.value is None or self.floor is None or self.floor == 0:
            return None
        return self.value / self.floor

    def as_json(self) -> dict[str, object]:
        return {"value": self.value, "floor": self.floor, "ratio": self.ratio, "n": self.n,
                "unit": self.unit, "target": self.target, "note": self.note}


@dataclass(frozen=True)
class Scale:
    """How big a run is: full (the issue's sizes) or ``--quick`` (a smoke run, < 60 s)."""

    quick: bool

    def pick(self, full: int, quick: int) -> int:
        return quick if self.quick else full


class Budget:
    """A wall-clock bound for one benchmark's loops (monotonic seconds)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds

    @property
    def left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    @property
    def over(self) -> bool:
        return time.monotonic() >= self.deadline


@dataclass
class ByteCounts:
    """Bytes relayed by :func:`byte_relay` since the last :meth:`reset`."""

    down: int = 0     # server -> client
    up: int = 0       # client -> server
    connections: int = 0
    capture: bool = False   # also keep the bytes themselves (see :func:`websocket_parts`)
    down_raw: bytearray = field(default_factory=bytearray)
    up_raw: bytearray = field(default_factory=bytearray)

    def reset(self) -> None:
        self.down = self.up = self.connections = 0
        self.down_raw.clear()
        self.up_raw.clear()


@contextlib.asynccontextmanager
async def byte_relay(target_port: int) -> AsyncIterator[tuple[int, ByteCounts]]:
    """A TCP relay on a free loopback port to ``127.0.0.1:target_port`` counting the bytes
    each way (WebSocket framing and all: what really crosses the network).

    Yields:
        ``(port, counts)``: connect to ``ws://127.0.0.1:port`` instead of the target.
    """
    counts = ByteCounts()
    tasks: set[asyncio.Task[None]] = set()

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   down: bool) -> None:
        try:
            while data := await reader.read(1 << 16):
                if down:
                    counts.down += len(data)
                else:
                    counts.up += len(data)
                if counts.capture:
                    (counts.down_raw if down else counts.up_raw).extend(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def on_client(c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        counts.connections += 1
        s_reader, s_writer = await asyncio.open_connection(LOOPBACK, target_port)
        for task in (asyncio.create_task(pump(c_reader, s_writer, False)),
                     asyncio.create_task(pump(s_reader, c_writer, True))):
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    server = await asyncio.start_server(on_client, LOOPBACK, 0)
    try:
        yield int(server.sockets[0].getsockname()[1]), counts
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


_REQUIRED_REQUEST = ("host", "upgrade", "connection", "sec-websocket-key",
                     "sec-websocket-version")
_REQUIRED_RESPONSE = ("upgrade", "connection", "sec-websocket-accept")
_OPCODES = {0x0: "continuation", 0x1: "text", 0x2: "binary", 0x8: "close", 0x9: "ping",
            0xA: "pong"}


def _frames(data: bytes) -> list[tuple[str, int]]:
    """``(opcode name, bytes on the wire)`` of each WebSocket frame in ``data`` (RFC 6455
    section 5.2: 2 bytes, 2 or 8 more for a long length, 4 for a client's mask, payload)."""
    out, i = [], 0
    while i + 2 <= len(data):
        opcode, second = data[i] & 0x0F, data[i + 1]
        length, header = second & 0x7F, 2
        if length == 126:
            length, header = int.from_bytes(data[i + 2:i + 4], "big"), 4
        elif length == 127:
            length, header = int.from_bytes(data[i + 2:i + 10], "big"), 10
        header += 4 if second & 0x80 else 0
        out.append((_OPCODES.get(opcode, f"opcode {opcode}"), header + length))
        i += header + length
    return out


@dataclass
class WebSocketParts:
    """One captured WebSocket connection cut into its parts (see :func:`websocket_parts`).

    Attributes:
        request: the HTTP upgrade request, bytes (request line, header fields, blank line).
        response: the server's HTTP response to it, bytes.
        request_fields: the request's header field names, in order.
        response_fields: the response's header field names, in order.
        up_frames / down_frames: ``(opcode name, bytes)`` of each frame, client -> server and
            server -> client.
        minimal_handshake: bytes of the smallest opening handshake RFC 6455 allows for this
            request: only the fields it requires (section 4.1: Host, Upgrade, Connection,
            Sec-WebSocket-Key, Sec-WebSocket-Version; section 4.2.2: Upgrade, Connection,
            Sec-WebSocket-Accept) with the same values, and the status line
            ``HTTP/1.1 101 `` (an empty reason phrase is allowed, RFC 9112 section 4).
    """

    request: int
    response: int
    request_fields: list[str]
    response_fields: list[str]
    up_frames: list[tuple[str, int]]
    down_frames: list[tuple[str, int]]
    minimal_handshake: int

    @property
    def total(self) -> int:
        """Every byte both ways."""
        return (self.request + self.response + sum(n for _, n in self.up_frames)
                + sum(n for _, n in self.down_frames))

    @property
    def minimal_total(self) -> int:
        """The same frames after the smallest opening handshake RFC 6455 allows."""
        return self.total - self.request - self.response + self.minimal_handshake

    def describe(self) -> str:
        """One line: each part and its bytes."""
        def frames(items: list[tuple[str, int]]) -> str:
            return " + ".join(f"{name} {n}" for name, n in items) or "none"
        return (f"upgrade request {self.request} B ({', '.join(self.request_fields)}), "
                f"101 response {self.response} B ({', '.join(self.response_fields)}), "
                f"frames up: {frames(self.up_frames)} B, down: {frames(self.down_frames)} B; "
                f"RFC 6455 minimal handshake {self.minimal_handshake} B")


def websocket_parts(up: bytes, down: bytes) -> WebSocketParts:
    """Cut the bytes of ONE WebSocket connection (as :class:`ByteCounts` captures them) into
    the opening handshake and the frames each way.

    Raises:
        ValueError: either direction does not start with a complete HTTP head.
    """
    heads = []
    for data in (up, down):
        end = data.find(b"\r\n\r\n")
        if end < 0:
            raise ValueError("no complete HTTP head in the captured bytes")
        lines = data[:end].decode("latin-1").split("\r\n")
        fields = [(name.strip(), value.strip()) for name, _, value in
                  (line.partition(":") for line in lines[1:])]
        heads.append((end + 4, lines[0], fields))
    (req_n, req_line, req_fields), (resp_n, _, resp_fields) = heads
    minimal = len(req_line) + 2 + 2 + len("HTTP/1.1 101 ") + 2 + 2
    for fields, required in ((req_fields, _REQUIRED_REQUEST), (resp_fields, _REQUIRED_RESPONSE)):
        for name, value in fields:
            if name.lower() in required:
                minimal += len(name) + 2 + len(value) + 2
    return WebSocketParts(req_n, resp_n, [n for n, _ in req_fields], [n for n, _ in resp_fields],
                          _frames(up[req_n:]), _frames(down[resp_n:]), minimal)


class LoopStall:
    """Measures how late the event loop wakes a 1 ms sleeper: the longest stall seen.

    Use as ``async with LoopStall() as stall: ...``; then ``stall.worst_s``,
    ``stall.worst_at`` (``time.perf_counter()`` when the worst stall began) and
    ``stall.samples``.
    """

    def __init__(self, tick_s: float = 0.001) -> None:
        self.tick_s = tick_s
        self.worst_s = 0.0
        self.worst_at = math.nan
        self.samples = 0
        self._task: asyncio.Task[None] | None = None

    async def _watch(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(self.tick_s)
            late = time.perf_counter() - before - self.tick_s
            self.samples += 1
            if late > self.worst_s:
                self.worst_s, self.worst_at = late, before

    async def __aenter__(self) -> LoopStall:
        self._task = asyncio.create_task(self._watch())
        await asyncio.sleep(0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, nearest rank; nan when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Timer:
    """Accumulated wall time of wrapped calls (see :func:`time_methods`)."""

    seconds: float = 0.0
    calls: int = 0
    names: dict[str, int] = field(default_factory=dict)
    _depth: threading.local = field(default_factory=threading.local, repr=False)


def time_methods(obj: object, timer: Timer, skip: frozenset[str] = frozenset(),
                 prefix: str = "") -> None:
    """Wrap every public method of ``obj`` (on the instance) so that ``timer`` accumulates
    the wall time spent in it, whatever the method (sync, or called from a thread).

    Used to time the device's check through whatever API the kit's poll uses (a page-by-page
    ``match_positives``, or a bulk check object such as ``positives_check()`` whose ``feed``
    and ``commit`` the poll calls) without naming it:

    * an object returned by a wrapped method whose class is defined in the same module as
      ``obj``'s (a helper object of the store) has its public methods wrapped too, named
      ``"method().name"``;
    * only the outermost wrapped call is timed and counted (per thread), so a method calling
      another public one of the same object is not counted twice.
    """
    module = type(obj).__module__
    for name in dir(type(obj)):
        if name.startswith("_") or name in skip:
            continue
        if isinstance(getattr(type(obj), name, None), property):
            continue
        method = getattr(obj, name)
        if not callable(method) or asyncio.iscoroutinefunction(method) or isinstance(method, type):
            continue

        def wrapped(*args: object, __method=method, __name=prefix + name, **kwargs: object
                    ) -> object:
            depth = getattr(timer._depth, "n", 0)
            timer._depth.n = depth + 1
            start = time.perf_counter()
            try:
                result = __method(*args, **kwargs)
            finally:
                timer._depth.n = depth
                if depth == 0:
                    timer.seconds += time.perf_counter() - start
                    timer.calls += 1
                    timer.names[__name] = timer.names.get(__name, 0) + 1
            if type(result).__module__ == module and hasattr(result, "__dict__"):
                time_methods(result, timer, prefix=f"{__name}().")
            return result

        try:
            setattr(obj, name, wrapped)
        except AttributeError:   # a frozen dataclass, a tuple, slots: not a helper to time
            return
