"""Client-chosen values stay bounded: ``ns`` in metric labels, and ``ns`` itself.

Every miss once added its ``?ns=`` (up to about 4 KB) as a metric label: 2000
distinct values kept 15.6 MiB and made /metrics 7.6 MB.
"""

from __future__ import annotations

import http.client
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio
from spegeld_harness import PrivateContainerd, SpegeldProcess, build_image

from spegeld.routing import StaticRouter
from spegeld.store import MemoryStore

from ._support import image_in_memory, serving_registry

IMAGE = build_image("example.com/team/app:v1", [1000], seed=91)
LAYER = IMAGE.platforms[0].layers[0]
DISTINCT_NS = 5000
RSS_GROWTH_LIMIT = 5 * 1024 * 1024
METRICS_LIMIT = 64 * 1024


def long_ns(i: int) -> str:
    """A valid registry host of 253 characters, distinct for each ``i``."""
    head = f"r{i:05d}-" + "x" * 56  # 63 characters, the longest label
    return ".".join([head, "y" * 63, "z" * 63, "w" * (253 - len(head) - 3 - 126)])


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


@pytest.fixture
def node(tmp_path: Path) -> Iterator[SpegeldProcess]:
    containerd = PrivateContainerd(tmp_path / "containerd")
    try:
        containerd.start()
        with SpegeldProcess(
            tmp_path / "node", containerd, extra_args=["--static-peer", "127.0.0.1:9"]
        ) as spegeld:
            yield spegeld
    finally:
        containerd.close()


def requests(conn: http.client.HTTPConnection, paths: list[str]) -> list[int]:
    statuses = []
    for path in paths:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        statuses.append(response.status)
    return statuses


@pytest.mark.containerd
@pytest.mark.slow
def test_distinct_ns_values_do_not_grow_memory_or_metrics(node: SpegeldProcess) -> None:
    assert node.pid is not None
    assert len(long_ns(DISTINCT_NS)) == 253
    conn = http.client.HTTPConnection(node.host, node.port, timeout=30)
    try:
        # Warm up: the code paths, the allocator's arenas, the one "other" series.
        warm = [f"/v2/team/app/manifests/v1?ns=warm{i}.example" for i in range(500)]
        assert set(requests(conn, warm)) == {404}
        before = rss(node.pid)
        paths = [
            f"/v2/team/app/{kind}?ns={long_ns(i)}"
            for i in range(DISTINCT_NS)
            for kind in ([f"blobs/{LAYER}"] if i % 2 else ["manifests/v1"])
        ]
        assert set(requests(conn, paths)) == {404}
        after = rss(node.pid)
    finally:
        conn.close()
    status, _, metrics = node.get("/metrics")
    assert status == 200
    growth = after - before
    print(f"RSS {before / 2**20:.1f} -> {after / 2**20:.1f} MiB; /metrics {len(metrics)} bytes")
    assert growth < RSS_GROWTH_LIMIT, f"RSS grew {growth / 2**20:.1f} MiB"
    assert len(metrics) < METRICS_LIMIT, f"/metrics is {len(metrics)} bytes"
    assert b"r00017-" not in metrics
    assert b'registry="other",cache="miss",source="external"' in metrics


@pytest.mark.parametrize(
    "ns",
    [
        "a" * 254,  # past a DNS name's 253 characters
        ".".join(["a" * 63] * 4),  # 255 characters of valid labels
        "a" * 64 + ".example.com",  # a label past 63
        "example.com:65536",
        "[" + "0:" * 30 + "1]",  # an IPv6 literal past 45 characters
        "example.com:5000:1",
        "exa mple.com",
        "x" * 4000,
    ],
)
async def test_an_ns_that_is_no_registry_is_refused_with_name_invalid(ns: str) -> None:
    with trio.fail_after(10):
        async with serving_registry(MemoryStore(), StaticRouter([])) as (_, url):
            async with httpx.AsyncClient(base_url=url) as client:
                response = await client.get("/v2/team/app/manifests/v1", params={"ns": ns})
                metrics = (await client.get("/metrics")).text
    assert response.status_code == 400
    assert response.json()["errors"][0]["code"] == "NAME_INVALID"
    assert ns[:50] not in metrics


async def test_registry_labels_come_from_a_bounded_set() -> None:
    """Configured and well-known registries, and those a tag was served from; else other."""
    with trio.fail_after(10):
        async with serving_registry(
            image_in_memory(IMAGE),
            StaticRouter([]),
            mirrored_registries=frozenset(),
        ) as (_, url):
            async with httpx.AsyncClient(base_url=url) as client:
                for ns in ("docker.io", "random.example", "example.com", "ghcr.io"):
                    await client.get("/v2/team/app/manifests/v9", params={"ns": ns})
                # A tag served under example.com proves it: its misses get their own label.
                hit = await client.get("/v2/team/app/manifests/v1", params={"ns": "example.com"})
                assert hit.status_code == 200
                await client.get("/v2/team/app/manifests/v9", params={"ns": "example.com"})
                metrics = (await client.get("/metrics")).text
    labels = {
        line.split("{", 1)[1].split("}", 1)[0]
        for line in metrics.splitlines()
        if line.startswith("spegel_mirror_requests_total{")
    }
    assert labels == {
        'registry="docker.io",cache="miss",source="external"',
        'registry="ghcr.io",cache="miss",source="external"',
        'registry="other",cache="miss",source="external"',  # random.example, example.com
        'registry="example.com",cache="hit",source="external"',
        'registry="example.com",cache="miss",source="external"',
    }


async def test_configured_registries_are_labels() -> None:
    with trio.fail_after(10):
        async with serving_registry(
            MemoryStore(), StaticRouter([]), mirrored_registries=frozenset({"corp.example:5000"})
        ) as (_, url):
            async with httpx.AsyncClient(base_url=url) as client:
                await client.get("/v2/team/app/manifests/v1", params={"ns": "corp.example:5000"})
                metrics = (await client.get("/metrics")).text
    assert 'registry="corp.example:5000",cache="miss"' in metrics
