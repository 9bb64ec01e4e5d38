"""The aiortc adapter that runs one witness exchange over a WebRTC data channel (paper 3, step 5).

:func:`run_witness` joins three things:

* the broker, through a :class:`Signaling` object that carries exactly one SDP offer and one SDP
  answer (aiortc gathers every ICE candidate inside ``setLocalDescription()``: no trickle ICE);
* an ``RTCPeerConnection`` with one data channel labelled :data:`CHANNEL_LABEL`, opened by the
  initiator (RFC 8831, DCEP RFC 8832);
* the sans-I/O state machine :class:`~fanny_tui.protocol.handshake.WitnessHandshake`, fed with
  what happens on the channel and drained of the frames to send and the token to store.

``aiortc`` (which imports PyAV, ~55 MiB) is imported only when an exchange starts: importing this
module costs nothing.

Restricting the ICE host candidates (``webrtc.host_addresses``)
----------------------------------------------------------------
aioice has no option for it: ``aioice.ice.get_host_addresses()`` enumerates every interface
(always leaving out 127.0.0.1 and ``::1``) and is looked up as a module global each time
candidates are gathered. :func:`install_host_address_filter` replaces it, once per process, with
a wrapper that reads the context variable behind :func:`restrict_host_addresses`:

* variable unset (``None``): the original function, untouched behaviour;
* variable set: exactly the configured addresses (IPv4 ones when aioice asks for IPv4, IPv6 ones
  when it asks for IPv6), loopback included.

:func:`run_witness` sets the variable only around its own ``setLocalDescription()`` call, where
aiortc gathers. asyncio tasks copy the context when they are created, so the restriction is
scoped to that exchange: another exchange or any other aioice user in the same process keeps its
own setting. After gathering, the local SDP is checked: an ``a=candidate`` line whose address is
outside ``host_addresses`` (relay candidates from a configured TURN server excepted) fails the
exchange with ``candidate_outside_allowed`` before anything is sent to the broker. An empty
``host_addresses`` means no restriction (every interface, aioice's default).

Relay-only ICE (``webrtc.ice_transport_policy = "relay"``)
-----------------------------------------------------------
For testers who must hide their addresses from peers, the ``RTCConfiguration`` then carries
``iceTransportPolicy=RELAY`` (W3C RTCIceTransportPolicy, aiortc >= 1.16, RFC 9429 section 3.5.3):
aioice gathers only relayed candidates from the configured TURN server (RFC 8656) and hides
their related address. The final local SDP is checked all the same: every ``a=candidate`` line
must be ``typ relay`` with no related address (``raddr`` absent, ``0.0.0.0`` or ``::``), else
the exchange fails with ``candidate_outside_allowed`` before anything is sent. No candidate at
all (TURN server unreachable, wrong credentials, no ``turn:`` URL) fails it with
``no_relay_candidate``, also before anything is sent: the peer's timer ends its side.

Host-name (mDNS) remote candidates
----------------------------------
A peer may offer ``a=candidate`` lines whose address is an mDNS name (``<uuid>.local``,
draft-ietf-mmusic-mdns-ice-candidates): browsers do by default. What happens to them depends on
the ICE scope, before ``setRemoteDescription()``:

* no restriction (``host_addresses`` empty, policy ``all``): the SDP is passed on untouched and
  aioice resolves the names itself (``aioice.mdns``: one query to 224.0.0.251 per name, 1 s
  time-out, on a socket bound to every interface whose multicast follows the default route);
* ``host_addresses`` set (policy ``all``): the ``.local`` names are resolved by
  :func:`fanny_tui.mdns.resolve_names` on the allowed IPv4 addresses only (queries leave by
  those addresses' interfaces, group membership on those interfaces only; with 127.0.0.1
  nothing leaves the machine), and each resolved candidate's address is replaced by the IPv4
  address answered (:func:`drop_hostname_candidates` with ``resolved``). aioice then never sees
  a name, so it never resolves anything itself;
* relay policy: mDNS candidates are dropped unresolved (aioice ignores them too,
  draft-ietf-mmusic-mdns-ice-candidates section 3.2: a relayed candidate cannot reach a host
  name's address anyway).

Under either restriction, any other host name (not ``<label>.local``) and any name left
unresolved within :data:`fanny_tui.mdns.RESOLVE_TIMEOUT_S` is dropped (aioice would resolve a
DNS name through the system resolver, outside the allowed addresses). If the peer offered
candidates and none is left, the exchange fails with ``mdns_candidate_refused``, before anything
is sent: the peer offered only names that could not be resolved on the allowed addresses (no
IPv4 address allowed, no answer in time, port 5353 unavailable) or a relay-only exchange.

Timing and closing
------------------
Three budgets. The establishment timer of ``timeout_s`` seconds covers signaling, ICE, DTLS,
SCTP and both ``peer_hello`` messages: aiortc notices a vanished peer only after ~30 s (and
reports ``closed``, not ``failed``), and with no usable candidate pair its state never changes at
all. When it fires the machine's ``timeout()`` is called, its ``abort`` frame is flushed if the
channel is still open, and ``HandshakeFailed("timeout")`` is returned. One exception keeps
results truthful: when a ``store_token`` call is already running in its thread, it is awaited
and its outcome decides, so ``HandshakeFailed`` always means that this exchange stored nothing
on this side. The timer is cancelled when the hellos are exchanged (``Established``); from then
on the machine's own timers rule, driven by a tick every ``min(0.25, position_interval_s / 4)``
seconds: the token's ack must come within ``token_timeout_s`` of sending the token, and the
contact ends by ``contact_gap_s`` (parted), ``max_contact_s`` or heartbeat loss.

Whoever ends the contact sends ``close`` (or ``abort``), lets the frame leave (up to
:data:`FLUSH_S` seconds) and waits up to :data:`LINGER_S` seconds for the peer to close the
connection; the side that receives ``close`` closes at once. The peer connection is always
closed before :func:`run_witness` returns or raises; a cancelled exchange sends ``close``
``stopped`` first.

The selected ICE candidate pair's types are read from aioice's nominated pair
(:func:`selected_candidate_types`) when the channel opens.

Partial outcomes
----------------
The responder stores first and acknowledges; the initiator stores on the ack (paper 3, step 5).
If the initiator's store fails (or the ack is lost), the responder keeps its token and the
initiator has none. This is acceptable: a token held by one side only is harmless. It cannot be
matched to anyone, it reveals nothing and it expires like any other.

Privacy
-------
Contact IDs travel only on the data channel, never through :class:`Signaling`. Nothing here logs a
contact ID, a session ID, a token or an SDP: only ``role`` and state names, at DEBUG level.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import ipaddress
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal, Protocol

from .config import WebRtcConfig
from .protocol.contact import ContactSettings, Fix
from .protocol.errors import MessageError
from .protocol.handshake import (
    TERMINAL,
    ContactEnded,
    Established,
    HandshakeCompleted,
    HandshakeFailed,
    HandshakeState,
    PeerSample,
    StoreToken,
    WitnessHandshake,
)
from .protocol.messages import Abort, Close, decode_peer_message

if TYPE_CHECKING:
    from aiortc import RTCConfiguration, RTCDataChannel, RTCPeerConnection

__all__ = [
    "CHANNEL_LABEL",
    "ChannelOpened",
    "FLUSH_S",
    "LINGER_S",
    "Signaling",
    "candidates_outside",
    "drop_hostname_candidates",
    "hostname_candidates",
    "install_host_address_filter",
    "restrict_host_addresses",
    "run_witness",
    "selected_candidate_types",
]

logger = logging.getLogger(__name__)

CHANNEL_LABEL = "fanny-witness"
"""Label of the data channel the initiator opens."""

LINGER_S = 2.0
"""Seconds a completed responder waits for the initiator to close (its ack must arrive)."""

FLUSH_S = 0.5
"""Seconds given to frames still queued on the data channel before the connection closes."""

_POLL_S = 0.005

_allowed_host_addresses: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar(
    "fanny_ice_host_addresses", default=None
)


class Signaling(Protocol):
    """The path to the peer through the broker: one offer, one answer (WebRTC JSEP, RFC 8829).

    Implementations may raise any exception when the broker link fails; :func:`run_witness`
    then fails the exchange with ``signaling_failed``.
    """

    async def send(self, sdp_type: str, sdp: str) -> None:
        """Send ``sdp`` (``"offer"`` or ``"answer"``) to the peer, via the broker."""
        ...

    async def receive(self) -> tuple[str, str]:
        """Wait for the next ``(sdp_type, sdp)`` from the peer."""
        ...


class _Abandon(Exception):
    """Internal: the exchange stops before the data channel carried anything."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# -- ICE host address restriction -------------------------------------------------------------


