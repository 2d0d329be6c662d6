"""Keep a Router's advertisements equal to a Store's index."""

from __future__ import annotations

from typing import NoReturn

import trio

from spegeld.store import INFLIGHT_PREFIX, Store

from ._protocol import Router


async def advertise_store(
    store: Store, router: Router, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> NoReturn:
    """Advertise the whole index, then every change to it, for as long as it runs."""
    async with store.watch() as (snapshot, changes):
        router.advertise(snapshot.keys())
        task_status.started()
        async for change in changes:
            if change.removed:
                router.withdraw(change.removed)
            # A download starting is news for nodes deciding whether to wait for it now
            # (docs/protocol.md §9): in-flight keys go at once, the rest with the rounds.
            inflight = [key for key in change.added if key.startswith(INFLIGHT_PREFIX)]
            rest = [key for key in change.added if not key.startswith(INFLIGHT_PREFIX)]
            if inflight:
                router.advertise(inflight, urgent=True)
            if rest:
                router.advertise(rest)
    raise AssertionError("a store's watch channel never ends while the store lives")
