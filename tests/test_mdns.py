"""Tests for fanny_tui.mdns: resolving ``.local`` names on the allowed interfaces only.

On loopback, against a real responder socket (tests/mdns_responder.py). The guarantee that a
query never leaves by another interface is checked in two network namespaces joined by a veth
pair that the test creates (root and ``ip netns`` needed): a listener in the second namespace
hears the resolver's query when 10.77.0.1 (the veth) is allowed, and nothing when only 127.0.0.1
is, although the veth carries the default route there. In the same namespaces, two peers with
no ICE restriction witness each other although one offers only ``.local`` names: aioice
resolves them itself (nothing of the kit's resolver is used then).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from fanny_tui.mdns import is_mdns_name, multicast_socket, resolve_names

from .helpers import TIME_UNIT
from .mdns_responder import loopback_responder

REPO = Path(__file__).resolve().parents[1]


def test_mdns_names_are_single_label_local_names() -> None:
    assert is_mdns_name("1f0e8d7a-1c2b-4d5e-8f9a-0b1c2d3e4f50.local")
    assert not is_mdns_name("host.example.com")
    assert not is_mdns_name("a.b.local")
    assert not is_mdns_name("127.0.0.1")


async def test_names_resolve_on_loopback_and_only_local_names_are_asked() -> None:
    async with loopback_responder({"peer-1.local": "127.0.0.1",
                                   "peer-2.local": "127.0.0.2"}) as responder:
        found = await resolve_names(["peer-1.local", "PEER-2.local.", "peer-3.local",
                                     "host.example.com"], ["127.0.0.1"],
                                    timeout_s=0.5 * TIME_UNIT)
    assert found == {"peer-1.local": "127.0.0.1", "peer-2.local": "127.0.0.2"}
    assert sorted(responder.questions) == ["peer-1.local", "peer-2.local", "peer-3.local"]


async def test_without_an_ipv4_address_nothing_is_asked() -> None:
    async with loopback_responder({"peer-1.local": "127.0.0.1"}) as responder:
        assert await resolve_names(["peer-1.local"], ["::1"]) == {}
        assert await resolve_names(["peer-1.local"], []) == {}
        # Control, after: the responder hears this one (loopback keeps the order).
        assert await resolve_names(["peer-1.local"], ["127.0.0.1"],
                                   timeout_s=TIME_UNIT) == {"peer-1.local": "127.0.0.1"}
    assert responder.questions == ["peer-1.local"]


async def test_an_address_of_no_interface_is_skipped_not_raised() -> None:
    with pytest.raises(OSError):
        multicast_socket("192.0.2.1").close()   # TEST-NET-1: on no interface here
    with pytest.raises(ValueError, match="IPv4"):
        multicast_socket("::1")
    assert await resolve_names(["peer-1.local"], ["192.0.2.1"], timeout_s=0.1) == {}


# -- no query leaves by an interface that is not allowed (network namespaces) ------------------

_LISTENER = textwrap.dedent("""
    import socket, sys
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("", 5353))
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                    socket.inet_aton("224.0.0.251") + socket.inet_aton("10.77.0.2"))
    print("ready", flush=True)
    heard = 0
    while True:
        data, _ = sock.recvfrom(4096)
        if data == b"end":
            break
        heard += 1
    print(heard, flush=True)
""")

_RESOLVER = textwrap.dedent("""
    import asyncio, socket, sys
    from fanny_tui.mdns import resolve_names

    async def aioice_alone():
        from aioice import mdns
        protocol = await mdns.create_mdns_protocol()
        try:
            answer = await protocol.resolve("peer-9.local", timeout=0.2)
        finally:
            await protocol.close()
        return {} if answer is None else answer

    if sys.argv[1] == "aioice":
        print(asyncio.run(aioice_alone()))
    else:
        print(asyncio.run(resolve_names(["peer-9.local"], [sys.argv[1]], timeout_s=0.2)))
    # A unicast marker after the query: the veth keeps the order.
    marker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    marker.sendto(b"end", ("10.77.0.2", 5353))