WARMUP_TIMEOUT_S = 5.0
"""Seconds the start-up warm-up exchange of :func:`preload` may take before it is given up."""

_preload_lock = threading.Lock()
_preloaded = False


def preload() -> None:
    """Pay, once per process and off the first match, what a process's first exchange pays.

    That is (issue 7, point 4; profiles in docs/performance.md):

    * ``import aiortc`` (and through it aioice, cryptography, PyAV): ~0.2-0.6 s;
    * the first use of what aiortc loads lazily: the DTLS certificate's key generation
      (``RTCCertificate.generateCertificate`` imports cryptography's OpenSSL backend,
      ~9-14 ms), the SDP parser's regular expressions, the DTLS and SCTP code paths.

    For the second part it runs one whole warm-up exchange between two peer connections of
    this process: one SDP offer and answer passed in memory, ICE host candidates on
    127.0.0.1 only (no STUN or TURN server, nothing leaves the machine), a data channel
    opened and one byte sent, then both connections closed; bounded by
    :data:`WARMUP_TIMEOUT_S`. It carries no session ID, contact ID or token and touches no
    file; like the first exchange would, it installs :func:`install_host_address_filter`. A
    failed warm-up is logged at DEBUG and changes nothing else (the first match then pays as
    it did before).

    Blocking: call it from a worker thread (the engine does, once the broker link is up, so
    that neither start-up to ``broker_connected`` nor the TUI's first paint waits for it); the
    warm-up runs on its own event loop in that thread; a call from a thread that already runs
    an event loop only imports (a later call from a worker thread still warms up). Safe to
    call from several threads; calls after the one that warmed up cost nothing.

    Raises:
        ImportError: aiortc is not installed (the first exchange would fail the same way).
    """
    global _preloaded
    with _preload_lock:
        if _preloaded:
            return
        import aiortc  # noqa: F401  (the import is the point)
        from aioice import ice  # noqa: F401
        try:
            asyncio.get_running_loop()
            return          # this thread runs a loop: asyncio.run() cannot, import only
        except RuntimeError:
            pass
        try:
            asyncio.run(_warm_up(WARMUP_TIMEOUT_S))
        except Exception as exc:  # an optimisation only: any failure leaves things as they were
            logger.debug("preload: warm-up exchange failed (%s)", type(exc).__name__)
        _preloaded = True


