"""The client's connections to the broker (websockets client).

* :class:`BrokerLink` keeps the **session** connection up (paper 3, steps 2-3): it says
  ``hello`` with the session ID, sends positions and signaling, and hands every broker message to
  a callback. It reconnects with websockets' own reconnecting iterator
  (``async for ws in connect(...)``) and exponential backoff with jitter.
* :func:`anonymous_connection` opens a short-lived **anonymous** connection that never carries
  the session ID, for positive uploads and polls (paper 4; privacy invariant 4).

Loopback brokers are reached directly (``proxy=None``); compression is off (small JSON frames).
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import AsyncIterator, Callable, Generator
from contextlib import asynccontextmanager
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection, connect, process_exception

from .events import BrokerConnected, BrokerDisconnected, Event
from .protocol.errors import MessageError, RemoteProtocolError
from .protocol.messages import (
    BrokerToClient,
    ClientToBroker,
    Error,
    Hello,
    Welcome,
    decode_broker_message,
    encode,
)

log = logging.getLogger(__name__)

MAX_FRAME_BYTES = 4 * 1024 * 1024
"""Largest frame accepted from the broker (a page of positive tokens is well below)."""

USER_AGENT = "fanny-tui"


class BrokerRefused(RemoteProtocolError):
    """The broker answered a request with an ``error`` message."""

    def __init__(self, error: Error) -> None:
        where = f" (field {error.field})" if error.field else ""
        super().__init__(f"broker refused: {error.code}: {error.message}{where}", code=error.code)
        self.error = error


def backoff(min_s: float, max_s: float) -> Callable[[], Generator[float]]:
    """Exponential backoff from ``min_s`` to ``max_s`` seconds, +-20 % jitter, forever."""

    def delays() -> Generator[float]:
        delay = min_s
        while True:
            yield delay * random.uniform(0.8, 1.2)
            delay = min(max_s, delay * 2)

    return delays


def _connect(url: str, ssl_context: ssl.SSLContext | None, **kwargs: Any) -> connect:
    options: dict[str, Any] = {"proxy": None, "compression": None, "max_size": MAX_FRAME_BYTES,
                               "user_agent_header": USER_AGENT, "open_timeout": 10}
    if url.startswith("wss:"):
        options["ssl"] = ssl_context
    options.update(kwargs)
    return connect(url, **options)


class BrokerLink:
    """The session connection to the broker, kept up until :meth:`run` is cancelled.

    Args:
        url: ``ws://`` or ``wss://`` URL of the broker.
        hello: the :class:`Hello` to send first on every (re)connection.
        on_message: called with every decoded broker message after ``welcome``.
        on_event: called with :class:`BrokerConnected` / :class:`BrokerDisconnected`.
        on_connected: called (no args) after each welcome, e.g. to resend the position.
        reconnect_min_s, reconnect_max_s: backoff bounds in seconds.
        ssl_context: for ``wss://`` (None: the system's default verification).
    """

    def __init__(self, url: str, hello: Hello, *, on_message: Callable[[BrokerToClient], None],
                 on_event: Callable[[Event], None], on_connected: Callable[[], None] = lambda: None,
                 reconnect_min_s: float = 0.5, reconnect_max_s: float = 30.0,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.url = url
        self._hello = hello
        self._on_message = on_message
        self._on_event = on_event
        self._on_connected = on_connected
        self._min, self._max = reconnect_min_s, reconnect_max_s
        self._ssl = ssl_context
        self._ws: ClientConnection | None = None

    @property
    def connected(self) -> bool:
        """True while a welcomed session connection is up."""
        return self._ws is not None

    async def send(self, message: ClientToBroker) -> bool:
        """Send one message on the session connection.

        Returns:
            False when not connected or the connection dropped while sending (not raised: the
            caller decides whether to retry; positions are simply sent again later).
        """
        ws = self._ws
        if ws is None:
            return False
        try:
            await ws.send(encode(message))
        except websockets.ConnectionClosed:
            return False
        return True

    def _on_connect_error(self, exc: Exception) -> Exception | None:
        """Report a failed connection attempt, then let websockets decide whether to retry."""
        verdict = process_exception(exc)
        if verdict is None:
            self._on_event(BrokerDisconnected(reason=_describe(exc), retry_in_s=self._min))
        return verdict

    async def run(self) -> None:
        """Connect, say hello, dispatch messages; reconnect forever. Cancel to stop."""
        async for ws in _connect(self.url, self._ssl, process_exception=self._on_connect_error,
                                 reconnect_delays=backoff(self._min, self._max)):
            reason = "closed by the broker"
            try:
                await ws.send(encode(self._hello))
                welcome = decode_broker_message(await asyncio.wait_for(ws.recv(), 10))
                if isinstance(welcome, Error):
                    raise BrokerRefused(welcome)
                if not isinstance(welcome, Welcome):
                    raise MessageError(f"expected welcome, got {type(welcome).__name__}")
                self._ws = ws
                self._on_event(BrokerConnected(url=self.url, radius_m=welcome.radius_m))
                self._on_connected()
                async for raw in ws:
                    try:
                        message = decode_broker_message(raw)
                    except MessageError as exc:
                        log.warning("ignored a bad broker message: %s (field %s)",
                                    exc, exc.field)
                        continue
                    self._on_message(message)
            except websockets.ConnectionClosed as exc:
                reason = f"connection closed ({exc.rcvd.code if exc.rcvd else 'no close frame'})"
            except (RemoteProtocolError, TimeoutError) as exc:
                reason = f"bad answer to hello: {exc}" if str(exc) else "no answer to hello"
                await ws.close()
            finally:
                self._ws = None
            self._on_event(BrokerDisconnected(reason=reason, retry_in_s=self._min))


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class AnonymousChannel:
    """Request/response over an anonymous connection (no hello, no session ID)."""

    def __init__(self, ws: ClientConnection, timeout_s: float) -> None:
        self._ws = ws
        self._timeout = timeout_s

    async def request(self, message: ClientToBroker) -> BrokerToClient:
        """Send ``message`` and return the broker's answer.

        Raises:
            BrokerRefused: the broker answered with ``error``.
            MessageError: the answer did not decode.
            TimeoutError: no answer within the timeout.
            websockets.ConnectionClosed: the connection dropped.
        """
        await self._ws.send(encode(message))
        answer = decode_broker_message(await asyncio.wait_for(self._ws.recv(), self._timeout))
        if isinstance(answer, Error):
            raise BrokerRefused(answer)
        return answer


@asynccontextmanager
async def anonymous_connection(url: str, *, timeout_s: float = 15.0,
                               ssl_context: ssl.SSLContext | None = None
                               ) -> AsyncIterator[AnonymousChannel]:
    """Open an anonymous connection to the broker (paper 4; privacy invariant 4).

    Raises:
        OSError, TimeoutError, websockets.WebSocketException: the broker cannot be reached.
    """
    async with _connect(url, ssl_context, open_timeout=timeout_s) as ws:
        yield AnonymousChannel(ws, timeout_s)
