"""The mirror's side of coordinated pulls (docs/protocol.md §9), in process: which requests
start a pull, what a lone pull's blob miss does, and when the daemon coordinates at all.
A real MirrorServer on loopback with a shared in-memory router, so what each node
advertises can be read directly."""

from __future__ import annotations

import hashlib
import logging

import httpx
import pytest
import trio

from spegeld.app._node import _coordinates_pulls
from spegeld.mirror._designate import (
    SHOW_GRACE,
    WAIT_FOR_DESIGNATED,
    designated,
    fetching_key,
    pulling_key,
)
from spegeld.oci import Digest, ShareFilter
from spegeld.routing import MemoryCluster, NodeId
from spegeld.store import MemoryStore

from ._support import serving_registry

DIGEST = Digest("sha256:" + hashlib.sha256(b"0").hexdigest())  # b's, of nodes a and b
MANIFEST = "/v2/team/app/manifests/v1?ns=example.com"
BLOB = f"/v2/team/app/blobs/{DIGEST}?ns=example.com"
CONTAINERD = {"User-Agent": "containerd/1.6.20"}


async def get(url: str, path: str, headers: dict[str, str] | None = None) -> float:
    """GET ``path``; it must answer 404 (nothing is held anywhere). Returns the seconds."""
    start = trio.current_time()
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(url + path, headers=headers)
    assert response.status_code == 404
    return trio.current_time() - start


async def test_only_containerds_manifest_requests_start_a_pull() -> None:
    cluster = MemoryCluster()
    router = cluster.router(NodeId("a"), "127.0.0.1:1")
    with trio.fail_after(20):
        async with serving_registry(MemoryStore(), router, coordinate_pulls=True) as (_, url):
            key = pulling_key("example.com/team/app:v1")
            for agent in ("curl/8.5.0", "skopeo/1.13", "Go-http-client/1.1"):
                await get(url, MANIFEST, {"User-Agent": agent})
                assert not cluster.holders(key), agent
            await get(url, MANIFEST, CONTAINERD)
            assert [p.node for p in cluster.holders(key)] == ["a"]


async def test_a_lone_pull_misses_at_once_and_claims_its_fetch(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cluster = MemoryCluster()
    router = cluster.router(NodeId("a"), "127.0.0.1:1")
    caplog.set_level(logging.DEBUG, logger="spegeld.mirror._inflight")
    with trio.fail_after(20):
        async with serving_registry(MemoryStore(), router, coordinate_pulls=True) as (_, url):
            await get(url, MANIFEST, CONTAINERD)
            await get(url, BLOB, CONTAINERD)
            # No settle, no wait for anyone: decided at the first look, with no sleep in
            # between (the miss's own log line; a wall-clock bound would flake under load).
            (decided,) = [
                r.getMessage() for r in caplog.records if "to the upstream" in r.getMessage()
            ]
            assert "to the upstream after 0.000 s" in decided, decided
            assert [p.node for p in cluster.holders(fetching_key(DIGEST))] == ["a"]


async def test_a_co_puller_that_shows_no_download_is_passed_over_after_the_grace() -> None:
    """Node b pulls the same tag (its key is in the router) but never downloads the blob
    (another platform's pull, say): a's miss waits for it at most the grace, not the
    2.5 s bound, then goes to the upstream and claims the blob."""
    cluster = MemoryCluster()
    cluster.router(NodeId("b"), "127.0.0.1:1").advertise([pulling_key("example.com/team/app:v1")])
    router = cluster.router(NodeId("a"), "127.0.0.1:1")
    with trio.fail_after(20):
        async with serving_registry(MemoryStore(), router, coordinate_pulls=True) as (_, url):
            await get(url, MANIFEST, CONTAINERD)
            assert designated(DIGEST, ["a", "b"]) == "b"
            took = await get(url, BLOB, CONTAINERD)
            assert SHOW_GRACE - 0.1 <= took < WAIT_FOR_DESIGNATED
            assert "a" in [p.node for p in cluster.holders(fetching_key(DIGEST))]


@pytest.mark.parametrize(
    ("gossip", "share", "expected"),
    [
        (True, ShareFilter.parse(), True),
        (False, ShareFilter.parse(), False),  # static peers name every peer for every key
        (True, ShareFilter.parse(exclude=[r"^corp\."]), False),  # nothing shared in flight
    ],
)
def test_the_daemon_coordinates_only_with_gossip_and_in_flight_sharing(
    gossip: bool, share: ShareFilter, expected: bool
) -> None:
    assert _coordinates_pulls(True, gossip, share) is expected
    assert _coordinates_pulls(False, gossip, share) is False  # --no-coordinate-pulls
