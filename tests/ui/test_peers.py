"""The live peers model (rows come and go with the contact) and the radar's geometry."""

from __future__ import annotations

from datetime import timedelta

from fanny_tui.events import (
    BrokerConnected,
    ChannelOpen,
    ContactClosed,
    HandshakeFailed,
    HandshakeProgress,
    MatchFound,
    PeerUpdate,
    TokenStored,
)
from fanny_tui.ui.formatting import format_state
from fanny_tui.ui.peers import (
    LINGER_S,
    SILENT_S,
    LivePeer,
    LivePeers,
    candidate_pair,
    radar_cells,
)

from .kit import CONTACT, T0


def at(seconds: float):
    return T0 + timedelta(seconds=seconds)


def update(peer: int, distance: float, bearing: float, within: str = "in") -> PeerUpdate:
    return PeerUpdate(peer=peer, distance_m=distance, bearing_deg=bearing, peer_accuracy_m=5.0,
                      within=within, within_s=30.0, samples=6)


def test_a_contact_from_match_to_close_then_gone():
    peers = LivePeers()
    assert peers.apply(MatchFound(peer=1, role="offerer"), at(0))
    assert peers[1].state == "matched" and peers[1].role == "offerer"
    peers.apply(HandshakeProgress(peer=1, state="connecting"), at(0.1))
    peers.apply(ChannelOpen(peer=1, local_candidate="host", remote_candidate="host"), at(0.3))
    assert peers[1].state == "exchanging" and peers[1].candidates == "host"
    peers.apply(update(1, 4.3, 47.0), at(1))
    live = peers[1]
    assert (live.distance_m, live.bearing_deg, live.peer_accuracy_m) == (4.3, 47.0, 5.0)
    assert (live.within, live.within_s, live.samples) == ("in", 30.0, 6)
    peers.apply(TokenStored(peer=1, token="a" * 64, expires_at=at(86_400), contact=CONTACT,
                            match_to_token_s=1.25), at(31))
    assert live.state == "stored" and live.match_to_token_s == 1.25 and live.contact == CONTACT
    peers.apply(ContactClosed(peer=1, reason="parted", contact=CONTACT, token_stored=True),
                at(200))
    assert live.state == "closed" and live.reason == "parted" and live.within_s == 125.0
    assert peers.expire(at(200 + LINGER_S - 0.1)) == [] and 1 in peers   # seen ending
    assert peers.expire(at(200 + LINGER_S)) == [1] and 1 not in peers and len(peers) == 0


def test_the_ice_candidate_types_go_with_the_state():
    assert candidate_pair("host", "host") == "host"
    assert candidate_pair("srflx", "prflx") == "srflx/prflx"
    assert candidate_pair("relay", None) == "relay" and candidate_pair(None, "host") == "host"
    assert candidate_pair(None, None) is None
    peers = LivePeers()
    peers.apply(MatchFound(peer=4, role="answerer"), at(0))
    assert format_state(peers[4].state, peers[4].candidates) == "matched"
    peers.apply(ChannelOpen(peer=4, local_candidate="relay", remote_candidate="relay"), at(1))
    assert format_state(peers[4].state, peers[4].candidates) == "open (relay)"
    peers.apply(HandshakeProgress(peer=4, state="stored"), at(2))
    assert format_state(peers[4].state, peers[4].candidates) == "stored (relay)"


def test_a_failed_exchange_lingers_then_goes():
    peers = LivePeers()
    peers.apply(MatchFound(peer=2, role="answerer"), at(0))
    peers.apply(HandshakeProgress(peer=2, state="failed"), at(20))
    peers.apply(HandshakeFailed(peer=2, reason="handshake timed out"), at(20))
    assert peers[2].state == "failed" and peers[2].reason == "handshake timed out"
    assert peers.expire(at(29)) == []
    assert peers.expire(at(30)) == [2]


def test_a_peer_heard_of_no_more_goes_after_a_silence():
    # An exchange that ends without contact_closed (the paper's token at the first witness).
    peers = LivePeers()
    peers.apply(MatchFound(peer=3, role="offerer"), at(0))
    peers.apply(HandshakeProgress(peer=3, state="stored"), at(1))
    assert peers.expire(at(1 + SILENT_S - 1)) == []
    peers.apply(update(3, 8.0, 180.0), at(30))                 # a sample keeps it live
    assert peers.expire(at(1 + SILENT_S)) == []
    assert peers.expire(at(30 + SILENT_S)) == [3]


def test_match_to_token_is_measured_here_when_the_engine_does_not_say():
    peers = LivePeers()
    peers.apply(MatchFound(peer=4, role="offerer"), at(0))
    peers.apply(TokenStored(peer=4, token="b" * 64, expires_at=at(86_400)), at(2.5))
    assert peers[4].match_to_token_s == 2.5
    # Without the match seen, nothing is made up.
    peers.apply(TokenStored(peer=5, token="c" * 64, expires_at=at(86_400)), at(3))
    assert peers[5].match_to_token_s is None and peers[5].role == "?"


