"""SHA-256 of a proxied stream, in a worker thread for large blobs.

SHA-256 is the largest single cost of the proxy path; hashlib releases the GIL while it
hashes a large buffer, so a worker thread hashes beside the socket work of the trio
thread, on the second core.
"""

from __future__ import annotations

import contextlib
import hashlib
import queue

import trio

HASH_IN_THREAD_MIN = 1024 * 1024  # bytes; smaller blobs are hashed inline, no thread hop
HASH_BACKLOG = 8 * 1024 * 1024  # bytes handed to the hashing thread, not yet hashed


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
    """

    def __init__(self, backlog: int) -> None:
        self._sha = hashlib.sha256()
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._backlog = backlog
        self._queued = 0  # bytes given to the worker and not yet hashed (trio thread only)
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
                    self._token.run_sync_soon(self._hashed, len(chunk))
            finally:
                self._token.run_sync_soon(self._finish)

    def _hashed(self, size: int) -> None:
        self._queued -= size
        self._lot.unpark_all()

    def _finish(self) -> None:
        self._finished = True
        self._lot.unpark_all()

    async def update(self, chunk: bytes) -> None:
        self._queued += len(chunk)
        self._queue.put(chunk)
        while self._queued > self._backlog and not self._finished:
            await self._lot.park()

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
    """The hasher for a stream of ``length`` bytes."""
    return ThreadedSha256(HASH_BACKLOG) if length >= HASH_IN_THREAD_MIN else InlineSha256()


def _ignore(_: object) -> None:
    pass
