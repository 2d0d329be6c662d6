"""The record of blobs a peer sent unchecked bytes of (registry/_unproven.py)."""

from __future__ import annotations

from spegeld.mirror._unproven import MAX_ENTRIES, UnprovenBytes
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
