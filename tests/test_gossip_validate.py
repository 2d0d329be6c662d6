"""Gossip never trusts a member record blindly: validation, incarnation bounds, bounded state.

Sans-I/O: cores are driven with sealed datagrams and explicit ``now`` values, as a
key holder (a buggy or hostile member) would send them. The same records go over
real UDP to a real daemon in tests/test_gossip_udp.py; the saved-incarnation start
is in tests/test_run.py.
"""

from __future__ import annotations

import logging
import os
import random
import time
from pathlib import Path

import pytest

from spegeld.app._setup import INCARNATION_FILE, START_LIMIT, next_incarnation
from spegeld.errors import ConfigError
from spegeld.gossip import (
    INCARNATION_SLACK,
    MAX_INCARNATION,
    OWN_SLACK,
    GossipConfig,
    GossipCore,
    _core,
    _failure,
    _queue,
)
from spegeld.gossip._codec import MAX_INT, encode_message, encode_sender
from spegeld.gossip._messages import (
    Delta,
    Join,
    Member,
    Message,
    Ping,
    PingReq,
    State,
    StateChunk,
    Summary,
)
from spegeld.gossip._security import Keyring, ReplayWindow, seal
from spegeld.gossip._validate import (
    MAX_CHUNKS,
    valid_gossip_addr,
    valid_mirror_addr,
    valid_name,
)

RING = Keyring([(1, b"s" * 32)])
BASE = 1_700_000_000  # a wall-clock-like starting incarnation, as the daemon uses
ME = ("10.0.0.1", 7946)
THEM = ("10.0.0.3", 7946)


def core(incarnation: int = BASE, name: str = "me") -> GossipCore:
    return GossipCore(
        GossipConfig(name, ME, "10.0.0.1:5000", incarnation), RING, random.Random(1), 0.0
    )


class Sender:
    """A key holder: seals what it says with the cluster key, with fresh sequence numbers."""

    def __init__(self, name: str = "honest") -> None:
        self.name = name
        self.sequence = 0

    def datagram(self, *messages: Message) -> bytes:
        self.sequence += 1
        payload = encode_sender(self.name) + b"".join(encode_message(m) for m in messages)
        return seal(RING, 1, self.sequence, payload)

    def send(self, to: GossipCore, *messages: Message, now: float = 0.0) -> None:
        to.receive(self.datagram(*messages), THEM, now)


def member(
    node: str = "peer",
    incarnation: int = BASE,
    *,
    state: State = State.ALIVE,
    host: str = "10.0.0.2",
    port: int = 7946,
    mirror: str = "10.0.0.2:5000",
    version: int = BASE << 20,
) -> Member:
    return Member(node, incarnation, state, (host, port), mirror, version)


# -- the grammar -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("node-1", True),
        ("ip-10-0-0-1.eu-west-1.compute.internal", True),
        ("Node_7", True),
        ("n" * 253, True),
        ("", False),
        ("-leading", False),
        (".hidden", False),
        ("has space", False),
        ("semi;colon", False),
        ("quote'", False),
        ("slash/x", False),
        ("n" * 254, False),
    ],
)
def test_node_names(name: str, ok: bool) -> None:
    assert valid_name(name) is ok


@pytest.mark.parametrize(
    ("mirror", "ok"),
    [
        ("10.0.0.2:5000", True),
        ("node-1.cluster.local:5000", True),
        ("[fd00::2]:5000", True),
        ("[::ffff:10.0.0.2]:1", True),
        ("localhost:65535", True),
        ("10.0.0.2:http", False),  # a non-numeric port (issue 11)
        ("10.0.0.2:0", False),
        ("10.0.0.2:65536", False),
        ("10.0.0.2:99999", False),
        ("10.0.0.2", False),
        (":5000", False),
        ("fd00::2:5000", False),  # IPv6 must be bracketed
        ("[not-v6]:5000", False),
        ("[1.2.3.4]:5000", False),
        ("ho st:5000", False),
        ("-bad.example:5000", False),
        ("a..b:5000", False),
        ("http://x:5000", False),
        ("x:5000/path", False),
        ("user@x:5000", False),
        ("", False),
        ("r" * 254 + ":1", False),
    ],
)
def test_mirror_addresses(mirror: str, ok: bool) -> None:
    assert valid_mirror_addr(mirror) is ok


