"""A test mDNS responder on loopback: answers A queries for the names it publishes (RFC 6762).

It uses :func:`fanny_tui.mdns.multicast_socket` on 127.0.0.1, so its answers, like the queries it
hears, stay on the loopback interface. It answers to the group, as aioice's and browsers'
responders do, with the cache-flush bit set (a unique record, RFC 6762 section 10.2), and records
every question it heard.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import dns.flags
import dns.message
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from fanny_tui.mdns import MDNS_ADDRESS, MDNS_PORT, multicast_socket

CACHE_FLUSH_IN = dns.rdataclass.RdataClass.make(dns.rdataclass.IN | 0x8000)


class Responder(asyncio.DatagramProtocol):
    """Answers A questions for ``records`` ({name: IPv4}); ``questions`` lists what it heard."""

    def __init__(self, records: dict[str, str]) -> None:
        self.records = records
        self.questions: list[str] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: object) -> None:
        message = dns.message.from_wire(data)
        if message.flags & dns.flags.QR:
            return
        answer = dns.message.Message(id=0)
        answer.flags |= dns.flags.QR | dns.flags.AA
        for question in message.question:
            name = question.name.to_text(omit_final_dot=True)
            self.questions.append(name)
            if question.rdtype == dns.rdatatype.A and name in self.records:
                rrset = dns.rrset.from_text(question.name, 120, dns.rdataclass.IN, "A",
                                            self.records[name])
                rrset.rdclass = CACHE_FLUSH_IN
                answer.answer.append(rrset)
        if answer.answer and self.transport is not None:
            self.transport.sendto(answer.to_wire(), (MDNS_ADDRESS, MDNS_PORT))


@contextlib.asynccontextmanager
async def loopback_responder(records: dict[str, str]) -> AsyncIterator[Responder]:
    """A :class:`Responder` listening on 127.0.0.1's interface for the block."""
    loop = asyncio.get_running_loop()
    transport, responder = await loop.create_datagram_endpoint(
        lambda: Responder(records), sock=multicast_socket("127.0.0.1"))
    try:
        yield responder
    finally:
        transport.close()