async def _warm_up(timeout_s: float) -> None:
    """One loopback exchange between two local peer connections (see :func:`preload`)."""
    from aiortc import RTCConfiguration, RTCPeerConnection

    install_host_address_filter()
    loop = asyncio.get_running_loop()
    received: asyncio.Future[object] = loop.create_future()
    with restrict_host_addresses(["127.0.0.1"]):
        offerer = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        answerer = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        async with asyncio.timeout(timeout_s):
            channel = offerer.createDataChannel(CHANNEL_LABEL + "-warmup")
            channel.on("open", lambda: channel.send(b"\0"))

            def on_message(message: object) -> None:
                if not received.done():
                    received.set_result(message)

            def on_channel(remote: RTCDataChannel) -> None:
                remote.on("message", on_message)

            answerer.on("datachannel", on_channel)
            with restrict_host_addresses(["127.0.0.1"]):
                await offerer.setLocalDescription(await offerer.createOffer())
                await answerer.setRemoteDescription(offerer.localDescription)
                await answerer.setLocalDescription(await answerer.createAnswer())
                await offerer.setRemoteDescription(answerer.localDescription)
            await received
    finally:
        await offerer.close()
        await answerer.close()


def install_host_address_filter() -> None:
    """Replace ``aioice.ice.get_host_addresses`` with the context-aware wrapper, once.

    Idempotent. While no :func:`restrict_host_addresses` scope is active the wrapper calls the
    original function, so installing it changes nothing by itself. Imports aioice.
    """
    from aioice import ice

    current = ice.get_host_addresses
    if getattr(current, "_fanny_filter", False):
        return
    original: Callable[[bool, bool], list[str]] = current

    def get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        allowed = _allowed_host_addresses.get()
        if allowed is None:
            return original(use_ipv4, use_ipv6)
        wanted = {4: use_ipv4, 6: use_ipv6}
        return [a for a in allowed if wanted[ipaddress.ip_address(a).version]]

    get_host_addresses._fanny_filter = True  # type: ignore[attr-defined]
    get_host_addresses.__wrapped__ = original  # type: ignore[attr-defined]
    get_host_addresses.__doc__ = (
        "aioice's get_host_addresses, restricted by fanny_tui.peer.restrict_host_addresses()."
    )
    ice.get_host_addresses = get_host_addresses


def _canonical_addresses(addresses: Iterable[str]) -> tuple[str, ...]:
    canonical: list[str] = []
    for address in addresses:
        try:
            canonical.append(str(ipaddress.ip_address(address)))
        except ValueError:
            raise ValueError(f"host_addresses: {address!r} is not an IP address") from None
    return tuple(canonical)