@pytest.mark.parametrize(
    ("addr", "ok"),
    [
        (("10.0.0.2", 7946), True),
        (("fd00::2", 7946), True),
        (("10.0.0.2", 0), False),
        (("10.0.0.2", 65536), False),
        (("node-2.example", 7946), False),  # a name would make every send wait on DNS
        (("256.0.0.1", 7946), False),
        (("garbage", 1), False),
    ],
)
def test_gossip_addresses(addr: tuple[str, int], ok: bool) -> None:
    assert valid_gossip_addr(addr) is ok


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (GossipConfig("bad name", ME, "10.0.0.1:5000", 1), "node name"),
        (GossipConfig("me", ("node.example", 7946), "10.0.0.1:5000", 1), "gossip address"),
        (GossipConfig("me", ME, "fd00::1:5000", 1), "mirror address"),
        (GossipConfig("me", ME, "10.0.0.1:5000", MAX_INCARNATION + 1), "32 bits"),
        (GossipConfig("me", ME, "10.0.0.1:5000", -1), "32 bits"),
    ],
)
def test_a_core_refuses_an_identity_its_peers_would_reject(
    config: GossipConfig, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        GossipCore(config, RING, random.Random(1), 0.0)


# -- records that are ignored and counted -----------------------------------------------------

BAD_RECORDS = {
    "registry": member("p1", mirror="10.0.0.2:http"),
    "address": member("p2", host="garbage"),
    "name": member("bad name"),
    "incarnation": member("p3", incarnation=MAX_INCARNATION),
    "version": member("p4", version=MAX_INT),
}


@pytest.mark.parametrize("reason", sorted(BAD_RECORDS))
@pytest.mark.parametrize("carrier", ["member", "summary", "join"])
def test_an_invalid_record_is_ignored_and_counted_wherever_it_rides(
    reason: str, carrier: str
) -> None:
    me = core()
    bad = BAD_RECORDS[reason]
    good = member("honest", mirror="10.0.0.3:5000", host="10.0.0.3")
    messages: dict[str, tuple[Message, ...]] = {
        "member": (bad, good),
        "summary": (Summary((bad, good), True),),
        "join": (Join(bad), good),
    }
    Sender().send(me, *messages[carrier])
    assert [m.node for m in me.members()] == ["honest"], "the honest record still counts"
    assert me.statistics().rejected == {reason: 1}
    assert me.statistics().dropped == {}
    sent = me.datagrams_to_send(0.0)
    assert carrier != "join" or all(b"bad name" not in d for d, _ in sent), (
        "a rejected joiner gets no member list"
    )


def test_a_delta_or_chunk_claiming_an_impossible_version_is_ignored() -> None:
    me = core()
    peer = Sender("peer")
    peer.send(me, member("peer"))
    peer.send(me, Delta("peer", MAX_INT, ("sha256:" + "a" * 64,), ()))
    peer.send(me, StateChunk("peer", MAX_INT, 0, 1, ("sha256:" + "a" * 64,)))
    peer.send(me, StateChunk("peer", (BASE << 20) + 5, 0, MAX_CHUNKS + 1, ()))
    assert me.statistics().rejected == {"version": 1, "chunk": 2}
    assert me.lookup("sha256:" + "a" * 64, 5) == []
    peer = me.members_table.get("peer")
    assert peer is not None and peer.keys.claimed <= (BASE << 20) + 1


def test_chunks_nobody_asked_for_are_not_held() -> None:
    me = core()
    peer = Sender("peer")
    peer.send(me, member("peer", version=0))
    keys = tuple(f"sha256:{i:064x}" for i in range(20))
    for index in range(MAX_CHUNKS):
        peer.send(me, StateChunk("peer", (BASE << 20) + 9, index, MAX_CHUNKS, keys), now=10.0)
    assert me.statistics().rejected == {"unsolicited": MAX_CHUNKS}
    peer = me.members_table.get("peer")
    assert peer is not None and peer.keys._assembling is None


# -- incarnations ------------------------------------------------------------------------------


def test_nobody_can_push_another_member_past_the_horizon() -> None:
    me = core()
    sender = Sender()
    horizon = BASE + INCARNATION_SLACK
    sender.send(me, member("peer", horizon + 1))
    assert me.members() == [] and me.statistics().rejected == {"incarnation": 1}
    sender.send(me, member("peer", horizon))  # a clock 12 days ahead is still believed
    assert me.members()[0].incarnation == horizon
    sender.send(me, member("peer", horizon + 11, state=State.DEAD), now=10.0)
    assert me.members()[0].state == "alive" and me.statistics().rejected == {"incarnation": 2}
    sender.send(me, member("peer", horizon + 10, state=State.DEAD), now=10.0)  # time passed
    assert me.members()[0].state == "dead"


def test_our_own_incarnation_is_never_pushed_past_what_we_need_to_refute() -> None:
    me = core()
    sender = Sender()
    sender.send(me, member("me", BASE + 5, state=State.SUSPECT, host=ME[0]))
    assert me.incarnation == BASE + 6, "a refutation takes one more than the rumour"
    own_horizon = BASE + OWN_SLACK
    sender.send(me, member("me", own_horizon + 1, state=State.SUSPECT, host=ME[0]))
    assert me.incarnation == BASE + 6 and me.statistics().rejected == {"incarnation": 1}
    sender.send(me, member("me", MAX_INCARNATION, state=State.DEAD, host=ME[0]))
    sender.send(me, member("me", MAX_INCARNATION - 1, version=MAX_INT, host=ME[0]))
    assert me.incarnation == BASE + 6
    # The most a key holder can do is walk it to the horizon, which moves with time.
    sender.send(me, member("me", own_horizon, state=State.SUSPECT, host=ME[0]))
    assert me.incarnation == own_horizon + 1
    sender.send(me, member("me", own_horizon + 1, state=State.SUSPECT, host=ME[0]))
    assert me.incarnation == own_horizon + 1
    sender.send(me, member("me", own_horizon + 1, state=State.SUSPECT, host=ME[0]), now=1.0)
    assert me.incarnation == own_horizon + 2
    # Still far inside every peer's horizon, and far from the u32's end.
    assert me.incarnation < BASE + INCARNATION_SLACK < MAX_INCARNATION
    for datagram, _ in me.datagrams_to_send(1.0):
        assert int.from_bytes(datagram[4:8], "big") == me.incarnation


def test_a_core_started_at_the_largest_incarnation_still_seals_and_leaves() -> None:
    me = core(MAX_INCARNATION)
    sender = Sender()
    sender.send(me, member("me", MAX_INCARNATION, state=State.SUSPECT, host=ME[0]), Ping(1))
    me.set_coordinator(True)
    me.leave(0.0)
    assert me.incarnation == MAX_INCARNATION
    for datagram, _ in me.datagrams_to_send(0.0):
        assert int.from_bytes(datagram[4:8], "big") == MAX_INCARNATION


def saved(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / INCARNATION_FILE
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_a_pushed_saved_incarnation_is_clamped_on_load(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    saved(tmp_path, f"{MAX_INCARNATION}\n")
    before = int(time.time())
    with caplog.at_level(logging.WARNING):
        incarnation = next_incarnation(tmp_path)
    assert before <= incarnation <= int(time.time())
    assert "more than 262144 s ahead of the wall clock" in caplog.text
    assert int((tmp_path / INCARNATION_FILE).read_text()) == incarnation
    core(incarnation)  # a core can start there, and seal


@pytest.mark.parametrize(
    "content",
    ["", "garbage\n", "-5\n", "1e9", "4294967296\n", "9" * 5000, b"\xff\xfe12", " +7 "],
)
def test_a_corrupt_saved_incarnation_falls_back_to_the_clock(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: str | bytes
) -> None:
    saved(tmp_path, content)
    before = int(time.time())
    with caplog.at_level(logging.WARNING):
        incarnation = next_incarnation(tmp_path)
    assert before <= incarnation <= int(time.time())
    assert "is not an incarnation" in caplog.text


def test_a_saved_incarnation_is_counted_past(tmp_path: Path) -> None:
    assert next_incarnation(tmp_path) >= int(time.time()) - 1  # no file: the clock
    ahead = int(time.time()) + 100  # an earlier life that refuted a lot
    saved(tmp_path, f"{ahead}\n")
    assert next_incarnation(tmp_path) == ahead + 1
    assert next_incarnation(tmp_path) == ahead + 2
    saved(tmp_path, f"{int(time.time()) + OWN_SLACK - 10}\n")  # pushed, but within bounds
    assert next_incarnation(tmp_path) > int(time.time()) + OWN_SLACK - 10
    (tmp_path / INCARNATION_FILE).unlink()
    (tmp_path / INCARNATION_FILE).mkdir()  # unreadable: a warning, the clock, no crash
    assert next_incarnation(tmp_path) >= int(time.time()) - 1


def test_a_wall_clock_past_2106_starts_below_the_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(time, "time", lambda: float(MAX_INCARNATION + 10))
    assert next_incarnation(tmp_path) == START_LIMIT
    assert next_incarnation(tmp_path) == START_LIMIT
    core(START_LIMIT)


# -- bounded state -----------------------------------------------------------------------------


def test_the_member_table_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_core, "MAX_MEMBERS", 5)
    me = core()
    sender = Sender()
    for i in range(20):
        sender.send(me, member(f"fake-{i}"))
    assert len(me.members()) == 5
    assert me.statistics().rejected == {"members_full": 15}
    sender.send(me, member("fake-0", BASE + 1))  # known members still get news
    sender.send(me, member("me", BASE, state=State.SUSPECT, host=ME[0]))  # and so do we
    assert me.members()[0].incarnation == BASE + 1
    assert me.incarnation == BASE + 1


def test_ping_req_relays_are_bounded_and_only_to_ip_addresses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_failure, "MAX_RELAYS", 8)
    me = core()
    sender = Sender()
    sender.send(me, PingReq(1, "x", ("dns.example", 53)))
    assert me.datagrams_to_send(0.0) == [] and me.statistics().rejected == {"address": 1}
    for seq in range(20):
        sender.send(me, PingReq(seq, "x", ("10.0.0.9", 7946)))
    assert len(me.datagrams_to_send(0.0)) == 8
    assert me.statistics().rejected == {"address": 1, "relays_full": 12}
    sender.send(me, PingReq(99, "x", ("10.0.0.9", 7946)), now=5.0)  # old relays expire
    assert len(me.datagrams_to_send(5.0)) == 1


def test_the_broadcast_queue_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_queue, "MAX_ITEMS", 16)
    me = core()
    peer = Sender("peer")
    peer.send(me, member("peer", version=BASE << 20))
    # Early deltas (versions ahead of the next) are passed on; a flood of new versions
    # must not grow the queue with it.
    for i in range(2, 200):
        peer.send(me, Delta("peer", (BASE << 20) + i, (f"sha256:{i:064x}",), ()))
    assert len(me.transmitter.deltas) <= 16


def test_forged_packets_create_no_state() -> None:
    me = core()
    wrong = Keyring([(1, os.urandom(32))])
    for i in range(2000):
        payload = encode_sender(f"forger-{i}") + encode_message(member(f"fake-{i}"))
        me.receive(seal(wrong, 1, 1, payload), THEM, 0.0)
        me.receive(os.urandom(64 + i % 1000), THEM, 0.0)
    assert me.statistics().dropped == {"bad_mac": 2000, "malformed": 2000}
    assert len(me._replay) == 0 and me.members() == [] and me.datagrams_to_send(0.0) == []


def test_a_sequence_jump_to_the_end_of_the_u32_is_cheap() -> None:
    window = ReplayWindow(window=256)
    assert window.check_and_record("a", 1, 1)
    started = time.process_time()
    assert window.check_and_record("a", 1, 2**32 - 1)
    assert window.check_and_record("a", 1, 2**32 - 256)  # the window is intact after it
    assert not window.check_and_record("a", 1, 2**32 - 257)
    assert not window.check_and_record("a", 1, 1)
    # Was about 1.5 s and a 512 MiB integer (docs/protocol.md §7, now fixed).
    assert time.process_time() - started < 0.1
