"""A peer that serves wrong bytes never breaks a node's later pulls (issue 11's soak).

containerd resumes a partial download from its offset and never re-checks the bytes
already written. The proxy hashes a blob as it streams and holds back only the last
chunk, so when a peer lies, everything but that chunk is already in containerd's partial
write. Without more, every later pull of that blob resumes the poisoned write and fails
its commit, until the write expires (a day for ``ctr``). spegeld therefore discards
containerd's partial write of that digest before it cuts the response, and no longer asks
the liar: the pull that met the liar fails, the next one (kubelet retries) succeeds.

The liar is a small HTTP server in this test that flips one byte of every blob: a real
spegeld never lies, and this is what a compromised or broken node looks like on the wire.
Everything else is real: containerd, ``ctr`` pulls through the mirror, Distribution as
the upstream, a ``spegeld run`` process.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from spegeld_harness import (
    PrivateContainerd,
    SpegeldProcess,
    UpstreamRegistry,
    build_image,
    free_port,
    host_platform,
)

from ._support import configure_hosts

pytestmark = [pytest.mark.containerd, pytest.mark.slow]

IMAGE = build_image("example.com/team/liar:v1", [2_500_000, 700_000], seed=67)
HOST = host_platform()


class _Liar(BaseHTTPRequestHandler):
    """Answers a blob GET with its right length and one byte flipped; 404 otherwise."""

    def do_GET(self) -> None:
        digest = self.path.split("?")[0].rsplit("/", 1)[-1]
        if "/blobs/" not in self.path or digest not in IMAGE.blobs:
            self.send_error(404)
            return
        self.server.asked.append(self.headers.get("range") or "")  # type: ignore[attr-defined]
        body = bytearray(IMAGE.read_blob(digest))
        body[len(body) // 3] ^= 0xFF
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.send_header("docker-content-digest", digest)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def partial_writes(node: PrivateContainerd) -> list[tuple[str, bytes]]:
    """(ref, data) of every ingest in the node's content store."""
    ingest = node.blob_path(IMAGE.digest).parents[2] / "ingest"
    found = []
    for entry in ingest.iterdir() if ingest.is_dir() else ():
        try:
            found.append(((entry / "ref").read_text(), (entry / "data").read_bytes()))
        except FileNotFoundError:
            continue  # finished or discarded meanwhile
    return found


def lies(ref: str, data: bytes) -> bool:
    """Whether a partial write of one of IMAGE's blobs differs from the blob's start."""
    digest = ref.rsplit("-", 1)[-1].rsplit("@", 1)[-1]
    if digest not in IMAGE.blobs:
        return False
    return IMAGE.read_blob(digest)[: len(data)] != data


@pytest.fixture
def liar() -> Iterator[tuple[str, list[str]]]:
    server = ThreadingHTTPServer(("127.0.0.4", 0), _Liar)
    server.asked = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.4:{server.server_address[1]}", server.asked  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()


def test_a_lying_peer_costs_one_pull_not_every_pull(
    tmp_path: Path,
    any_containerd: PrivateContainerd,
    upstream: UpstreamRegistry,
    liar: tuple[str, list[str]],
) -> None:
    address, asked = liar
    ref = upstream.push(IMAGE, "team/liar", "v1")
    port = free_port("127.0.0.3")
    node = SpegeldProcess(
        tmp_path / "node", any_containerd, host="127.0.0.3", port=port,
        extra_args=["--static-peer", address],
    )  # fmt: skip
    hosts = tmp_path / "hosts"
    with node:
        configure_hosts(hosts, node.url, upstream.url)
        pull = ["images", "pull", "--hosts-dir", str(hosts), ref]
        try:
            any_containerd.ctr(*pull)
        except Exception as exc:  # the pull that met the liar: containerd refused the commit
            first_error = str(exc)
        else:
            first_error = ""
        assert asked, "the liar was never asked: the test proves nothing"
        assert node.metric("spegeld_bad_peers_total") >= 1
        # Kubelet's retry resumes whatever partial writes are left: none may hold the lie.
        poisoned = [ref for ref, data in partial_writes(any_containerd) if lies(ref, data)]
        assert poisoned == [], "partial writes left holding the liar's bytes"
        asked_before = len(asked)
        any_containerd.ctr(*pull)
        assert len(asked) == asked_before, "the liar was asked again"
        for digest in IMAGE.digests(HOST):
            data = any_containerd.blob_path(digest).read_bytes()
            assert "sha256:" + hashlib.sha256(data).hexdigest() == digest
        assert node.stop() == 0
    # The pull that met the liar failed at a commit: its bytes did not match, or its
    # partial write was discarded under it (or it succeeded, if the liar's blobs were
    # discarded before containerd took any of them).
    assert first_error == "" or "commit" in first_error, first_error
