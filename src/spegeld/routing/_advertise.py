"""Keep a Router's advertisements equal to a Store's index."""

from __future__ import annotations

from typing import NoReturn

import trio

from spegeld.store import Store

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
            if change.added:
                router.advertise(change.added)
    raise AssertionError("a store's watch channel never ends while the store lives")