@contextlib.contextmanager
def restrict_host_addresses(addresses: Iterable[str]) -> Iterator[tuple[str, ...]]:
    """Within this block (and tasks created in it), aioice offers only ``addresses`` as hosts.

    Call :func:`install_host_address_filter` first for it to have any effect.

    Args:
        addresses: IP addresses (text) to bind host candidates to; empty means no restriction.

    Yields:
        The addresses in canonical text, as they will appear in candidates.

    Raises:
        ValueError: an address is not an IP address.
    """
    allowed = _canonical_addresses(addresses)
    token = _allowed_host_addresses.set(allowed if allowed else None)
    try:
        yield allowed
    finally:
        _allowed_host_addresses.reset(token)


def _candidate_fields(line: str) -> list[str] | None:
    """The fields after ``a=candidate:`` (RFC 8839 section 5.1), or None if too few to read."""
    fields = line[len("a=candidate:"):].split()
    if len(fields) < 8 or fields[6] != "typ":
        return None
    return fields


def _related_address(fields: list[str]) -> str | None:
    """The ``raddr`` value of a candidate's extension fields, if any."""
    for i in range(8, len(fields) - 1, 2):
        if fields[i] == "raddr":
            return fields[i + 1]
    return None


def candidates_outside(sdp: str, allowed: Iterable[str], *, relay_only: bool = False) -> list[str]:
    """The addresses of the SDP's ``a=candidate`` lines (RFC 8839) that are not allowed.

    By default relay candidates (``typ relay``, from a configured TURN server) are always
    allowed; host, server-reflexive and peer-reflexive ones must use an address of ``allowed``.
    With ``relay_only`` (the relay ICE transport policy) only relay candidates are allowed, and
    only without a related address (``raddr`` absent, ``0.0.0.0`` or ``::``): a related address
    would tell the peer this device's own address, which relay-only ICE is meant to hide.

    Args:
        sdp: session description text.
        allowed: allowed IP addresses (text); not used with ``relay_only``.
        relay_only: allow relay candidates only.

    Returns:
        The offending addresses in order (``"?"`` for a line that cannot be parsed; for a relay
        candidate that reveals a related address, that address); empty when every candidate is
        allowed.
    """
    allowed_ips = {ipaddress.ip_address(a) for a in allowed}
    bad: list[str] = []
    for line in sdp.splitlines():
        if not line.startswith("a=candidate:"):
            continue
        fields = _candidate_fields(line)
        if fields is None:
            bad.append("?")
            continue
        address, kind = fields[4], fields[7]
        if relay_only:
            related = _related_address(fields)
            if kind != "relay":
                bad.append(address)
            elif related is not None and related not in ("0.0.0.0", "::"):
                bad.append(related)
            continue
        if kind == "relay":
            continue
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            bad.append(address)
            continue
        if ip not in allowed_ips:
            bad.append(address)
    return bad


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def hostname_candidates(sdp: str) -> list[str]:
    """The host names (not IP literals) of the SDP's ``a=candidate`` lines, in order, unique."""
    names: dict[str, None] = {}
    for line in sdp.splitlines():
        if line.startswith("a=candidate:"):
            fields = _candidate_fields(line)
            if fields is not None and not _is_ip(fields[4]):
                names[fields[4]] = None
    return list(names)


def drop_hostname_candidates(sdp: str, resolved: Mapping[str, str] | None = None
                             ) -> tuple[str, int]:
    """Remove the ``a=candidate`` lines whose address is a host name rather than an IP address.

    Such names are mDNS names (``<uuid>.local``, draft-ietf-mmusic-mdns-ice-candidates) that
    aioice would resolve by multicast DNS, leaving the allowed addresses. Lines that cannot be
    parsed are kept (aiortc then refuses the SDP), as is every other line, with its line ending.

    Args:
        sdp: the peer's session description text.
        resolved: ``{name (lowercase): IP address}``: a line whose name is here is kept, with
            the address in place of the name (every other field unchanged), not removed.

    Returns:
        The SDP without those lines, and how many lines were removed.
    """
    resolved = resolved or {}
    kept: list[str] = []
    dropped = 0
    for line in sdp.splitlines(keepends=True):
        if line.startswith("a=candidate:"):
            body = line.rstrip("\r\n")
            fields = _candidate_fields(body)
            if fields is not None and not _is_ip(fields[4]):
                address = resolved.get(fields[4].lower().rstrip("."))
                if address is None:
                    dropped += 1
                    continue
                fields[4] = address
                line = "a=candidate:" + " ".join(fields) + line[len(body):]
        kept.append(line)
    return "".join(kept), dropped


