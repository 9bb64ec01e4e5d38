"""Resolve mDNS ``.local`` ICE candidate names on chosen interfaces only (RFC 6762, IPv4).

Browsers offer their host ICE candidates as mDNS names (``<uuid>.local``,
draft-ietf-mmusic-mdns-ice-candidates) instead of IP addresses. aioice resolves such names itself,
but on one socket bound to every interface whose multicast group membership and queries follow
the default route: with ``[webrtc] host_addresses`` set, that would send multicast (the query to
224.0.0.251 and the IGMP membership report) out of an interface the tester did not allow.

:func:`resolve_names` does it on the allowed addresses only. For each allowed IPv4 address it
opens one UDP socket on port 5353 (shared: ``SO_REUSEADDR``/``SO_REUSEPORT``) with

* ``IP_MULTICAST_IF`` = that address: queries leave by that address's interface only (for
  127.0.0.1, the loopback interface: nothing leaves the machine);
* ``IP_ADD_MEMBERSHIP`` of 224.0.0.251 on that address's interface only (never ``INADDR_ANY``,
  which picks the default route's interface);
* ``IP_MULTICAST_ALL`` = 0 (Linux): only datagrams for this socket's own membership are
  received, not those of groups joined by other sockets on other interfaces;
* ``IP_MULTICAST_TTL`` = 255 (RFC 6762 section 11) and loopback of multicast on, so that a
  responder on the same machine (another peer of a test or demo) hears the query.

It sends one question per name (QTYPE A, QCLASS IN, message ID 0: RFC 6762 section 18) and
takes the first A record answered for each name, with or without the cache-flush bit, from a
response that arrives within the time-out. It never answers a query and never publishes a
name. IPv6 addresses are not used (aioice's mDNS is IPv4 only too).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import sys
from collections.abc import Iterable
from typing import Any

__all__ = ["MDNS_ADDRESS", "MDNS_PORT", "RESOLVE_TIMEOUT_S", "is_mdns_name", "multicast_socket",
           "resolve_names"]

logger = logging.getLogger(__name__)

MDNS_ADDRESS = "224.0.0.251"
MDNS_PORT = 5353
RESOLVE_TIMEOUT_S = 1.0
"""Seconds to wait for the answers (aioice waits as long for one name)."""

_IP_MULTICAST_ALL = getattr(socket, "IP_MULTICAST_ALL", 49)  # Linux <linux/in.h>
_CLASS_IN = 1
_CACHE_FLUSH = 0x8000


def is_mdns_name(name: str) -> bool:
    """True for a single-label ``.local`` name, as aioice accepts (``<label>.local``)."""
    from aioice.mdns import is_mdns_hostname

    return is_mdns_hostname(name)


def multicast_socket(address: str) -> socket.socket:
    """A non-blocking UDP socket on port 5353 whose mDNS traffic uses ``address``'s interface.

    Args:
        address: an IPv4 address of this machine (e.g. ``127.0.0.1``).

    Returns:
        The socket, bound to ``("", 5353)``, member of 224.0.0.251 on that interface only.

    Raises:
        ValueError: ``address`` is not IPv4.
        OSError: the address is not on any interface, port 5353 is taken exclusively, or the
            system refuses multicast (the socket is closed first).
    """
    if ipaddress.ip_address(address).version != 4:
        raise ValueError(f"mDNS is resolved on IPv4 addresses only, not {address!r}")
    interface = socket.inet_aton(address)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        # Interface first: from here on nothing this socket sends can take the default route.
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, interface)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 255)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        if sys.platform == "linux":
            sock.setsockopt(socket.IPPROTO_IP, _IP_MULTICAST_ALL, 0)
        sock.bind(("", MDNS_PORT))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                        socket.inet_aton(MDNS_ADDRESS) + interface)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class _Resolver(asyncio.DatagramProtocol):
    """Collects the A records answered for the names asked."""

    def __init__(self, names: set[str], found: dict[str, str], done: asyncio.Event) -> None:
        self._names = {name.lower().rstrip(".") for name in names}
        self._found = found
        self._done = done

    def datagram_received(self, data: bytes, addr: Any) -> None:
        import dns.exception
        import dns.flags
        import dns.message
        import dns.rdatatype

        try:
            message = dns.message.from_wire(data)
        except (dns.exception.DNSException, ValueError):
            return
        if not message.flags & dns.flags.QR:
            return  # a query (ours, looped back, or another host's): never answered here
        for rrset in (*message.answer, *message.additional):
            name = rrset.name.to_text(omit_final_dot=True).lower()
            if (name not in self._names or name in self._found
                    or rrset.rdtype != dns.rdatatype.A
                    or rrset.rdclass & ~_CACHE_FLUSH != _CLASS_IN):
                continue
            for rdata in rrset:
                self._found[name] = socket.inet_ntop(socket.AF_INET, rdata.to_digestable())
                break
        if self._names <= self._found.keys():
            self._done.set()


def _query(names: Iterable[str]) -> bytes:
    import dns.message
    import dns.name
    import dns.rdataclass
    import dns.rdatatype

    message = dns.message.Message(id=0)  # ID 0, no flags: RFC 6762 section 18
    for name in names:
        message.find_rrset(message.question, dns.name.from_text(name), dns.rdataclass.IN,
                           dns.rdatatype.A, create=True)
    return message.to_wire()


async def resolve_names(names: Iterable[str], addresses: Iterable[str], *,
                        timeout_s: float = RESOLVE_TIMEOUT_S) -> dict[str, str]:
    """Resolve mDNS names by multicast on the interfaces of ``addresses`` only.

    Args:
        names: ``.local`` names (others are not asked).
        addresses: allowed IP addresses of this machine; only the IPv4 ones are used.
        timeout_s: seconds to wait for answers, in all.

    Returns:
        ``{name (lowercase): IPv4 address}`` for each name answered in time; names not answered,
        and every name when no IPv4 address is usable (none given, not on any interface, port
        5353 taken), are missing. Never raises for network trouble (it is logged at DEBUG).
    """
    wanted = {n.lower().rstrip(".") for n in names if is_mdns_name(n.rstrip("."))}
    v4 = [a for a in dict.fromkeys(addresses) if ipaddress.ip_address(a).version == 4]
    found: dict[str, str] = {}
    if not wanted or not v4:
        return found
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    transports: list[asyncio.DatagramTransport] = []
    try:
        for address in v4:
            try:
                sock = multicast_socket(address)
            except OSError as exc:
                logger.debug("no mDNS on an allowed address: %s", type(exc).__name__)
                continue
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Resolver(wanted, found, done), sock=sock)
            transports.append(transport)
        query = _query(sorted(wanted))
        for transport in transports:
            transport.sendto(query, (MDNS_ADDRESS, MDNS_PORT))
        if transports:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), timeout_s)
    finally:
        for transport in transports:
            transport.close()
    return found
