"""SHA-256 of proxied streams (mirror/_hashing): digests, the backlog, the thread slots.

Pure in-process: a real hashlib and real worker threads, no sockets (the proxy's use of
the hashers is covered by test_corrupt_peer.py and test_multi_peer*.py).
"""

from __future__ import annotations

import hashlib
import os

import trio

from spegeld.mirror._hashing import (
    HASH_IN_THREAD_MIN,
    InlineSha256,
    ThreadedSha256,
    hash_threads,
    spare_cores,
    stream_hasher,
)

BIG = HASH_IN_THREAD_MIN  # a blob large enough for a thread, when a slot is free


def _chunks(total: int, size: int) -> list[bytes]:
    data = os.urandom(total)
    return [data[i : i + size] for i in range(0, total, size)]


async def test_both_hashers_give_hashlibs_digest() -> None:
    chunks = _chunks(3 * 1024 * 1024 + 17, 200_000)
    expected = hashlib.sha256(b"".join(chunks)).hexdigest()
    with trio.fail_after(10):
        for hasher in (InlineSha256(), ThreadedSha256(backlog=1024 * 1024)):
            for chunk in chunks:
                await hasher.update(chunk)
            assert await hasher.hexdigest() == expected
            hasher.close()  # idempotent after hexdigest


async def test_a_full_backlog_waits_for_the_worker_and_never_loses_a_wakeup() -> None:
    """Backlog 1 byte: every update waits until the worker has hashed everything given.
    The worker wakes the trio thread only when it waits: a lost wake-up hangs here."""
    chunks = _chunks(4096 * 2000, 4096)
    hasher = ThreadedSha256(backlog=1)
    with trio.fail_after(20):
        for chunk in chunks:
            await hasher.update(chunk)
            assert hasher._given - hasher._hashed <= 1  # the bound held when update returned
        assert await hasher.hexdigest() == hashlib.sha256(b"".join(chunks)).hexdigest()


async def test_streams_beyond_the_spare_cores_hash_inline() -> None:
    threads = hash_threads()
    assert threads.limit == spare_cores()
    threads.limit = 1
    with trio.fail_after(10):
        first = stream_hasher(BIG)
        second = stream_hasher(BIG)
        small = stream_hasher(BIG - 1)
        assert isinstance(first, ThreadedSha256)
        assert isinstance(second, InlineSha256)  # the one slot is taken
        assert isinstance(small, InlineSha256)  # too small for a thread in any case
        assert threads.busy == 1
        await first.update(b"x" * 5000)
        await first.hexdigest()  # the worker stops: its slot is free again
        assert threads.busy == 0
        third = stream_hasher(BIG)
        assert isinstance(third, ThreadedSha256)
        third.close()  # closed without a digest (a cut response): the slot comes back too
        while threads.busy:
            await trio.sleep(0.01)
        second.close()
        small.close()


async def test_no_spare_core_means_no_thread() -> None:
    hash_threads().limit = 0
    hasher = stream_hasher(100 * BIG)
    assert isinstance(hasher, InlineSha256)
    await hasher.update(b"abc")
    assert await hasher.hexdigest() == hashlib.sha256(b"abc").hexdigest()


async def test_a_cancelled_wait_leaves_the_hasher_usable() -> None:
    """Cancelled while waiting on a full backlog (the client went away): the waiting flag
    is cleared and the worker still ends when the hasher is closed."""
    hasher = ThreadedSha256(backlog=1)
    threads_before = hash_threads().busy
    with trio.fail_after(10):
        with trio.move_on_after(0):  # cancelled at its first wait
            await hasher.update(b"y" * 10_000_000)
        assert not hasher._waiting
        hasher.close()
        while not hasher._finished:
            await trio.sleep(0.01)
    assert hash_threads().busy == threads_before  # made without a slot: none given back