async def _usable_remote_sdp(sdp: str, scope: _IceScope) -> str:
    """The peer's SDP with its host-name candidates resolved or dropped (module docstring).

    Raises:
        _Abandon: ``mdns_candidate_refused``: candidates were offered and none is left.
    """
    if not scope.restricted:
        return sdp  # aioice resolves .local names itself
    names = hostname_candidates(sdp)
    if not names:
        return sdp
    resolved: dict[str, str] = {}
    if not scope.relay_only:
        from .mdns import resolve_names

        resolved = await resolve_names(names, scope.allowed)
    sdp, dropped = drop_hostname_candidates(sdp, resolved)
    logger.debug("host-name remote candidates: %d resolved, %d dropped", len(resolved), dropped)
    if dropped and not any(line.startswith("a=candidate:") for line in sdp.splitlines()):
        raise _Abandon("mdns_candidate_refused")
    return sdp


_POLICIES = ("all", "relay")


def _relay_only(webrtc: WebRtcConfig) -> bool:
    """True for the relay ICE transport policy; ValueError for an unknown policy."""
    policy = webrtc.ice_transport_policy
    if policy not in _POLICIES:
        raise ValueError(f'webrtc.ice_transport_policy must be "all" or "relay", got {policy!r}')
    return policy == "relay"


def _rtc_configuration(webrtc: WebRtcConfig) -> RTCConfiguration:
    """An explicit configuration: the configured ICE servers and transport policy.

    Never aiortc's default server list (a public STUN server). The policy maps to W3C
    RTCIceTransportPolicy: ``"relay"`` gathers relayed candidates only.
    """
    from aiortc import RTCConfiguration, RTCIceServer, RTCIceTransportPolicy

    servers = [
        RTCIceServer(urls=list(s.urls), username=s.username, credential=s.credential)
        for s in webrtc.ice_servers
    ]
    policy = RTCIceTransportPolicy.RELAY if _relay_only(webrtc) else RTCIceTransportPolicy.ALL
    return RTCConfiguration(iceServers=servers, iceTransportPolicy=policy)


def _describe(exc: BaseException) -> str:
    """Short text for an exception: its class, plus strerror for OS errors (no paths, no IDs)."""
    name = type(exc).__name__
    strerror = getattr(exc, "strerror", None)
    return f"{name} ({strerror})" if isinstance(strerror, str) and strerror else name


# -- one exchange ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ChannelOpened:
    """The data channel is open; the ICE candidate types (RFC 8445: ``host``, ``srflx``,
    ``prflx``, ``relay``) of the selected pair, None where aioice does not tell."""

    local_candidate: str | None
    remote_candidate: str | None


def selected_candidate_types(pc: Any) -> tuple[str | None, str | None]:
    """The candidate types of the ICE pair aioice nominated for the peer connection's data
    channel transport, ``(None, None)`` when there is none (yet) or aiortc's internals differ.

    Reads ``pc.sctp.transport.transport._connection._nominated`` (aioice 0.13 ``Connection``,
    component 1): aiortc has no public accessor for the selected pair.
    """
    try:
        connection = pc.sctp.transport.transport._connection
        pair = connection._nominated.get(1)
        if pair is None:
            return None, None
        return str(pair.local_candidate.type), str(pair.remote_candidate.type)
    except AttributeError:
        return None, None


WitnessEvent = ChannelOpened | Established | PeerSample | HandshakeCompleted | ContactEnded
"""What :func:`run_witness` reports through ``on_event`` while it runs."""


