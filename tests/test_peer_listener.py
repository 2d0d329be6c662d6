"""The mirror's three listeners over real sockets: the peer listener wants node
authentication (401 with an OCI body, counted by reason), serves only the pull API and
never proxies on; the metrics listener serves only /metrics and /status; a node proxies
to a peer's peer listener with a signed request, and a peer's 401 is a failed peer."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio
from spegeld_harness import build_image

from spegeld.metrics import MetricsRegistry
from spegeld.mirror import Listen, MirrorServer, MirrorSettings, PeerKeys, sign
from spegeld.routing import NodeId, Peer, Router, StaticRouter
from spegeld.store import MemoryStore, Store

from ._support import image_in_memory

IMAGE = build_image("example.com/team/app:v1", [300_000], seed=131)
LAYER = IMAGE.platforms[0].layers[0]
BLOB = f"/v2/team/app/blobs/{LAYER}?ns=example.com".encode()
KEY_1 = (1, b"\x11" * 32)
KEY_2 = (2, b"\x22" * 32)
TIMEOUT = 10


@dataclass
class Node:
    server: MirrorServer
    metrics: MetricsRegistry
    mirror: str  # host:port
    peer: str
    metrics_addr: str | None

    def sample(self, line: str) -> float:
        for text in self.metrics.render().splitlines():
            name, _, value = text.rpartition(" ")
            if name == line:
                return float(value)
        return 0.0


def _addr(addresses: list[tuple[str, int]]) -> str:
    host, port = addresses[0]
    return f"{host}:{port}"


@asynccontextmanager
async def node(
    store: Store,
    router: Router,
    keys: PeerKeys | None,
    *,
    metrics_listener: bool = False,
) -> AsyncIterator[Node]:
    registry = MetricsRegistry()
    settings = MirrorSettings(
        host="127.0.0.1",
        port=0,
        peer=Listen("127.0.0.1", 0),
        metrics=Listen("127.0.0.1", 0) if metrics_listener else None,
    )
    server = MirrorServer(
        store,
        router,
        registry,
        settings,
        ready=lambda: True,
        status=lambda: {"node": "test"},
        peer_keys=keys,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        try:
            yield Node(
                server,
                registry,
                _addr(server.addresses),
                _addr(server.peer_addresses),
                _addr(server.metrics_addresses) if metrics_listener else None,
            )
        finally:
            server.shutdown()


@dataclass
class Answer:
    status: int
    headers: dict[str, str]

    def header(self, name: bytes) -> str | None:
        return self.headers.get(name.decode())


def _http(
    address: str, target: bytes, headers: Sequence[tuple[bytes, bytes]], method: bytes
) -> tuple[Answer, bytes]:
    host, _, port = address.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request(
            method.decode(), target.decode(), headers={k.decode(): v.decode() for k, v in headers}
        )
        response = conn.getresponse()
        answer = Answer(response.status, {k.lower(): v for k, v in response.getheaders()})
        return answer, response.read()
    finally:
        conn.close()


async def get(
    address: str, target: bytes, headers: Sequence[tuple[bytes, bytes]] = (), method: bytes = b"GET"
) -> tuple[Answer, bytes]:
    """One plain HTTP request (as containerd or a curl would send it) in a thread."""
    return await trio.to_thread.run_sync(_http, address, target, headers, method)


def signed(
    keys: PeerKeys, target: bytes = BLOB, *, now: float | None = None
) -> list[tuple[bytes, bytes]]:
    header = sign(b"GET", target, time.time() if now is None else now, keys)
    assert header is not None
    return [(b"x-spegeld-auth", header)]


def oci_code(body: bytes) -> str:
    return str(json.loads(body)["errors"][0]["code"])


async def test_the_peer_listener_refuses_every_request_without_a_good_signature() -> None:
    with trio.fail_after(TIMEOUT):
        async with node(image_in_memory(IMAGE), StaticRouter([]), PeerKeys("a", (KEY_1,))) as a:
            sender = PeerKeys("b", (KEY_1,))
            good = signed(sender)
            response, body = await get(a.peer, BLOB, good)
            assert response.status == 200 and body == IMAGE.read_blob(LAYER)
            cases = {
                "missing": [],
                "malformed": [(b"x-spegeld-auth", b"v1 key=1 node=b")],
                "unknown_key": signed(PeerKeys("b", (KEY_2,))),
                "bad_signature": signed(PeerKeys("b", ((1, b"\x99" * 32),))),
                "stale": signed(sender, now=time.time() - 120),
                "replay": good,
            }
            for reason, headers in cases.items():
                response, body = await get(a.peer, BLOB, headers)
                assert response.status == 401, reason
                assert oci_code(body) == "UNAUTHORIZED", reason
                assert reason in json.loads(body)["errors"][0]["message"]
                assert response.header(b"www-authenticate") is not None
                assert a.sample(f'spegeld_peer_auth_failures_total{{reason="{reason}"}}') == 1
            # The same blob on the mirror listener (containerd's, loopback) needs nothing.
            response, body = await get(a.mirror, BLOB)
            assert response.status == 200 and body == IMAGE.read_blob(LAYER)
            # HEAD is signed over its own method.
            head = sign(b"HEAD", BLOB, time.time(), sender)
            assert head is not None
            response, _ = await get(a.peer, BLOB, [(b"x-spegeld-auth", head)], b"HEAD")
            assert response.status == 200


async def test_the_peer_listener_serves_only_the_pull_api_and_metrics_only_metrics() -> None:
    keys = PeerKeys("a", (KEY_1,))
    with trio.fail_after(TIMEOUT):
        async with node(image_in_memory(IMAGE), StaticRouter([]), keys, metrics_listener=True) as a:
            assert a.metrics_addr is not None
            for path in (b"/status", b"/metrics", b"/healthz", b"/readyz"):
                response, body = await get(a.peer, path, signed(keys, path))
                assert response.status == 404 and oci_code(body) == "NOT_FOUND", path
                # ...unsigned too: 404, not a 401 that would say the path exists there.
                assert (await get(a.peer, path))[0].status == 404
                assert (await get(a.mirror, path))[0].status == 200, path
            response, body = await get(a.metrics_addr, b"/metrics")
            assert response.status == 200 and b"spegeld_peer_auth_failures_total" in body
            assert (await get(a.metrics_addr, b"/status"))[0].status == 200
            for path in (BLOB, b"/v2/", b"/healthz"):
                assert (await get(a.metrics_addr, path))[0].status == 404, path
            response, _ = await get(a.peer, b"/v2/", signed(keys, b"/v2/"))
            assert response.status == 200


async def test_a_node_proxies_to_its_peers_peer_listener_signed() -> None:
    with trio.fail_after(TIMEOUT):
        holder = image_in_memory(IMAGE)
        async with node(holder, StaticRouter([]), PeerKeys("a", (KEY_2, KEY_1))) as a:
            router = StaticRouter([Peer(NodeId("a"), a.peer)])
            async with node(MemoryStore(), router, PeerKeys("b", (KEY_1,))) as b:
                response, body = await get(b.mirror, BLOB, method=b"GET")
                assert response.status == 200 and body == IMAGE.read_blob(LAYER)
                # Rotation: b now signs with key 2, which a also holds.
                b.server.set_peer_keys(PeerKeys("b", (KEY_2, KEY_1)))
                response, body = await get(b.mirror, BLOB)
                assert response.status == 200 and body == IMAGE.read_blob(LAYER)
                assert sum(a.sample(f'spegeld_peer_auth_failures_total{{reason="{r}"}}')
                           for r in ("missing", "bad_signature", "unknown_key")) == 0  # fmt: skip


async def test_a_peer_that_answers_401_is_a_failed_peer_and_the_client_gets_404() -> None:
    with trio.fail_after(TIMEOUT):
        async with node(image_in_memory(IMAGE), StaticRouter([]), PeerKeys("a", (KEY_1,))) as a:
            router = StaticRouter([Peer(NodeId("a"), a.peer)])
            # Another cluster's key under the same id; then no key at all (an old node).
            for keys in (PeerKeys("b", ((1, b"\x99" * 32),)), None):
                async with node(MemoryStore(), router, keys) as b:
                    started = trio.current_time()
                    response, body = await get(b.mirror, BLOB)
                    assert response.status == 404 and oci_code(body) == "BLOB_UNKNOWN"
                    assert trio.current_time() - started < 1
                    assert b.sample('spegeld_proxy_errors_total{reason="unauthorized"}') == 1
                    # Skipped like an unreachable peer: the next request does not ask it.
                    assert (await get(b.mirror, BLOB))[0].status == 404
                    assert b.sample('spegeld_proxy_errors_total{reason="unauthorized"}') == 1
            assert a.sample('spegeld_peer_auth_failures_total{reason="bad_signature"}') == 1
            assert a.sample('spegeld_peer_auth_failures_total{reason="missing"}') == 1


async def test_the_peer_listener_never_proxies_on() -> None:
    with trio.fail_after(TIMEOUT):
        async with node(image_in_memory(IMAGE), StaticRouter([]), PeerKeys("c", (KEY_1,))) as c:
            router = StaticRouter([Peer(NodeId("c"), c.peer)])
            async with node(MemoryStore(), router, PeerKeys("a", (KEY_1,))) as a:
                keys = PeerKeys("b", (KEY_1,))
                response, body = await get(a.peer, BLOB, signed(keys))
                assert response.status == 404 and oci_code(body) == "BLOB_UNKNOWN"
                # a's own mirror listener does proxy to c.
                assert (await get(a.mirror, BLOB))[0].status == 200


async def test_without_a_cluster_key_the_peer_listener_checks_nothing() -> None:
    with trio.fail_after(TIMEOUT):
        async with node(image_in_memory(IMAGE), StaticRouter([]), None) as a:
            response, body = await get(a.peer, BLOB)
            assert response.status == 200 and body == IMAGE.read_blob(LAYER)
            assert (await get(a.peer, b"/status"))[0].status == 404
