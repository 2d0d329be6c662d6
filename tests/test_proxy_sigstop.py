"""Real ``spegeld run`` peers that stop (SIGSTOP) before answering or mid-body.

Nodes A and B hold a 48 MiB layer in their own containerd; node C holds nothing
and lists them with ``--static-peer``. A stopped process still has its
connections accepted by the kernel (the listen backlog) and its socket buffers
drained: exactly the mirror that "accepts and hangs" (containerd #10624).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from spegeld_harness import PrivateContainerd, SpegeldProcess, build_image, free_port

from spegeld.mirror import ProxySettings

from ._support import wait_for

pytestmark = [pytest.mark.containerd, pytest.mark.slow]

LAYER_SIZE = 48 * 1024 * 1024  # far more than the socket buffers between peer and client
SETTINGS = ProxySettings()
# The documented worst cases (ProxySettings): a stall, then a resume or a cut; no head.
STALL_BOUND = SETTINGS.body_idle_timeout + SETTINGS.first_byte_timeout
NO_HEAD_BOUND = SETTINGS.first_byte_timeout
SLACK = 1.0  # seconds for the request's own work on a busy 2-core machine
READ = 256 * 1024


class Cluster:
    def __init__(
        self, base: Path, a: SpegeldProcess, b: SpegeldProcess, layer: str, size: int,
        first_byte: bytes,
    ) -> None:  # fmt: skip
        self.base = base
        self.a = a
        self.b = b
        self.layer = layer
        self.size = size  # the gzip blob's size
        self.first_byte = first_byte
        self.containerds: list[PrivateContainerd] = []

    def client_node(self, name: str, peers: list[SpegeldProcess]) -> SpegeldProcess:
        containerd = PrivateContainerd(self.base / f"{name}-containerd")
        containerd.start()
        self.containerds.append(containerd)
        args: list[str] = []
        for peer in peers:
            args += ["--static-peer", peer.peer_address]
        return SpegeldProcess(self.base / name, containerd, host="127.0.0.4", extra_args=args)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    base = tmp_path_factory.mktemp("sigstop")
    image = build_image(
        "example.com/team/big:v1", [LAYER_SIZE], seed=81, workdir=base / "image", compresslevel=0
    )
    archive = image.write_oci_archive(base / "image.tar")
    containerds = [PrivateContainerd(base / f"{n}-containerd") for n in "ab"]
    nodes: list[SpegeldProcess] = []
    cluster: Cluster | None = None
    try:
        for containerd in containerds:
            containerd.start()
            containerd.import_image(archive)
        port_a, port_b = free_port("127.0.0.2"), free_port("127.0.0.3")
        a = SpegeldProcess(
            base / "node-a", containerds[0], host="127.0.0.2", peer_port=port_a,
            extra_args=["--static-peer", f"127.0.0.3:{port_b}"],
        )  # fmt: skip
        b = SpegeldProcess(
            base / "node-b", containerds[1], host="127.0.0.3", peer_port=port_b,
            extra_args=["--static-peer", f"127.0.0.2:{port_a}"],
        )  # fmt: skip
        nodes += [a.start(), b.start()]
        layer = image.platforms[0].layers[0]
        first_byte = image.read_blob(layer)[:1]
        cluster = Cluster(base, a, b, layer, image.blobs[layer].size, first_byte)
        yield cluster
    finally:
        for node in nodes:
            node.send_signal(signal.SIGCONT)
            node.stop()
        for containerd in containerds + (cluster.containerds if cluster else []):
            containerd.close()


def in_flight(node: SpegeldProcess) -> int:
    """Responses the node is sending, not counting the /status request asking."""
    return int(node.status()["http"]["in_flight"]) - 1


def open_blob(
    node: SpegeldProcess, layer: str, headers: dict[str, str] | None = None
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection(node.host, node.port, timeout=30)
    conn.request("GET", f"/v2/team/big/blobs/{layer}?ns=example.com", headers=headers or {})
    return conn, conn.getresponse()


def read_rest(response: http.client.HTTPResponse, sha: hashlib._Hash) -> tuple[int, float]:
    """Read to the end (or the cut): bytes read and the longest wait for one read."""
    got, longest = 0, 0.0
    while True:
        started = time.monotonic()
        try:
            chunk = response.read(READ)
        except http.client.IncompleteRead as exc:
            got += len(exc.partial)
            longest = max(longest, time.monotonic() - started)
            return got, longest
        longest = max(longest, time.monotonic() - started)
        if not chunk:
            return got, longest
        sha.update(chunk)
        got += len(chunk)


def test_a_peer_stopped_mid_body_is_resumed_from_the_other_holder(cluster: Cluster) -> None:
    client = cluster.client_node("node-c1", [cluster.a, cluster.b])
    stopped: SpegeldProcess | None = None
    with client:
        # ``bytes=1-`` keeps this on the one-source path: a plain GET (or ``bytes=0-``) of a
        # blob this large with two complete holders is fetched from both at once
        # (test_multi_peer.py).
        conn, response = open_blob(client, cluster.layer, {"Range": "bytes=1-"})
        try:
            assert response.status == 206
            sha = hashlib.sha256(cluster.first_byte)
            first = response.read(1024 * 1024)  # then stop reading: the peer stays mid-body
            sha.update(first)
            wait_for(
                lambda: sorted([in_flight(cluster.a), in_flight(cluster.b)]) == [0, 1],
                10, "one peer to be serving the body",
            )  # fmt: skip
            stopped = cluster.a if in_flight(cluster.a) == 1 else cluster.b
            stopped.send_signal(signal.SIGSTOP)
            got, longest = read_rest(response, sha)
        finally:
            conn.close()
            if stopped is not None:
                stopped.send_signal(signal.SIGCONT)
        assert 1 + len(first) + got == cluster.size, "the response completed"
        assert "sha256:" + sha.hexdigest() == cluster.layer
        assert longest < STALL_BOUND + SLACK, f"the client waited {longest:.2f} s at once"
        assert client.metric('spegeld_proxy_errors_total{reason="broken"}') == 1
        assert client.get("/healthz")[0] == 200


def test_the_only_holder_stopped_mid_body_cuts_the_response_within_the_bound(
    cluster: Cluster,
) -> None:
    client = cluster.client_node("node-c2", [cluster.a])
    with client:
        conn, response = open_blob(client, cluster.layer)
        try:
            assert response.status == 200
            first = response.read(1024 * 1024)
            wait_for(lambda: in_flight(cluster.a) == 1, 10, "A to be serving the body")
            cluster.a.send_signal(signal.SIGSTOP)
            got, longest = read_rest(response, hashlib.sha256())
        finally:
            conn.close()
            cluster.a.send_signal(signal.SIGCONT)
        assert len(first) + got < cluster.size, "the response was cut, not completed"
        assert longest < STALL_BOUND + SLACK, f"the client waited {longest:.2f} s at once"
        assert client.get("/healthz")[0] == 200


def test_holders_that_accept_and_never_answer_cost_a_404_within_the_bound(
    cluster: Cluster,
) -> None:
    client = cluster.client_node("node-c3", [cluster.a, cluster.b])
    with client:
        cluster.a.send_signal(signal.SIGSTOP)
        cluster.b.send_signal(signal.SIGSTOP)
        try:
            timings = {}
            for what, path in (
                ("blob", f"/v2/team/big/blobs/{cluster.layer}?ns=example.com"),
                ("manifest", "/v2/team/big/manifests/v1?ns=example.com"),
            ):
                started = time.monotonic()
                status, _, body = client.get(path)
                timings[what] = time.monotonic() - started
                assert status == 404, body
                assert json.loads(body)["errors"][0]["code"] in ("BLOB_UNKNOWN", "MANIFEST_UNKNOWN")
        finally:
            cluster.a.send_signal(signal.SIGCONT)
            cluster.b.send_signal(signal.SIGCONT)
        # The blob waits out the holders (response_timeout, hedged); they are then skipped
        # for unreachable_ttl, so the manifest right after is a 404 at once.
        assert timings["blob"] < NO_HEAD_BOUND + SLACK, f"404 after {timings['blob']:.2f} s"
        assert timings["manifest"] < SLACK, f"404 after {timings['manifest']:.2f} s"
        # Once they are back (and their unreachable_ttl has passed), the blob comes through.
        path = f"/v2/team/big/blobs/{cluster.layer}?ns=example.com"
        wait_for(
            lambda: client.get(path, method="HEAD")[0] == 200,
            SETTINGS.unreachable_ttl + 10, "the holders to be asked again",
        )  # fmt: skip
        assert client.get(path, method="HEAD")[1]["content-length"] == str(cluster.size)
