"""The record of blobs a peer sent unchecked bytes of (mirror/_unproven.py), and the
discard of their partial writes before a caught peer's response is cut. The discard is a
stand-in here (its order is what is tested); tests/test_corrupt_peer.py runs the real one
against containerd."""

from __future__ import annotations

import trio
import trio.testing

from spegeld.mirror._unproven import DISCARD_TIMEOUT, MAX_ENTRIES, UnprovenBytes
from spegeld.oci import Digest
from spegeld.routing import NodeId, Peer

A = Peer(NodeId("a"), "10.0.0.1:5000")
B = Peer(NodeId("b"), "10.0.0.2:5000")
X = Digest("sha256:" + "1" * 64)
Y = Digest("sha256:" + "2" * 64)


def test_a_liar_names_every_blob_it_sent_unchecked() -> None:
    record = UnprovenBytes(ttl=300)
    record.sent(A, X, now=0)
    record.sent(A, Y, now=1)
    record.sent(B, Y, now=1)
    assert sorted(record.take(A, now=2)) == [X, Y]
    assert record.take(A, now=2) == []  # taken once
    assert record.take(B, now=2) == [Y]


def test_a_proven_blob_and_an_expired_record_name_nothing() -> None:
    record = UnprovenBytes(ttl=10)
    record.sent(A, X, now=0)
    record.sent(B, X, now=0)
    record.proven(X)
    assert record.take(A, now=1) == [] and record.take(B, now=1) == []
    record.sent(A, Y, now=0)
    assert record.take(A, now=11) == []


def test_the_record_is_bounded() -> None:
    record = UnprovenBytes(ttl=300)
    for i in range(MAX_ENTRIES + 100):
        record.sent(Peer(NodeId(f"n{i}"), f"10.0.{i // 256 % 256}.{i % 256}:5000"), X, now=i)
    assert len(record._sent) <= MAX_ENTRIES


async def test_a_second_catch_of_the_same_liar_waits_for_the_first_discard() -> None:
    """Two responses of one liar are caught apart: the first takes every digest and
    discards them one by one; the second, with nothing left to take, must not return
    (and cut its response, ending containerd's pull) before the first is done."""
    record = UnprovenBytes(ttl=300)
    record.sent(A, X, now=0)
    record.sent(A, Y, now=0)
    gate = trio.Event()
    events: list[str] = []

    async def slow_discard(digest: Digest) -> list[str]:
        events.append(f"discard {digest[-1]}")
        await gate.wait()
        return [digest]

    async def caught(name: str) -> None:
        await record.discard([A], 1.0, slow_discard)
        events.append(f"{name} may cut")

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(caught, "first")
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(caught, "second")
            await trio.testing.wait_all_tasks_blocked()
            assert events == ["discard 1"]  # the second waits, not cut yet
            gate.set()
    assert events == ["discard 1", "discard 2", "first may cut", "second may cut"]


async def test_a_discard_that_hangs_ends_at_its_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    record = UnprovenBytes(ttl=300)
    record.sent(A, X, now=0)

    async def hangs(digest: Digest) -> None:
        await trio.sleep_forever()

    with trio.fail_after(30):
        start = trio.current_time()
        await record.discard([A], 1.0, hangs)
    assert trio.current_time() - start == DISCARD_TIMEOUT