def test_the_same_ordinal_matched_again_after_it_ended_starts_afresh():
    peers = LivePeers()
    peers.apply(MatchFound(peer=6, role="offerer"), at(0))
    peers.apply(HandshakeFailed(peer=6, reason="x"), at(1))
    peers.apply(MatchFound(peer=6, role="answerer"), at(2))
    assert peers[6].state == "matched" and peers[6].reason is None and peers[6].ended_at is None


def test_other_events_change_nothing():
    peers = LivePeers()
    assert not peers.apply(BrokerConnected(url="ws://127.0.0.1:1", radius_m=10.0), at(0))
    assert len(peers) == 0


# -- radar ------------------------------------------------------------------------------------


def peer(number: int, distance: float | None, bearing: float | None,
         within: str = "in") -> LivePeer:
    return LivePeer(number, "offerer", "exchanging", T0, T0, distance_m=distance,
                    bearing_deg=bearing, within=within)


def find(grid, char: str) -> list[tuple[int, int]]:
    return [(x, y) for y, row in enumerate(grid) for x, cell in enumerate(row)
            if cell is not None and cell.char == char]


def test_the_radar_puts_peers_at_their_bearing_and_distance():
    width, height = 41, 21                                    # centre (20, 10)
    grid = radar_cells([peer(1, 10.0, 0.0), peer(2, 10.0, 90.0), peer(3, 5.0, 180.0),
                        peer(4, 10.0, 270.0), peer(5, None, None)], 10.0, width, height)
    assert len(grid) == height and all(len(row) == width for row in grid)
    assert find(grid, "◉") == [(20, 10)]
    # Edge at twice the radius = 10 rows up/down, 20 columns left/right (cells ~ 1:2).
    assert find(grid, "1") == [(20, 5)]                       # north, one radius: 5 rows up
    assert find(grid, "2") == [(30, 10)]                      # east: 10 columns right
    assert find(grid, "3") == [(20, 12)]                      # south, half a radius
    assert find(grid, "4") == [(10, 10)]
    assert find(grid, "5") == []                              # no sample yet: not drawn
    assert grid[10][30].kind == "peer-in"
    assert find(grid, "N") == [(20, 0)] and find(grid, "S") == [(20, 20)]
    assert find(grid, "E") == [(40, 10)] and find(grid, "W") == [(0, 10)]
    rings = [(x, y) for y, row in enumerate(grid) for x, c in enumerate(row)
             if c is not None and c.kind == "ring"]
    assert (20, 5) not in rings and (20, 15) in rings          # the radius ring, due south


def test_a_far_peer_is_drawn_inside_the_edge_with_an_arrow_and_dim():
    grid = radar_cells([peer(7, 500.0, 0.0, within="out"), peer(8, 90.0, 90.0)],
                       10.0, 41, 21)
    assert find(grid, "↑") == [(20, 0)] and grid[0][20].kind == "peer-far"   # on the edge
    [(x, y)] = find(grid, "7")
    assert (x, y) == (20, 1) and grid[y][x].kind == "peer-far"               # just inside
    assert find(grid, "→") == [(40, 10)]                                     # due east
    [(x, y)] = find(grid, "8")
    assert (x, y) == (38, 10) and grid[y][x].kind == "peer-far"


def test_peers_at_one_place_are_all_drawn_apart():
    # Three peers in the same cell, one on this device's own cell, one a column away.
    close = [peer(1, 5.0, 180.0), peer(2, 5.0, 180.0), peer(3, 5.0, 180.0),
             peer(4, 0.2, 0.0), peer(5, 5.0, 170.0)]
    grid = radar_cells(close, 10.0, 41, 21)
    assert find(grid, "◉") == [(20, 10)]                      # never hidden by a peer
    places = {str(n): find(grid, str(n)) for n in range(1, 6)}
    assert all(len(cells) == 1 for cells in places.values()), places
    assert places["1"] == [(20, 12)]                          # the first keeps its place
    cells = [cells[0] for cells in places.values()]
    for x, y in cells:                                        # no digit touches another
        assert (x - 1, y) not in cells and (x + 1, y) not in cells, cells
        assert abs(x - 20) <= 5 and abs(y - 12) <= 3          # and each stays near its place


def test_every_peer_is_drawn_on_a_radar_at_80x24():
    # The radar's content at 80x24 (narrow, short, `r`): 76 x 10 cells.
    live = [peer(n, 3.0 + 0.1 * n, 150.0 + n, "in") for n in range(1, 7)]
    grid = radar_cells(live, 15.0, 76, 10)
    assert all(len(find(grid, str(n))) == 1 for n in range(1, 7))


def test_verdicts_are_kinds():
    grid = radar_cells([peer(1, 12.0, 45.0, "uncertain"), peer(2, 15.0, 225.0, "out")],
                       10.0, 41, 21)
    [(x1, y1)], [(x2, y2)] = find(grid, "1"), find(grid, "2")
    assert grid[y1][x1].kind == "peer-uncertain" and grid[y2][x2].kind == "peer-out"
    assert x1 > 20 and y1 < 10 and x2 < 20 and y2 > 10        # NE and SW of the centre


def test_a_tiny_radar_is_empty_not_an_error():
    assert radar_cells([peer(1, 1.0, 0.0)], 10.0, 1, 1) == [[None]]
