"""Helpers shared by tests: bounded waits and image plumbing."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import trio
from spegeld_harness import (
    BuiltImage,
    HarnessUnavailable,
    Network,
    PrivateContainerd,
    SpegeldProcess,
)

from spegeld.metrics import MetricsRegistry
from spegeld.mirror import MirrorServer, MirrorSettings
from spegeld.oci import Digest, parse_reference
from spegeld.routing import Router
from spegeld.store import MemoryStore, Store

POLL = 0.01  # seconds between checks of a condition that events make true


async def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll until ``condition()`` holds; return how long it took, or fail after ``timeout``."""
    start = trio.current_time()
    with trio.move_on_after(timeout):
        while not condition():
            await trio.sleep(POLL)
        return trio.current_time() - start
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def router_knows(router: Router, key: str, holder: str) -> bool:
    """Whether ``router`` names ``holder`` among the holders of ``key``."""
    return any(peer.node == holder for peer in router.lookup(key, 10))


def expected_keys(image: BuiltImage, platform: str | None = None) -> set[str]:
    tag_key = parse_reference(image.name).tag_key()
    assert tag_key is not None
    return image.digests(platform) | {tag_key}


async def import_image(node: PrivateContainerd, image: BuiltImage, tmp: trio.Path) -> None:
    archive = await trio.to_thread.run_sync(image.write_oci_archive, tmp / "image.tar")
    await trio.to_thread.run_sync(node.import_image, archive)


async def remove_image(node: PrivateContainerd, name: str) -> None:
    await trio.to_thread.run_sync(node.remove_image, name)


def memory_blobs(image: BuiltImage) -> dict[Digest, tuple[str, bytes]]:
    return {Digest(d): (info.media_type, image.read_blob(d)) for d, info in image.blobs.items()}


@asynccontextmanager
async def serving_registry(
    store: Store,
    router: Router,
    *,
    host: str = "127.0.0.1",
    discard_partial: Callable[[Digest], Awaitable[object]] | None = None,
    **settings: Any,
) -> AsyncIterator[tuple[MirrorServer, str]]:
    """A real MirrorServer on a free loopback port, with its base URL; shut down on exit."""
    registry = MirrorServer(
        store,
        router,
        MetricsRegistry(),
        MirrorSettings(host=host, port=0, **settings),
        ready=lambda: True,
        status=lambda: {"node": "test"},
        discard_partial=discard_partial,
    )
    async with trio.open_nursery() as nursery:
        ((bound_host, port), *_) = await nursery.start(registry.run)
        try:
            yield registry, f"http://{bound_host}:{port}"
        finally:
            registry.shutdown()


def image_in_memory(image: BuiltImage) -> MemoryStore:
    store = MemoryStore()
    tag_key = parse_reference(image.name).tag_key()
    assert tag_key is not None
    store.add_image(image.name, memory_blobs(image), {tag_key: Digest(image.digest)})
    return store


def wait_for(
    condition: Callable[[], bool], timeout: float, what: str, *, poll: float = 0.05
) -> float:
    """Poll ``condition`` (from sync code) until it holds; how long it took.

    Fails after ``timeout`` seconds, naming ``what`` it waited for.
    """
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll)
    return time.monotonic() - start


def configure_hosts(hosts_dir: Path, mirror: str, upstream: str) -> None:
    """``spegeld configure containerd`` (the real CLI): ``upstream`` mirrored by ``mirror``."""
    result = subprocess.run(
        [sys.executable, "-m", "spegeld", "configure", "containerd", "--config-path", str(hosts_dir),
         "--mirror-target", mirror, "--mirrored-registries", upstream],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def count_sendfile(monkeypatch: Any) -> list[int]:
    """The registry's sendfile bodies, one entry (its length) per body sent."""
    from spegeld.mirror import _http

    calls: list[int] = []
    original = _http.sendfile

    async def counting(stream: trio.SocketStream, body: _http.FileBody, timeout: float) -> None:
        calls.append(body.length)
        await original(stream, body, timeout)

    monkeypatch.setattr(_http, "sendfile", counting)
    return calls


@contextmanager
def created_network(net: Network) -> Iterator[Network]:
    """``net``'s namespaces for one test, removed after it; a failure to create them fails
    the test (a network test must not be skipped)."""
    import pytest

    try:
        try:
            net.create()
        except HarnessUnavailable as exc:
            pytest.fail(f"{exc} (this test must not be skipped)")
        yield net
    finally:
        net.close()


def upstream_waits(node: SpegeldProcess, start: int) -> list[float]:
    """How long each blob miss of the node's pulls waited before it went to the upstream
    (``Designation``'s debug lines in its log, from byte ``start``)."""
    with node.log_path.open("rb") as f:
        f.seek(start)
        text = f.read().decode(errors="replace")
    waits = []
    for raw in text.splitlines():
        try:
            entry = json.loads(raw)
        except ValueError:
            continue
        msg = entry.get("msg", "") if isinstance(entry, dict) else ""
        if isinstance(msg, str) and " to the upstream after " in msg:
            waits.append(float(msg.split(" after ")[1].split(" s ")[0]))
    return waits