class _Exchange:
    """Glue between one RTCPeerConnection / data channel and one WitnessHandshake."""

    def __init__(
        self,
        machine: WitnessHandshake,
        pc: RTCPeerConnection,
        store_token: Callable[[str], bool],
        on_progress: Callable[[str], None],
        own_fix: Callable[[], Fix | None],
        on_event: Callable[[WitnessEvent], None],
    ) -> None:
        self.machine = machine
        self.pc = pc
        self.channel: RTCDataChannel | None = None
        self.inputs: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.result: HandshakeCompleted | HandshakeFailed | None = None
        self.store_task: asyncio.Task[bool] | None = None
        self.budget: asyncio.Timeout | None = None
        self._store_token = store_token
        self._on_progress = on_progress
        self._own_fix = own_fix
        self._on_event = on_event
        self._exchanging = False
        self._last_state = machine.state
        self._tick_s = min(0.25, machine.settings.position_interval_s / 4)
        pc.on("connectionstatechange", self._on_connection_state)

    # callbacks from aiortc (synchronous, on the event loop)

    def _on_connection_state(self) -> None:
        if self.pc.connectionState in ("failed", "closed"):
            self.inputs.put_nowait(("closed", None))

    def attach(self, channel: RTCDataChannel) -> None:
        """Use ``channel`` for the exchange (the first one with our label)."""
        if self.channel is not None or channel.label != CHANNEL_LABEL:
            return
        self.channel = channel
        channel.on("open", lambda: self.inputs.put_nowait(("open", None)))
        channel.on("message", lambda data: self.inputs.put_nowait(("message", data)))
        channel.on("close", lambda: self.inputs.put_nowait(("closed", None)))
        if channel.readyState == "open":
            self.inputs.put_nowait(("open", None))

    # driving the machine

    def _log_state(self) -> None:
        state = self.machine.state
        if state is not self._last_state:
            logger.debug("witness %s: %s -> %s", self.machine.role, self._last_state.value,
                         state.value)
            self._last_state = state

    def feed(self, kind: str, data: Any) -> None:
        """Give one input to the machine, after this device's latest fix."""
        now = time.monotonic()
        self.machine.local_fix(self._own_fix(), now)
        if kind == "open":
            if not self._exchanging:
                self._exchanging = True
                self._on_progress("exchanging")
                self._on_event(ChannelOpened(*selected_candidate_types(self.pc)))
            # The peer's first frame may already have opened the machine.
            if self.machine.state is HandshakeState.IDLE:
                self.machine.channel_open(now)
        elif kind == "message":
            self.machine.receive_data(data, now)
        elif kind == "closed":
            self.machine.channel_closed(now)
        self.machine.tick(now)
        self._log_state()

    def send_pending(self) -> None:
        """Send the machine's frames if the channel is open; drop them otherwise."""
        channel = self.channel
        for frame in self.machine.data_to_send():
            if channel is None or channel.readyState != "open":
                continue
            try:
                channel.send(frame)
            except ValueError:  # over the peer's max-message-size: cannot happen for ours
                logger.debug("witness %s: frame not sent (too large)", self.machine.role)

    def dispatch(self, events: list[Any]) -> list[StoreToken]:
        """Report the machine's events; return the store requests among them."""
        stores = []
        for event in events:
            if isinstance(event, StoreToken):
                stores.append(event)
                continue
            if isinstance(event, Established) and self.budget is not None:
                self.budget.reschedule(None)  # establishment over: the contact has no budget
            if isinstance(event, HandshakeCompleted | HandshakeFailed):
                self.result = event
            if not isinstance(event, HandshakeFailed):
                self._on_event(event)
        return stores

    async def pump(self) -> None:
        """Send frames and act on events until the machine waits for input again."""
        while True:
            self.send_pending()
            events = self.machine.events()
            if not events:
                return
            for event in self.dispatch(events):
                await self.store(event.token)

    async def store(self, token: str) -> None:
        """Run ``store_token`` in a thread and report the outcome to the machine."""
        self.store_task = asyncio.ensure_future(asyncio.to_thread(self._store_token, token))
        await asyncio.wait({self.store_task})  # not cancelled with us: see on_timeout()
        self.report_store()

    def report_store(self) -> None:
        """Feed the finished store call's outcome to the machine (if it still waits for it)."""
        task = self.store_task
        assert task is not None and task.done()
        if self.machine.state is not HandshakeState.STORING:
            return
        exc = task.exception()
        if exc is not None:
            logger.debug("witness %s: store failed (%s)", self.machine.role, type(exc).__name__)
            self.machine.store_failed(_describe(exc), time.monotonic())
        else:
            self.machine.token_stored(bool(task.result()), time.monotonic())
        self._log_state()

    async def drive(self) -> None:
        """Feed inputs (and timer ticks) until the exchange reaches a terminal state."""
        while self.machine.state not in TERMINAL:
            try:
                async with asyncio.timeout(self._tick_s):
                    kind, data = await self.inputs.get()
            except TimeoutError:
                kind, data = "tick", None
            self.feed(kind, data)
            await self.pump()

    async def on_timeout(self) -> None:
        """The establishment budget ran out: fail, unless a store call is already running."""
        if self.machine.state is HandshakeState.STORING and self.store_task is not None:
            await asyncio.wait({self.store_task})
            self.report_store()
        else:
            self.machine.timeout(time.monotonic())
            self._log_state()
        await self.pump()

    async def on_cancel(self) -> None:
        """The caller cancelled: a running store decides first, then ``close`` ``stopped``."""
        if self.store_task is not None and not self.store_task.done():
            await asyncio.wait({self.store_task})
            self.report_store()
        self.machine.stop(time.monotonic())
        await self.pump()
        await self.flush()

    async def flush(self) -> None:
        """Give frames still queued on the channel up to :data:`FLUSH_S` to leave."""
        channel = self.channel
        if channel is None or channel.readyState != "open":
            return
        deadline = time.monotonic() + FLUSH_S
        while channel.bufferedAmount > 0 and time.monotonic() < deadline:
            await asyncio.sleep(_POLL_S)

    async def finish(self) -> None:
        """Let the last frames leave; when this side ended the contact, let the peer close."""
        await self.flush()
        channel = self.channel
        if channel is None or channel.readyState != "open":
            return
        reason = self.machine.close_reason or ""
        by_peer = reason in ("peer_closed", "channel_lost") or (
            self.machine.failure_reason or "").startswith(("peer_aborted", "channel_closed"))
        if by_peer:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(LINGER_S):
                while True:
                    kind, data = await self.inputs.get()
                    if kind == "closed" or (kind == "message" and _is_end_frame(data)):
                        return  # the peer closed, or ended the contact at the same time

    async def settle_store(self) -> None:
        """Wait for a store call still running in its thread (never leave it behind)."""
        task = self.store_task
        if task is not None and not task.done():
            await asyncio.wait({task})
        if task is not None and task.done() and not task.cancelled():
            task.exception()  # retrieved: no "exception was never retrieved" warning


