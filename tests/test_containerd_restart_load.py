"""containerd killed (-9) and restarted again and again while the client is busy.

A lost connection can surface from grpclib, h2 or the trio-asyncio bridge in many
shapes (an ``AttributeError`` inside ``create_stream`` was seen in CI). Whatever the
timing, every call must end in a spegeld error or succeed, and the client must work
again once containerd is back.
"""

from __future__ import annotations

import random
from collections import Counter
from contextlib import aclosing
from pathlib import Path

import pytest
import trio
import trio.lowlevel
from spegeld_harness import PrivateContainerd, build_image

from spegeld.containerd import TOPIC_FILTERS, ContainerdClient, open_containerd
from spegeld.errors import ContainerdError, NotFound
from spegeld.oci import Digest

from ._support import import_image

pytestmark = pytest.mark.containerd

MiB = 1024 * 1024
CYCLES = 25  # kill -9 + start cycles; the CI race showed within a handful
RUN_LIMIT = 120  # seconds for the whole test, a hard bound


async def busy(client: ContainerdClient, kind: str, layer: Digest, counts: Counter[str]) -> None:
    """One kind of call in a loop; only spegeld errors may come out of a call."""
    while True:
        try:
            if kind == "read":
                async with aclosing(client.read(layer)) as chunks:  # closed when cancelled
                    async for _ in chunks:
                        await trio.lowlevel.checkpoint()
            elif kind == "read_all":
                await client.read_all(layer, limit=8 * MiB)
            elif kind == "list":
                await client.list_content()
                await client.list_images()
            elif kind == "version":
                await client.version()
            elif kind == "info":
                await client.info(layer)
            elif kind == "subscribe":
                async with client.subscribe(TOPIC_FILTERS) as events:
                    with trio.move_on_after(0.2):
                        async for _ in events:
                            pass
            counts[f"{kind}:ok"] += 1
        except (ContainerdError, NotFound) as exc:
            counts[f"{kind}:mapped"] += 1
            counts[f"cause:{type(exc.__cause__).__name__}"] += 1
            await trio.sleep(0.002)


async def test_every_error_of_a_lost_connection_is_mapped_under_load(
    containerd: PrivateContainerd, tmp_path: Path
) -> None:
    image = build_image("example.com/churn/app:v1", [2 * MiB], seed=81, compresslevel=0)
    layer = Digest(image.platforms[0].layers[0])
    kinds = ["read", "read", "read_all", "list", "version", "info", "subscribe"]
    counts: Counter[str] = Counter()
    rng = random.Random(81)
    with trio.fail_after(RUN_LIMIT):
        await import_image(containerd, image, trio.Path(tmp_path))
        async with open_containerd(containerd.socket, containerd.namespace) as client:
            async with trio.open_nursery() as nursery:
                for kind in kinds:
                    nursery.start_soon(busy, client, kind, layer, counts)
                for _ in range(CYCLES):
                    await trio.sleep(rng.uniform(0.02, 0.25))
                    await trio.to_thread.run_sync(containerd.kill)
                    await trio.sleep(rng.uniform(0, 0.05))
                    await trio.to_thread.run_sync(containerd.start)
                # Back for good: every kind of call succeeds again.
                before = counts.copy()
                with trio.fail_after(20):
                    while any(counts[f"{k}:ok"] <= before[f"{k}:ok"] for k in kinds):
                        await trio.sleep(0.05)
                nursery.cancel_scope.cancel()
    print(dict(sorted(counts.items())))
    assert sum(v for k, v in counts.items() if k.endswith(":mapped")) >= CYCLES // 2, counts
