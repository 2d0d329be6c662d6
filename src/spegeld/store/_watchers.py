"""Fan-out of index changes to every open ``watch()``."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import trio

from ._protocol import KeysChanged, Snapshot


class Watchers:
    def __init__(self) -> None:
        self._channels: set[trio.MemorySendChannel[KeysChanged]] = set()

    def publish(self, change: KeysChanged) -> None:
        if not change.added and not change.removed:
            return
        for channel in list(self._channels):
            # Unbounded on purpose: a change is small and a watcher must see every one.
            channel.send_nowait(change)

    @asynccontextmanager
    async def open(
        self, snapshot: Callable[[], Snapshot]
    ) -> AsyncIterator[tuple[Snapshot, trio.MemoryReceiveChannel[KeysChanged]]]:
        send, receive = trio.open_memory_channel[KeysChanged](math.inf)
        # Snapshot and registration happen without a checkpoint between them,
        # so no change can fall in the gap.
        self._channels.add(send)
        current = snapshot()
        try:
            async with receive:
                yield current, receive
        finally:
            self._channels.discard(send)
            send.close()