def _is_end_frame(data: str | bytes) -> bool:
    """True for a ``close`` or ``abort`` frame (the peer ended the contact too)."""
    try:
        return isinstance(decode_peer_message(data), Close | Abort)
    except MessageError:
        return False


@dataclasses.dataclass(frozen=True)
class _IceScope:
    """What ICE may use in one exchange: host addresses (empty: any) and relay-only policy."""

    allowed: tuple[str, ...]
    relay_only: bool

    @property
    def restricted(self) -> bool:
        """True when traffic must stay within the configured addresses or the TURN server."""
        return bool(self.allowed) or self.relay_only


async def _set_local(pc: RTCPeerConnection, description: Any, scope: _IceScope) -> str:
    """setLocalDescription() with host candidates restricted; returns the checked local SDP."""
    with restrict_host_addresses(scope.allowed):
        await pc.setLocalDescription(description)
    sdp: str = pc.localDescription.sdp
    if scope.relay_only:
        if not any(line.startswith("a=candidate:") for line in sdp.splitlines()):
            raise _Abandon("no_relay_candidate")
        if candidates_outside(sdp, (), relay_only=True):
            raise _Abandon("candidate_outside_allowed")
    elif scope.allowed and candidates_outside(sdp, scope.allowed):
        raise _Abandon("candidate_outside_allowed")
    return sdp


async def _receive(signaling: Signaling, expected: str) -> str:
    try:
        sdp_type, sdp = await signaling.receive()
    except Exception as exc:  # the broker link is someone else's: any failure ends this exchange
        raise _Abandon(f"signaling_failed: {type(exc).__name__}") from None
    if sdp_type != expected:
        raise _Abandon("unexpected_signal")
    return sdp


async def _send(signaling: Signaling, sdp_type: str, sdp: str) -> None:
    try:
        await signaling.send(sdp_type, sdp)
    except Exception as exc:
        raise _Abandon(f"signaling_failed: {type(exc).__name__}") from None


async def _set_remote(pc: RTCPeerConnection, sdp: str, sdp_type: str, scope: _IceScope) -> None:
    from aiortc import RTCSessionDescription

    if not any(line.startswith("m=application ") for line in sdp.splitlines()):
        raise _Abandon("bad_sdp")  # no data channel section: this exchange could never start
    sdp = await _usable_remote_sdp(sdp, scope)
    try:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type=sdp_type))
    except Exception:  # remote text parsed by aiortc: any parse or validation error
        raise _Abandon("bad_sdp") from None


async def _negotiate(
    role: str, pc: RTCPeerConnection, exchange: _Exchange, signaling: Signaling,
    scope: _IceScope,
) -> None:
    """One offer, one answer (no trickle ICE: each SDP holds every candidate)."""
    if role == "initiator":
        exchange.attach(pc.createDataChannel(CHANNEL_LABEL))
        offer = await pc.createOffer()
        await _send(signaling, "offer", await _set_local(pc, offer, scope))
        await _set_remote(pc, await _receive(signaling, "answer"), "answer", scope)
    else:
        pc.on("datachannel", exchange.attach)
        await _set_remote(pc, await _receive(signaling, "offer"), "offer", scope)
        answer = await pc.createAnswer()
        await _send(signaling, "answer", await _set_local(pc, answer, scope))


