"""Broker memory per connection beside a bare websockets server (issue 7, point 5).

Both servers run in their own process on loopback (``fanny-broker serve`` as shipped, with
the per-address cap off since every client here comes from 127.0.0.1; and a bare
``websockets`` echo server, compression off like the broker's). K clients (1,000;
``--quick``: 100) connect to each and stay open: on the broker each says ``hello`` with its
own session ID and waits for the ``welcome``; on the bare server each sends a frame of the
same size and waits for its echo. The figure is the growth of the server process's RSS per
open connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from websockets.asyncio.client import ClientConnection, connect

from broker.__main__ import create_board
from fanny_tui.protocol.messages import Hello, Welcome, decode_broker_message, encode

from .common import LOOPBACK, Budget, Figure, Scale

BARE_SERVER = """
import asyncio, sys
from websockets.asyncio.server import serve

async def echo(ws):
    async for message in ws:
        await ws.send(message)

async def main():
    async with serve(echo, "127.0.0.1", 0, compression=None, max_queue=16) as server:
        port = server.sockets[0].getsockname()[1]
        print(f"listening on ws://127.0.0.1:{port}", flush=True)
        await asyncio.Event().wait()

asyncio.run(main())
"""


def process_rss(pid: int) -> int:
    """Resident set size of process ``pid``, bytes (Linux /proc)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


@contextlib.asynccontextmanager
async def server_process(*args: str, errors: Path | None = None
                         ) -> AsyncIterator[tuple[int, str]]:
    """Run ``python ARGS`` until it prints ``listening on URL``; yield ``(pid, url)``.

    ``errors``: a file for the process's stderr (default: discarded); its last lines are in
    the RuntimeError raised when the process exits before listening.
    """
    with contextlib.ExitStack() as files:
        stderr = (files.enter_context(errors.open("ab")) if errors is not None
                  else asyncio.subprocess.DEVNULL)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, *args, stdout=asyncio.subprocess.PIPE, stderr=stderr)
    try:
        assert proc.stdout is not None
        while True:
            line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
            if not line:
                said = ("" if errors is None else
                        ": " + " | ".join(errors.read_text(errors="replace").strip()
                                          .splitlines()[-3:]))
                name = "python -c ..." if args[0] == "-c" else f"python {' '.join(args[:2])}"
                raise RuntimeError(f"server {name} exited before listening{said}")
            if line.startswith("listening on "):
                yield proc.pid, line.split()[-1]
                return
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def _open(url: str, count: int, first: str | None, budget: Budget
                ) -> list[ClientConnection]:
    """Open ``count`` connections (fewer if the budget runs out); each sends its first frame
    and waits for the answer (a ``welcome`` from the broker, the echo from the bare server)."""
    opened: list[ClientConnection] = []
    for _ in range(count):
        if budget.over:
            break
        ws = await connect(url, proxy=None, compression=None, open_timeout=20)
        opened.append(ws)
        if first is None:
            text = encode(Hello(session_id=str(uuid.uuid4()), radius_m=30.0))
            await ws.send(text)
            answer = decode_broker_message(await asyncio.wait_for(ws.recv(), 20))
            if not isinstance(answer, Welcome):
                raise RuntimeError(f"the broker answered hello with {answer!r}")
        else:
            await ws.send(first)
            await asyncio.wait_for(ws.recv(), 20)
    return opened


async def _per_connection(pid: int, url: str, count: int, first: str | None,
                          budget: Budget) -> tuple[float, int]:
    await asyncio.sleep(0.5)
    before = process_rss(pid)
    opened = await _open(url, count, first, budget)
    try:
        await asyncio.sleep(1.0)
        after = process_rss(pid)
    finally:
        await asyncio.gather(*(ws.close() for ws in opened), return_exceptions=True)
    return (after - before) / max(1, len(opened)), len(opened)


async def run(scale: Scale) -> list[Figure]:
    count = scale.pick(1_000, 100)
    budget = Budget(scale.pick(300, 20))
    hello_size = len(encode(Hello(session_id=str(uuid.uuid4()), radius_m=30.0)))
    with tempfile.TemporaryDirectory(prefix="fanny-bench-") as tmp:
        create_board(Path(tmp) / "board.sqlite3")      # as `fanny-broker create-board` does
        async with server_process(
                "-m", "broker", "serve", "--host", LOOPBACK, "--port", "0",
                "--db", str(Path(tmp) / "board.sqlite3"), "--max-connections-per-address", "0",
                "--log-level", "ERROR") as (pid, url):
            broker_kib, broker_n = await _per_connection(pid, url, count, None, budget)
        async with server_process("-c", BARE_SERVER) as (pid, url):
            bare_kib, bare_n = await _per_connection(pid, url, count, "x" * hello_size, budget)
    short = "" if min(broker_n, bare_n) == count else f"; STOPPED at its bound (of {count})"
    return [Figure("connection_kib", broker_kib / 1024, bare_kib / 1024, "KiB", broker_n,
                   f"server RSS growth per open session connection (hello answered); peer: a "
                   f"bare websockets echo server, {bare_n} connections, compression off"
                   + short, "<= 1.1x bare")]
