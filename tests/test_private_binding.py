"""The repository binding of a private registry's digests (docs/security.md, point 4).

Credentials are checked for the repository a request names; the binding makes that name
mean something: a digest of a private registry is served only under a name one of its
images has (or when an image of a registry that is not private also reaches it). Real
MirrorServers on loopback with in-memory stores: the rule is the holder's, on both
listeners, so a peer refuses what the edge's request names wrongly. The same through real
containerd and CRI is in tests/test_private_registry_cri.py.
"""

from __future__ import annotations

import httpx
import trio
from spegeld_harness import build_image

from spegeld.oci import Descriptor, Digest, ShareFilter
from spegeld.routing import NodeId, Peer, StaticRouter
from spegeld.store import MemoryStore
from spegeld.store._index import Index, LooseBlob

from ._support import memory_blobs, serving_registry

PRIVATE = "corp.example"
A = build_image(f"{PRIVATE}/team/a:v1", [20_000], seed=141)
B = build_image(f"{PRIVATE}/team/b:v1", [20_000], seed=142)
SHARED = build_image(f"{PRIVATE}/team/c:v1", [20_000], seed=143)  # also public below
IO_TIMEOUT = 20.0  # seconds for one test; each request here takes milliseconds


def _share() -> ShareFilter:
    return ShareFilter.parse(private=[PRIVATE])


def _layer(image: object) -> str:
    return str(image.platforms[0].layers[0])  # type: ignore[attr-defined]


def _store() -> MemoryStore:
    store = MemoryStore(_share())  # the daemon gives its store and its mirror one filter
    for image in (A, B):
        store.add_image(image.name, memory_blobs(image), {image.name: image.digest})
    # One layer set under a private name and a public one: the public image gives it away.
    store.add_image(SHARED.name, memory_blobs(SHARED), {})
    store.add_image("docker.io/library/c:v1", memory_blobs(SHARED), {})
    return store


def test_the_rule() -> None:
    share = _share()
    assert share.names_required and not share.active  # no include/exclude rule is set
    names = [f"{PRIVATE}/team/b:v1", f"{PRIVATE}/team/b@sha256:{'1' * 64}"]
    assert share.serves_under(names, PRIVATE, "team/b")
    assert not share.serves_under(names, PRIVATE, "team/a")  # credentials were for a
    assert not share.serves_under(names, "docker.io", "team/b")  # another registry named
    assert not share.serves_under(names, None, "team/b")  # no ns at all
    assert share.serves_under([*names, "docker.io/library/b:1"], "docker.io", "x")
    assert not share.serves_under([], PRIVATE, "team/b")  # no image names it
    assert not share.serves_under(["no-registry:1"], PRIVATE, "no-registry")
    # Without a private registry nothing is bound.
    assert ShareFilter.parse().serves_under([], None, "anything")


def test_no_loose_blob_while_a_private_registry_is_set() -> None:
    blob = LooseBlob(Descriptor("application/octet-stream", Digest("sha256:" + "9" * 64), 1), 0.0)
    assert Index(_share()).add_loose(blob).added == frozenset()


async def _status(client: httpx.AsyncClient, path: str) -> int:
    return (await client.get(path)).status_code


async def test_a_holder_serves_a_private_digest_only_under_a_name_that_holds_it() -> None:
    with trio.fail_after(IO_TIMEOUT):
        share = _share()
        async with serving_registry(_store(), StaticRouter([]), share=share) as (server, url):
            async with httpx.AsyncClient(base_url=url) as client:
                b_layer = _layer(B)
                assert await _status(client, f"/v2/team/b/blobs/{b_layer}?ns={PRIVATE}") == 200
                assert await _status(client, f"/v2/team/a/blobs/{b_layer}?ns={PRIVATE}") == 404
                assert await _status(client, f"/v2/x/blobs/{b_layer}?ns=docker.io") == 404
                assert await _status(client, f"/v2/team/b/blobs/{b_layer}") == 404  # no ns
                by_digest = f"/manifests/{B.digest}?ns={PRIVATE}"
                assert await _status(client, "/v2/team/b" + by_digest) == 200
                assert await _status(client, "/v2/team/a" + by_digest) == 404
                assert await _status(client, f"/v2/team/a/manifests/v1?ns={PRIVATE}") == 200
                # A layer a public image also holds is served under any name, as before.
                c_layer = _layer(SHARED)
                assert await _status(client, f"/v2/x/blobs/{c_layer}?ns=docker.io") == 200
                assert await _status(client, f"/v2/team/a/blobs/{c_layer}?ns={PRIVATE}") == 200
            metrics = server._metrics_registry.render()
        assert 'spegeld_private_requests_total{decision="unbound"} 4' in metrics


async def test_a_peer_refuses_what_the_edge_request_names_wrongly() -> None:
    """The edge holds nothing and proxies; the holder applies the binding to the target the
    edge forwards (the repository and ``ns`` the edge's credentials were checked for)."""
    with trio.fail_after(IO_TIMEOUT):
        share = _share()
        async with serving_registry(_store(), StaticRouter([]), share=share) as (_, holder):
            peer = Peer(NodeId("holder"), holder.removeprefix("http://"))
            edge_store = MemoryStore(share)
            async with serving_registry(edge_store, StaticRouter([peer]), share=share) as (
                _,
                edge,
            ):
                async with httpx.AsyncClient(base_url=edge) as client:
                    b_layer = _layer(B)
                    right = f"/v2/team/b/blobs/{b_layer}?ns={PRIVATE}"
                    wrong = f"/v2/team/a/blobs/{b_layer}?ns={PRIVATE}"
                    response = await client.get(right)
                    assert response.status_code == 200
                    assert response.headers["docker-content-digest"] == b_layer
                    assert await _status(client, wrong) == 404
