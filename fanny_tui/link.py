"""The client's connections to the broker (websockets client).

* :class:`BrokerLink` keeps the **session** connection up (paper 3, steps 2-3): it says
  ``hello`` with the session ID, sends positions and signaling, and hands every broker message to
  a callback. It reconnects with exponential backoff with jitter (:func:`backoff`) and, given
  one region's several broker URLs (``[broker] url`` as a list, issue 8), fails over to the next
  URL whenever a connection fails. :meth:`BrokerLink.rehello` starts a new session with a new
  ``hello`` (the engine's ID rotation).
* :func:`anonymous_connection` opens a short-lived **anonymous** connection that never carries
  the session ID, for positive uploads and polls (paper 4; privacy invariant 4).
* :func:`ssl_context_for` builds the TLS context of a ``wss://`` broker from ``[broker]``:
  the broker's certificate is verified (RFC 6125 host name, chain) against ``ca_file`` when it
  is set, else against the system's trusted CAs; the same context serves the session link and
  the anonymous connections.

Loopback brokers are reached directly (``proxy=None``); compression is off (small JSON frames).
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import AsyncIterator, Callable, Generator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import websockets

# process_exception: defined in websockets.asyncio.client in websockets 17.0 (our floor),
# imported into it from websockets.client later; this import works with both, and only the
# later ones' types say that it is not re-exported (the ignore)
from websockets.asyncio.client import (  # type: ignore[attr-defined]
    ClientConnection,
    connect,
    process_exception,
)

from .config import MAIN_BROKER, BrokerConfig, ConfigError, PositivesBrokerConfig
from .events import BrokerConnected, BrokerDisconnected, Event
from .protocol.errors import MessageError, RemoteProtocolError
from .protocol.messages import (
    BrokerToClient,
    ClientToBroker,
    Error,
    Hello,
    PositiveAck,
    PositiveUpload,
    Welcome,
    decode_broker_message,
    encode,
    encode_padded,
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


def ssl_context_for(config: BrokerConfig | PositivesBrokerConfig, *, key: str = "broker"
                    ) -> ssl.SSLContext | None:
    """The TLS context for the broker of ``config`` (None when no URL of it is ``wss://``).

    Args:
        config: ``[broker]`` or one ``[[positives]]`` table; with ``ca_file`` set, only
            certificates issued by that CA (PEM) are trusted, else the system's default trust
            store (:func:`ssl.create_default_context`). Host names are checked either way.
        key: the table's name in errors (``broker``, ``positives[0]``).

    Returns:
        A client :class:`ssl.SSLContext` when a URL is ``wss://`` (used for those only), None
        when every URL is ``ws://``.

    Raises:
        ConfigError: ``KEY.ca_file`` is missing, unreadable or holds no PEM certificate, or
            is set while no URL is ``wss://`` (nothing would be verified).
    """
    ca_file = config.ca_file
    if not any(url.startswith("wss:") for url in config.urls):
        if ca_file is not None:
            raise ConfigError(f"{key}.ca_file", f"no CA file unless {key}.url is wss:// "
                              "(a ws:// broker is not verified)", str(ca_file))
        return None
    if ca_file is None:
        return ssl.create_default_context()
    try:
        return ssl.create_default_context(cafile=str(ca_file))
    except ssl.SSLError as exc:
        reason = f"no PEM certificate in it: {exc.reason or exc}"
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
    raise ConfigError(f"{key}.ca_file", f"a readable PEM file of CA certificates ({reason})",
                      str(ca_file))


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
        url: ``ws://`` or ``wss://`` URL of the broker, or one region's broker URLs in the
            order to try them (``[broker] url``): see :meth:`run` for the failover.
        hello: the :class:`Hello` to send first on every (re)connection.
        on_message: called with every decoded broker message after ``welcome``.
        on_event: called with :class:`BrokerConnected` / :class:`BrokerDisconnected`.
        on_connected: called (no args) after each welcome, e.g. to resend the position.
        reconnect_min_s, reconnect_max_s: backoff bounds in seconds.
        ssl_context: for ``wss://`` (None: the system's default verification).
        name: the broker's name in events (``[broker] name``).

    Raises:
        ValueError: no URL.
    """

    def __init__(self, url: str | Sequence[str], hello: Hello, *,
                 on_message: Callable[[BrokerToClient], None],
                 on_event: Callable[[Event], None], on_connected: Callable[[], None] = lambda: None,
                 reconnect_min_s: float = 0.5, reconnect_max_s: float = 30.0,
                 ssl_context: ssl.SSLContext | None = None, name: str = MAIN_BROKER) -> None:
        self.urls: tuple[str, ...] = (url,) if isinstance(url, str) else tuple(url)
        if not self.urls:
            raise ValueError("a broker link needs at least one URL")
        self.name = name
        self._index = 0
        self._hello = hello
        self._on_message = on_message
        self._on_event = on_event
        self._on_connected = on_connected
        self._min, self._max = reconnect_min_s, reconnect_max_s
        self._ssl = ssl_context
        self._ws: ClientConnection | None = None
        self._delays: Generator[float] | None = None

    @property
    def url(self) -> str:
        """The URL connected to now, or to be tried next."""
        return self.urls[self._index]

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

    async def rehello(self, hello: Hello) -> None:
        """End the current session and start a new one that says ``hello`` (a new session ID).

        From this call on, nothing received on the old connection is handed to ``on_message``
        and nothing more is sent on it: it is closed (normal closure, 1000), the broker drops
        the old session and its position (paper 3, step 2), and :meth:`run` reconnects at once
        (to the same broker) with ``hello``. A connection still waiting for its ``welcome`` is
        closed as soon as it is welcomed. While :meth:`run` is not connected, ``hello`` is
        simply the one said on the next connection. The previous ``hello`` is no longer
        referenced by this object.

        Args:
            hello: the ``hello`` to say on every connection from now on.
        """
        self._hello = hello
        ws, self._ws = self._ws, None
        if ws is not None:
            await ws.close(1000, "new session")

    def _current(self, hello: Hello) -> bool:
        """True while ``hello`` (said on a connection) is still the one to say."""
        return self._hello is hello

    def _next_delay(self) -> float:
        """Draw the next reconnection delay (seconds) from the current backoff sequence."""
        if self._delays is None:
            self._delays = backoff(self._min, self._max)()
        return next(self._delays)

    def _fail_over(self) -> None:
        """The next attempt goes to the next URL (round robin; one URL: the same)."""
        self._index = (self._index + 1) % len(self.urls)

    def _connect_error(self, exc: Exception) -> float:
        """Report a failed connection attempt; return the delay before the next one.

        A TLS failure (unknown CA, wrong host name) is reported with its reason before any
        byte of the protocol is sent, and retried like any other failure. So is a refused
        WebSocket handshake (a reverse proxy's 403 or 429, a server that is not a broker),
        which websockets' own :func:`~websockets.asyncio.client.process_exception` would
        call fatal: the link would then be restarted every second with an ``error`` event
        instead of backing off. Any other error it calls fatal is raised.
        """
        verdict = process_exception(exc)
        if verdict is not None and not isinstance(exc, websockets.InvalidHandshake):
            if verdict is exc:
                raise exc
            raise verdict from exc
        url = self.url
        self._fail_over()
        delay = self._next_delay()
        self._on_event(BrokerDisconnected(reason=_describe(exc), retry_in_s=round(delay, 2),
                                          broker=self.name, url=url))
        return delay

    async def run(self) -> None:
        """Connect, say hello, dispatch messages; reconnect forever. Cancel to stop.

        Reconnection: after a welcomed session ends (broker restart, network loss) the next
        attempt is immediate, to the same broker; then failed attempts back off exponentially
        (``reconnect_min_s`` doubling up to ``reconnect_max_s``, +-20 % jitter). A connection
        refused at hello (or dropped before ``welcome``) also backs off, so a broker that turns
        this device away is not hammered. Every ``broker_disconnected`` event carries the delay
        actually waited before the next attempt. After :meth:`rehello` the old connection ends
        with ``broker_disconnected`` (reason ``new session``, no delay) and the new session
        connects at once.

        Failover (several URLs, issue 8): every failed attempt (connection failed, or ended
        before ``welcome``) moves to the next URL of the list, round robin, after the backoff
        delay; so a broker that failed is tried again once the others were. A welcome resets
        the backoff. Events name the broker (``name``) and the URL concerned; the session ID
        is said only to the broker that welcomes it.
        """
        while True:
            url = self.url
            try:
                ws = await _connect(url, self._ssl)
            except Exception as exc:
                await asyncio.sleep(self._connect_error(exc))
                continue
            try:
                delay = await self._session(ws, url)
            finally:
                await ws.close()
            if delay:
                await asyncio.sleep(delay)

    async def _session(self, ws: ClientConnection, url: str) -> float:
        """Say hello on ``ws`` and dispatch until it ends; return the delay before the next
        attempt (0: at once, to the same broker; else after failing over)."""
        reason = "closed by the broker"
        welcomed = False
        hello = self._hello
        try:
            await ws.send(encode(hello))
            welcome = decode_broker_message(await asyncio.wait_for(ws.recv(), 10))
            if isinstance(welcome, Error):
                raise BrokerRefused(welcome)
            if not isinstance(welcome, Welcome):
                raise MessageError(f"expected welcome, got {type(welcome).__name__}")
            welcomed = True
            self._delays = None  # a welcomed session resets the backoff
            if self._current(hello):  # else rehello() came during the hello: start over
                self._ws = ws
                self._on_event(BrokerConnected(url=url, radius_m=welcome.radius_m,
                                               broker=self.name))
                self._on_connected()
                async for raw in ws:
                    if not self._current(hello):
                        break  # rehello(): nothing of the old session reaches on_message
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
        finally:
            if self._ws is ws:
                self._ws = None
        if not self._current(hello):
            reason = "new session"
            await ws.close(1000, "new session")
        del hello  # an old session ID is not kept while the next connection is made
        delay = 0.0
        if not welcomed:
            self._fail_over()
            delay = self._next_delay()
        self._on_event(BrokerDisconnected(reason=reason, retry_in_s=round(delay, 2),
                                          broker=self.name, url=url))
        return delay


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class AnonymousChannel:
    """Request/response over an anonymous connection (no hello, no session ID)."""

    def __init__(self, ws: ClientConnection, timeout_s: float) -> None:
        self._ws = ws
        self._timeout = timeout_s

    async def request(self, message: ClientToBroker, *, size: int | None = None
                      ) -> BrokerToClient:
        """Send ``message`` and return the broker's answer.

        Args:
            message: the request.
            size: pad a :class:`PositiveUpload` to exactly this many bytes of JSON
                (:func:`~fanny_tui.protocol.messages.encode_padded`), so that every upload
                looks the same on the wire.

        Raises:
            ValueError: ``size`` given for another message, or smaller than the message.
            BrokerRefused: the broker answered with ``error``.
            MessageError: the answer did not decode.
            TimeoutError: no answer within the timeout.
            websockets.ConnectionClosed: the connection dropped.
        """
        if size is None:
            text = encode(message)
        elif isinstance(message, PositiveUpload | PositiveAck):
            text = encode_padded(message, size)
        else:
            raise ValueError(f"only positive uploads are padded, not {type(message).__name__}")
        await self._ws.send(text)
        answer = await self.receive()
        if isinstance(answer, bytes):
            raise MessageError("the broker answered in binary to a request that is not a "
                               "binary poll")
        return answer

    async def send(self, message: ClientToBroker) -> None:
        """Send ``message`` without waiting for an answer (a poll streamed in frames).

        Raises:
            websockets.ConnectionClosed: the connection dropped.
        """
        await self._ws.send(encode(message))

    async def receive(self) -> BrokerToClient | bytes:
        """The next frame from the broker: a decoded JSON message, or the bytes of a binary
        frame (``batch1``, :mod:`fanny_tui.protocol.batch`; decoded by the caller).

        Raises:
            BrokerRefused: the broker answered with ``error``.
            MessageError: a text frame did not decode.
            TimeoutError: nothing within the timeout.
            websockets.ConnectionClosed: the connection dropped.
        """
        raw = await asyncio.wait_for(self._ws.recv(), self._timeout)
        if isinstance(raw, bytes):
            return raw
        answer = decode_broker_message(raw)
        if isinstance(answer, Error):
            raise BrokerRefused(answer)
        return answer


@asynccontextmanager
async def anonymous_connection(url: str, *, timeout_s: float = 15.0,
                               ssl_context: ssl.SSLContext | None = None
                               ) -> AsyncIterator[AnonymousChannel]:
    """Open an anonymous connection to the broker (paper 4; privacy invariant 4).

    The upgrade request carries only the header fields RFC 6455 requires (no
    ``User-Agent``): every poll opens a fresh connection and pays its handshake.

    Raises:
        OSError, TimeoutError, websockets.WebSocketException: the broker cannot be reached.
    """
    async with _connect(url, ssl_context, open_timeout=timeout_s,
                        user_agent_header=None) as ws:
        yield AnonymousChannel(ws, timeout_s)
