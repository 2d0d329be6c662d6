"""Registry filters and the tag quorum (issue 13 items 4 and 5), without containerd.

* ``ShareFilter``: Spegel's ``--registry-filters`` string (``registry/repository[:tag]``,
  searched), include and exclude, exclude wins, bad patterns are a ConfigError.
* The index withholds a digest only when every image that reaches it is filtered out,
  and holds no loose blob while a rule is set.
* The tag quorum between real MirrorServers on loopback addresses: one holder that
  names another digest for a tag turns the answer into a 404 (the upstream decides);
  two agreeing hosts are answered; a digest request is not held to the quorum.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import httpx
import pytest
import trio
from spegeld_harness import build_image

from spegeld.errors import ConfigError
from spegeld.mirror import ProxySettings
from spegeld.oci import Descriptor, Digest, ShareFilter
from spegeld.routing import NodeId, Peer, StaticRouter
from spegeld.store import MemoryStore
from spegeld.store._index import ImageEntry, Index, LooseBlob

from ._support import image_in_memory, memory_blobs, serving_registry

TRUE = build_image("example.com/team/app:v1", [300_000], seed=131)
FALSE = build_image("example.com/team/app:v1", [300_000], seed=132)  # same name, other bytes
TAG_PATH = "/v2/team/app/manifests/v1?ns=example.com"


def test_filter_matches_spegels_string() -> None:
    share = ShareFilter.parse(exclude=[r"^registry\.corp\.example/", r":latest$"])
    assert share.active
    assert not share.shares("registry.corp.example", "team/app", "v1")
    assert not share.shares("docker.io", "library/nginx", "latest")  # a tag rule
    assert share.shares("docker.io", "library/nginx", "1.27")
    assert share.shares("docker.io", "library/nginx")  # a digest request has no tag
    assert not share.shares_image("registry.corp.example/team/app@sha256:" + "a" * 64)
    assert share.shares_image("docker.io/library/nginx:1.27")


def test_include_limits_and_exclude_wins() -> None:
    share = ShareFilter.parse(include=[r"^docker\.io/"], exclude=[r"^docker\.io/private/"])
    assert share.shares("docker.io", "library/nginx", "1")
    assert not share.shares("ghcr.io", "team/app", "1")  # not included
    assert not share.shares("docker.io", "private/app", "1")  # excluded
    assert not share.shares(None, "library/nginx", "1")  # no ns: no rule can apply
    assert not share.shares_image("not-a-reference")


def test_no_rules_share_everything() -> None:
    share = ShareFilter.parse()
    assert not share.active
    assert share.shares(None, "x") and share.shares_image("anything at all")


@pytest.mark.parametrize("bad", ["(", "", "[a-"])
def test_a_bad_pattern_is_a_config_error(bad: str) -> None:
    with pytest.raises(ConfigError, match="--registry-filter"):
        ShareFilter.parse(exclude=[bad])


def _d(n: int) -> Digest:
    return Digest(f"sha256:{n:064x}")


def _entry(*digests: int, tag: str | None = None) -> ImageEntry:
    descs = {_d(n): Descriptor("application/octet-stream", _d(n), 1) for n in digests}
    return ImageEntry(descs, {tag: _d(digests[0])} if tag else {})


def test_index_withholds_a_digest_only_when_every_image_is_filtered() -> None:
    index = Index(ShareFilter.parse(exclude=[r"^corp\.example/"]))
    public = index.put("docker.io/team/app:v1", _entry(1, 2, tag="docker.io/team/app:v1"))
    private = index.put("corp.example/team/app:v1", _entry(3, 2, tag="corp.example/team/app:v1"))
    assert public.added == {_d(1), _d(2), "docker.io/team/app:v1"}
    assert private.added == frozenset()  # digest 2 is held already; 3 and the tag withheld
    assert index.withheld() == 1
    keys = index.snapshot().keys()
    assert _d(3) not in keys and "corp.example/team/app:v1" not in keys
    # The public image goes: the layer it shared with the private one goes with it.
    gone = index.remove("docker.io/team/app:v1")
    assert gone.removed == {_d(1), _d(2), "docker.io/team/app:v1"}
    assert index.snapshot().keys() == frozenset()
    # A full resync agrees with the events.
    index.replace_all({"corp.example/x:1": _entry(4), "docker.io/y:1": _entry(5)})
    assert index.snapshot().keys() == {_d(5)} and index.withheld() == 1


def test_no_loose_blob_while_a_rule_is_set() -> None:
    blob = LooseBlob(Descriptor("application/octet-stream", _d(9), 1), committed_at=0.0)
    assert Index(ShareFilter.parse(include=["^docker"])).add_loose(blob).added == frozenset()
    assert Index().add_loose(blob).added == {_d(9)}


@asynccontextmanager
async def holders(*images: object) -> AsyncIterator[list[Peer]]:
    """One real mirror per image, each on its own loopback address (distinct hosts)."""
    peers = []
    async with AsyncExitStack() as stack:
        for i, image in enumerate(images):
            store = image_in_memory(image)  # type: ignore[arg-type]
            host = f"127.0.0.{20 + i}"
            _, url = await stack.enter_async_context(
                serving_registry(store, StaticRouter([]), host=host)
            )
            peers.append(Peer(NodeId(f"holder-{i}"), url.removeprefix("http://")))
        yield peers


async def _tag_from(peers: list[Peer], quorum: int) -> httpx.Response:
    settings = ProxySettings(tag_quorum=quorum)
    async with serving_registry(MemoryStore(), StaticRouter(peers), proxy=settings) as (_, url):
        async with httpx.AsyncClient(base_url=url) as client:
            return await client.head(TAG_PATH)


async def test_one_liar_cannot_answer_a_tag_under_quorum_2() -> None:
    with trio.fail_after(20):
        async with holders(FALSE, TRUE) as peers:
            assert (await _tag_from(peers, quorum=2)).status_code == 404
            # Quorum 1 takes the first holder's word: the liar's (why the default is 2).
            lied = await _tag_from(peers, quorum=1)
            assert lied.headers["docker-content-digest"] == FALSE.digest


async def test_two_agreeing_hosts_answer_a_tag() -> None:
    with trio.fail_after(20):
        async with holders(FALSE, TRUE, TRUE) as peers:
            answer = await _tag_from(peers, quorum=2)
            assert answer.status_code == 200
            assert answer.headers["docker-content-digest"] == TRUE.digest


async def test_a_single_holder_is_not_enough_but_digests_still_are() -> None:
    with trio.fail_after(20):
        async with holders(TRUE) as peers:
            assert (await _tag_from(peers, quorum=2)).status_code == 404
            settings = ProxySettings(tag_quorum=2)
            router = StaticRouter(peers)
            async with serving_registry(MemoryStore(), router, proxy=settings) as (_, url):
                async with httpx.AsyncClient(base_url=url) as client:
                    by_digest = await client.get(
                        f"/v2/team/app/manifests/{TRUE.digest}?ns=example.com"
                    )
            assert by_digest.status_code == 200


async def test_the_mirror_answers_404_for_a_filtered_request() -> None:
    with trio.fail_after(20):
        share = ShareFilter.parse(exclude=[r"^example\.com/team/"])
        store = MemoryStore(share)  # the daemon gives its store and its mirror one filter
        store.add_image(TRUE.name, memory_blobs(TRUE), {"example.com/team/app:v1": TRUE.digest})
        async with serving_registry(store, StaticRouter([]), share=share) as (_, url):
            async with httpx.AsyncClient(base_url=url) as client:
                layer = TRUE.platforms[0].layers[0]
                for path in (TAG_PATH, f"/v2/team/app/blobs/{layer}?ns=example.com"):
                    response = await client.get(path)
                    assert response.status_code == 404, path
                    assert "registry filters" in response.text
                # The same digest asked for under a shared name: the store withheld it.
                other = await client.get(f"/v2/other/app/blobs/{layer}?ns=example.com")
                assert other.status_code == 404