async def run_witness(
    *,
    role: Literal["initiator", "responder"],
    contact_id: str,
    signaling: Signaling,
    webrtc: WebRtcConfig,
    store_token: Callable[[str], bool],
    timeout_s: float,
    on_progress: Callable[[str], None] = lambda s: None,
    contact: ContactSettings | None = None,
    own_fix: Callable[[], Fix | None] = lambda: None,
    on_event: Callable[[WitnessEvent], None] = lambda e: None,
) -> HandshakeCompleted | HandshakeFailed:
    """Run one witness exchange with a matched peer and the contact that follows (paper 3).

    The initiator opens the data channel and sends the offer; the responder answers. Over the
    channel (data channel protocol version 2, docs/protocol.md) both send ``peer_hello``, then
    their position every ``position_interval_s``; the initiator sends the token once the pair
    was within the radius for the effective ``min_contact_s``; the responder stores it and
    acks, then the initiator stores it. The channel stays open until the contact ends.

    Args:
        role: ``"initiator"`` or ``"responder"``, as given by the broker's match.
        contact_id: this device's contact ID (canonical UUIDv4). Sent only on the data channel.
        signaling: carries the offer and the answer through the broker.
        webrtc: ICE servers (none by default: never a public STUN server), the host
            addresses allowed for ICE candidates and the ICE transport policy (``"relay"``:
            relayed candidates through the TURN server only); see the module docstring.
        store_token: stores a token and returns True if it was new, False if already stored;
            it runs in a worker thread; any exception it raises (``StoreError``, ``OSError``,
            ...) fails the exchange with ``store_failed: <ExceptionClass>``.
        timeout_s: the establishment budget in seconds, from the first signal to both
            ``peer_hello`` exchanged. The token and its ack then get ``contact.token_timeout_s``
            from the moment the token is sent; the open contact has no budget (it ends by
            ``contact_gap_s``, ``max_contact_s`` or heartbeat loss).
        on_progress: called with ``"connecting"`` before the offer/answer and ``"exchanging"``
            when the data channel opens. Must not raise.
        contact: this device's contact settings (default: :class:`ContactSettings` with
            ``token_timeout_s = timeout_s``).
        own_fix: returns this device's latest fix (None: no fix); called at every input.
        on_event: called with :class:`ChannelOpened`, ``Established`` (the establishment is
            over), ``PeerSample`` (each sample), ``HandshakeCompleted`` (the token is stored
            on this side) and, last, ``ContactEnded`` (from
            :mod:`fanny_tui.protocol.handshake`). Must not raise.

    Returns:
        :class:`HandshakeCompleted` when this side holds the token of this contact (``new``
        False when it was already stored), else :class:`HandshakeFailed` with a reason such as
        ``timeout``, ``channel_closed``, ``peer_aborted: ...``, ``store_failed: ...``,
        ``token_mismatch``, ``unsupported_version``, ``bad_sdp``, ``unexpected_signal``,
        ``signaling_failed: ...``, ``candidate_outside_allowed``, ``no_relay_candidate``,
        ``mdns_candidate_refused``, or how a contact ended before its token (``parted``,
        ``max_contact``, ``peer_closed``, ``channel_lost``). A failed exchange stored nothing
        on this side.

    Raises:
        ValueError: bad role, contact ID, timeout, host address or ICE transport policy.
        asyncio.CancelledError: the caller cancelled; ``close`` ``stopped`` is sent when the
            channel is open, and the connection is closed first.
    """
    if not (isinstance(timeout_s, int | float) and math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    if contact is None:
        contact = ContactSettings(token_timeout_s=timeout_s)
    machine = WitnessHandshake(role, contact_id, contact)
    scope = _IceScope(_canonical_addresses(webrtc.host_addresses), _relay_only(webrtc))

    from aiortc import RTCPeerConnection

    install_host_address_filter()
    pc = RTCPeerConnection(configuration=_rtc_configuration(webrtc))
    exchange = _Exchange(machine, pc, store_token, on_progress, own_fix, on_event)
    abandoned: str | None = None
    logger.debug("witness %s: start", role)
    try:
        on_progress("connecting")
        try:
            async with asyncio.timeout(timeout_s) as budget:
                exchange.budget = budget
                await _negotiate(role, pc, exchange, signaling, scope)
                await exchange.drive()
        except TimeoutError:
            logger.debug("witness %s: timeout", role)
            await exchange.on_timeout()
        except _Abandon as stop:
            logger.debug("witness %s: abandoned", role)
            abandoned = stop.reason
        except asyncio.CancelledError:
            logger.debug("witness %s: cancelled", role)
            await exchange.on_cancel()
            raise
        if abandoned is None:
            await exchange.finish()
    finally:
        await exchange.settle_store()
        await pc.close()
        logger.debug("witness %s: closed", role)
    if abandoned is not None:
        return HandshakeFailed(reason=abandoned)
    if isinstance(exchange.result, HandshakeCompleted):
        return exchange.result
    reason = machine.failure_reason or machine.close_reason or "channel_closed"
    return HandshakeFailed(reason=reason)