""")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10 * TIME_UNIT)


@pytest.fixture
def namespaces() -> Iterator[tuple[str, str]]:
    """Two fresh network namespaces, ``a`` (10.77.0.1, default route over the veth) and ``b``
    (10.77.0.2), joined by a veth pair; removed afterwards."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to create network namespaces")
    a, b = f"fanny-mdns-{os.getpid()}-a", f"fanny-mdns-{os.getpid()}-b"
    try:
        _ip("netns", "add", a)
        _ip("netns", "add", b)
        _ip("link", "add", "fm-a0", "netns", a, "type", "veth", "peer", "name", "fm-b0",
            "netns", b)
        for ns, dev, address in ((a, "fm-a0", "10.77.0.1/24"), (b, "fm-b0", "10.77.0.2/24")):
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", address, "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
        _ip("-n", a, "route", "add", "default", "via", "10.77.0.2")
        yield a, b
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def _heard_in_b(namespaces: tuple[str, str], allowed: str) -> tuple[int, str]:
    a, b = namespaces
    listener = subprocess.Popen(["ip", "netns", "exec", b, sys.executable, "-c", _LISTENER],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout is not None and listener.stdout.readline() == "ready\n"
        resolver = subprocess.run(
            ["ip", "netns", "exec", a, sys.executable, "-c", _RESOLVER, allowed],
            capture_output=True, text=True, cwd=REPO, timeout=20 * TIME_UNIT, check=True)
        out, _ = listener.communicate(timeout=10 * TIME_UNIT)
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait()
    return int(out), resolver.stdout.strip()


def test_queries_leave_by_the_allowed_interface_only(namespaces: tuple[str, str]) -> None:
    heard, found = _heard_in_b(namespaces, "10.77.0.1")
    assert (heard, found) == (1, "{}")        # control: the listener does hear a query
    heard, found = _heard_in_b(namespaces, "127.0.0.1")
    assert (heard, found) == (0, "{}")        # loopback only: nothing on the veth
    # Why fanny_tui.mdns exists: aioice's own resolver follows the default route.
    heard, found = _heard_in_b(namespaces, "aioice")
    assert (heard, found) == (1, "{}")


_UNRESTRICTED_PAIR = textwrap.dedent("""
    import asyncio, os
    from fanny_tui.config import WebRtcConfig
    from fanny_tui.peer import run_witness
    from fanny_tui.protocol.tokens import craft_token, new_id
    from tests.mdns_responder import Responder
    from tests.test_peer import DictStore, RewritingSignaling, signaling_pair
    from fanny_tui.mdns import multicast_socket

    async def main():
        records = {}

        def names(sdp):
            out = []
            for line in sdp.split("\\r\\n"):
                if line.startswith("a=candidate:"):
                    fields = line.split(" ")
                    assert fields[4] == "10.77.0.1", line
                    fields[4] = f"peer-{len(records)}.local"
                    records[fields[4]] = "10.77.0.1"
                    line = " ".join(fields)
                out.append(line)
            return "\\r\\n".join(out)

        loop = asyncio.get_running_loop()
        transport, responder = await loop.create_datagram_endpoint(
            lambda: Responder(records), sock=multicast_socket("10.77.0.1"))
        sig_a, sig_b, log = signaling_pair()
        id_a, id_b = new_id(os.urandom(16)), new_id(os.urandom(16))
        results = await asyncio.gather(
            run_witness(role="initiator", contact_id=id_a, webrtc=WebRtcConfig(),
                        signaling=RewritingSignaling(sig_a, names), store_token=DictStore(),
                        timeout_s=10.0),
            run_witness(role="responder", contact_id=id_b, webrtc=WebRtcConfig(),
                        signaling=sig_b, store_token=DictStore(), timeout_s=10.0))
        transport.close()
        offered = [l.split(" ")[4] for l in log[0][1].splitlines()
                   if l.startswith("a=candidate:")]
        token = craft_token(id_a, id_b)
        print(all(getattr(r, "token", None) == token for r in results),
              bool(offered) and all(a.endswith(".local") for a in offered),
              sorted(set(responder.questions)) == sorted(records))

    asyncio.run(main())
""")


def test_without_restriction_aioice_resolves_the_names_itself(
        namespaces: tuple[str, str]) -> None:
    a, _ = namespaces
    run = subprocess.run(["ip", "netns", "exec", a, sys.executable, "-c", _UNRESTRICTED_PAIR],
                         capture_output=True, text=True, cwd=REPO, timeout=60 * TIME_UNIT)
    assert run.returncode == 0, run.stderr[-2000:]
    # Both completed with the same token; the offer held names only; each name was asked.
    assert run.stdout.split() == ["True", "True", "True"], run.stdout
