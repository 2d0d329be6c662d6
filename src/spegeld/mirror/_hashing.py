"""SHA-256 of a proxied stream: in a worker thread while a core is spare, else inline.

SHA-256 is the largest single cost of the proxy path. hashlib releases the GIL while it
hashes a large buffer, so a worker thread can hash beside the socket work of the trio
thread, on another core. That parallelism has a price: the worker reads each chunk from
another core's cache, and every chunk crosses threads (a queue, the GIL). Measured on 2
cores (bench/relay_micro.py, 25 MB blobs, GETs taking turns between trees), hashing inline
costs the mirror about 20 % less CPU per blob than in a thread, and a pull's parallel
layers (containerd fetches 3 at once) keep every core busy anyway: there a thread per
stream buys nothing and costs CPU the client needs. So a stream gets a thread only while
fewer than HASH_THREADS of this run's streams have one; the others hash inline.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue

import trio

HASH_IN_THREAD_MIN = 1024 * 1024  # bytes; smaller blobs are hashed inline, no thread hop
HASH_BACKLOG = 8 * 1024 * 1024  # bytes handed to the hashing thread, not yet hashed


def spare_cores() -> int:
    """The CPUs this process may run on, less the trio thread's own."""
    return max(0, len(os.sched_getaffinity(0)) - 1)


class HashThreads:
    """How many streams of one trio run hash in a worker thread, against a ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.busy = 0

    def take(self) -> bool:
        if self.busy >= self.limit:
            return False
        self.busy += 1
        return True

    def give(self) -> None:
        self.busy -= 1


# The hashing threads of the current trio run (a RunVar: state per run, none shared
# between runs or tests). Created on first use with ``spare_cores()`` as the limit.
_THREADS: trio.lowlevel.RunVar[HashThreads] = trio.lowlevel.RunVar("spegeld_hash_threads")


def hash_threads() -> HashThreads:
    """This trio run's hashing-thread count (created with the spare cores as its limit)."""
    try:
        return _THREADS.get()
    except LookupError:
        threads = HashThreads(spare_cores())
        _THREADS.set(threads)
        return threads


class InlineSha256:
    """SHA-256 in the trio thread: for blobs too small to be worth a thread hop."""

    def __init__(self) -> None:
        self._sha = hashlib.sha256()

    async def update(self, chunk: bytes) -> None:
        self._sha.update(chunk)

    async def hexdigest(self) -> str:
        return self._sha.hexdigest()

    def close(self) -> None:
        pass


class ThreadedSha256:
    """SHA-256 of a stream, computed in a worker thread while the trio thread moves bytes.

    hashlib releases the GIL while it hashes a large buffer, so hashing and socket work
    overlap on two cores. One worker per stream keeps the chunks in order; ``update``
    waits while more than ``backlog`` bytes are queued, which bounds memory when the
    hashing falls behind. ``close`` (idempotent) lets the worker end.

    The worker wakes the trio thread only when it waits (a full backlog, or the digest):
    a wake-up per chunk cost a cross-thread hop each (a write to trio's wake-up socket, a
    pass of its loop) for nothing while the trio thread was busy relaying.
    """

    def __init__(self, backlog: int, threads: HashThreads | None = None) -> None:
        self._sha = hashlib.sha256()
        self._threads = threads  # given back its slot when the worker stops
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._backlog = backlog
        self._given = 0  # bytes given to the worker (written by the trio thread only)
        self._hashed = 0  # bytes the worker has hashed (written by the worker only)
        self._waiting = False  # the trio thread is parked until the worker hashes more
        self._finished = False  # the worker has hashed everything and stopped
        self._closed = False
        self._lot = trio.lowlevel.ParkingLot()
        self._token = trio.lowlevel.current_trio_token()
        trio.lowlevel.start_thread_soon(self._work, _ignore, name="spegeld-sha256")

    def _work(self) -> None:  # worker thread
        with contextlib.suppress(trio.RunFinishedError):
            try:
                while (chunk := self._queue.get()) is not None:
                    self._sha.update(chunk)
                    self._hashed += len(chunk)
                    if self._waiting:
                        self._token.run_sync_soon(self._lot.unpark_all)
            finally:
                self._token.run_sync_soon(self._finish)

    def _finish(self) -> None:
        self._finished = True
        if self._threads is not None:
            self._threads.give()
        self._lot.unpark_all()

    async def _wait(self, behind: int) -> None:
        """Until at most ``behind`` bytes wait for the worker, or it has stopped.

        ``_waiting`` is set before the last look at ``_hashed``: a chunk the worker
        finishes after that look finds the flag and wakes this task (both threads hold
        the GIL for these steps, so one of the two sees the other's write)."""
        try:
            while self._given - self._hashed > behind and not self._finished:
                self._waiting = True
                if self._given - self._hashed <= behind:
                    break
                await self._lot.park()
        finally:
            self._waiting = False

    async def update(self, chunk: bytes) -> None:
        self._given += len(chunk)
        self._queue.put(chunk)
        if self._given - self._hashed > self._backlog:
            await self._wait(self._backlog)

    async def hexdigest(self) -> str:
        self.close()
        while not self._finished:
            await self._lot.park()
        return self._sha.hexdigest()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(None)


def stream_hasher(length: int) -> InlineSha256 | ThreadedSha256:
    """The hasher for a stream of ``length`` bytes: a worker thread for a large one while
    this run has a thread slot free (see the module's docstring), else inline."""
    if length >= HASH_IN_THREAD_MIN:
        threads = hash_threads()
        if threads.take():
            return ThreadedSha256(HASH_BACKLOG, threads)
    return InlineSha256()


def _ignore(_: object) -> None:
    pass
