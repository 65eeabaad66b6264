"""PathChooser.expect_pong: a ping the driver sent for a user (`trionet ping`) proves
a UDP path like the chooser's own, and is forgotten after PING_TIMEOUT like them."""

from __future__ import annotations

from trionet.magicsock.paths import PING_TIMEOUT, PathChooser

PEER = b"\x01" * 32
ADDR = ("192.0.2.7", 41641)


def chooser() -> PathChooser:
    paths = PathChooser()
    paths.upsert_peer(PEER, b"\x02" * 32, 1, [ADDR])
    return paths


def test_a_pong_to_an_expected_ping_proves_the_path() -> None:
    paths = chooser()
    paths.expect_pong(PEER, b"t" * 12, ADDR, 10.0)
    assert paths.on_pong(PEER, b"t" * 12, ADDR, 10.02)
    assert paths.paths_for_send(PEER, 10.03) == (ADDR, 0)  # trusted: UDP only


def test_an_unexpected_txid_proves_nothing() -> None:
    paths = chooser()
    paths.expect_pong(PEER, b"t" * 12, ADDR, 10.0)
    assert not paths.on_pong(PEER, b"u" * 12, ADDR, 10.02)
    assert paths.paths_for_send(PEER, 10.03) == (None, 1)


def test_an_expected_ping_is_forgotten_after_the_timeout() -> None:
    paths = chooser()
    paths.expect_pong(PEER, b"t" * 12, ADDR, 10.0)
    paths.poll(10.0 + PING_TIMEOUT + 0.1)
    assert b"t" * 12 not in paths.peers[PEER].pending


def test_an_unknown_peer_is_ignored() -> None:
    paths = chooser()
    paths.expect_pong(b"\x09" * 32, b"t" * 12, ADDR, 10.0)
    assert set(paths.peers) == {PEER}
