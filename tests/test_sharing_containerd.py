"""Registry filters and the tag quorum with real components (issue 13 items 4 and 5).

* A real ContainerdStore with a filter, on containerd 1.6 and 2.3 (2.3 sends content
  events: the loose blobs of a private pull must not be advertised either): the keys it
  gives the router never include a private image's digests or tag.
* ``spegeld run`` daemons and ``ctr`` pulls through the mirror: a holder with
  ``--registry-filter`` serves its public image to a peer but not its private one (the
  upstream is down: only peers could have served it).
* A lying daemon: its containerd holds another image under the tag everyone pulls. With
  the default ``--tag-quorum 2`` the tag goes to the upstream, and the puller gets the
  true image; its blobs still come from the honest peer.

The recording router is a stand-in on purpose: it is the router's input being checked.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
import trio
from spegeld_harness import (
    PrivateContainerd,
    SpegeldProcess,
    UpstreamRegistry,
    build_image,
    free_port,
    host_platform,
)

from spegeld.containerd import open_containerd
from spegeld.oci import ShareFilter
from spegeld.routing import Peer, advertise_store
from spegeld.store import ContainerdStore

from ._support import configure_hosts, import_image, wait_until

pytestmark = [pytest.mark.containerd]

HOST = host_platform()


class RecordingRouter:
    """Every key the store asked the router to advertise."""

    def __init__(self) -> None:
        self.advertised: set[str] = set()

    def ready(self) -> bool:
        return True

    def lookup(self, key: str, count: int) -> list[Peer]:
        return []

    def advertise(self, keys: Iterable[str], *, urgent: bool = False) -> None:
        self.advertised.update(keys)

    def withdraw(self, keys: Iterable[str]) -> None:
        pass


async def test_filtered_images_are_never_advertised(
    any_containerd: PrivateContainerd, tmp_path: Path
) -> None:
    public = build_image("example.com/team/app:v1", [3000, 4000], seed=141)
    private = build_image("corp.example/team/secret:v1", [5000, 6000], seed=142)
    share = ShareFilter.parse(exclude=[r"^corp\.example/"])
    router = RecordingRouter()
    with trio.fail_after(30):
        async with open_containerd(any_containerd.socket, any_containerd.namespace) as client:
            store = ContainerdStore(client, any_containerd.content_path, 60, share=share)
            async with trio.open_nursery() as nursery:
                await nursery.start(store.run)
                await nursery.start(advertise_store, store, router)
                # Imported while the store follows events (content events on 2.x).
                await import_image(any_containerd, private, trio.Path(tmp_path))
                await import_image(any_containerd, public, trio.Path(tmp_path))
                want = public.digests(HOST) | {"example.com/team/app:v1"}
                await wait_until(lambda: want <= router.advertised, 10, "the public keys")
                await wait_until(lambda: store.withheld_images() == 1, 10, "withheld")
                await store.sync()  # a full resync agrees
                nursery.cancel_scope.cancel()
    leaked = router.advertised & (private.digests(HOST) | {"corp.example/team/secret:v1"})
    assert leaked == set()
    assert not private.digests(HOST) & store.list().keys()


def _containerd(base: Path) -> PrivateContainerd:
    node = PrivateContainerd(base)
    node.start()
    return node


def _daemon(base: Path, ctrd: PrivateContainerd, host: str, *args: str) -> SpegeldProcess:
    return SpegeldProcess(base, ctrd, host=host, extra_args=list(args), ready_timeout=20)


@pytest.fixture
def three(tmp_path: Path) -> Iterator[list[PrivateContainerd]]:
    nodes: list[PrivateContainerd] = []
    try:
        for name in ("a", "b", "c"):
            nodes.append(_containerd(tmp_path / f"ctrd-{name}"))
        yield nodes
    finally:
        for node in nodes:
            node.close()


def _pulled(ctrd: PrivateContainerd, ref: str) -> str | None:
    """The digest ``ctr images ls`` names for ``ref``, or None."""
    for line in ctrd.ctr("images", "ls").splitlines():
        fields = line.split()
        if fields and fields[0] == ref:
            return next((f for f in fields if f.startswith("sha256:")), None)
    return None


def test_a_filtered_registry_is_not_served_to_peers(
    three: list[PrivateContainerd], tmp_path: Path
) -> None:
    puller, holder, _ = three
    upstream = f"127.0.0.1:{free_port('127.0.0.1')}"  # nothing listens: only peers can serve
    public = build_image(f"{upstream}/team/app:v1", [200_000], seed=143)
    private = build_image(f"{upstream}/private/app:v1", [200_000], seed=144)
    for i, image in enumerate((public, private)):
        holder.import_image(image.write_oci_archive(tmp_path / f"image{i}.tar"))
    rule = "^" + re.escape(upstream) + "/private/"
    b = _daemon(tmp_path / "b", holder, "127.0.0.31", "--registry-filter", rule)
    with b:
        a = _daemon(tmp_path / "a", puller, "127.0.0.32", "--static-peer", b.peer_address,
                    "--tag-quorum", "1")  # fmt: skip
        with a:
            hosts = tmp_path / "hosts"
            configure_hosts(hosts, a.url, f"http://{upstream}")
            puller.ctr("images", "pull", "--hosts-dir", str(hosts), public.name)
            assert _pulled(puller, public.name) == public.digest
            with pytest.raises(Exception, match=r"failed|not found|refused"):
                puller.ctr("images", "pull", "--hosts-dir", str(hosts), private.name, timeout=60)
            assert _pulled(puller, private.name) is None
        status = b.status()
        assert status["sharing"]["withheld_images"] == 1
        assert status["sharing"]["registry_filters"] == [rule]


def test_a_lying_daemon_does_not_change_what_others_pull(
    three: list[PrivateContainerd], upstream: UpstreamRegistry, tmp_path: Path
) -> None:
    puller, liar_ctrd, honest_ctrd = three
    true = build_image(f"{upstream.address}/team/app:v1", [300_000], seed=145)
    false = build_image(f"{upstream.address}/team/app:v1", [300_000], seed=146)
    ref = upstream.push(true, "team/app", "v1")
    assert ref == true.name
    honest_ctrd.import_image(true.write_oci_archive(tmp_path / "true.tar"))
    liar_ctrd.import_image(false.write_oci_archive(tmp_path / "false.tar"))
    liar = _daemon(tmp_path / "liar", liar_ctrd, "127.0.0.33")
    honest = _daemon(tmp_path / "honest", honest_ctrd, "127.0.0.34")
    with liar, honest:
        # The liar first: a quorum of 1 would take its word (tests/test_sharing.py).
        peers = ["--static-peer", liar.peer_address, "--static-peer", honest.peer_address]
        a = _daemon(tmp_path / "a", puller, "127.0.0.35", *peers)
        with a:
            hosts = tmp_path / "hosts"
            configure_hosts(hosts, a.url, upstream.url)
            puller.ctr("images", "pull", "--hosts-dir", str(hosts), ref)
            assert _pulled(puller, ref) == true.digest
            disagreed = 'spegeld_proxy_errors_total{reason="tag_disagreement"}'
            assert a.metric(disagreed) >= 1, "the liar's answer was never weighed"
            assert a.metric('spegeld_bytes_served_total{source="peer"}') > 0  # blobs: peers
