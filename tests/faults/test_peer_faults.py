"""A peer vanishes in the middle of a witness handshake (scenario 4 in tests.faults.scenarios).

Real ``fanny-tui --headless`` processes and a real broker on loopback: the peer is SIGKILLed or
SIGSTOPped after its handshake started (deterministically: the survivor is frozen until then),
or SIGKILLed at a seeded random moment of a live handshake.
"""

from __future__ import annotations

import signal

import pytest

from .scenarios import HANDSHAKE_TIMEOUT_S, peer_killed_at_random, peer_vanishes_mid_handshake


@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP], ids=["SIGKILL", "SIGSTOP"])
async def test_peer_vanishing_mid_handshake_times_out_cleanly_and_pair_matches_again(
        tmp_path, fault):
    # Asserted inside: the survivor fails with timeout or channel_closed within
    # HANDSHAKE_TIMEOUT_S + DEADLINE_MARGIN_S, both stores list no token, and the pair (or a
    # new peer) then matches and both store the same complete token.
    figures = await peer_vanishes_mid_handshake(tmp_path, fault=fault)
    print(f"{figures} (handshake_timeout_s {HANDSHAKE_TIMEOUT_S} s)")


async def test_peer_killed_at_a_random_moment_leaves_consistent_stores(tmp_path):
    # Asserted inside: the survivor's exchange ends in time; a failure left no token; stored
    # tokens are complete and equal; the survivor then witnesses a new device.
    print(await peer_killed_at_random(tmp_path, seed=8))
