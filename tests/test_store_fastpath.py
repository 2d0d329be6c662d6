"""A store started on a fresh node serves blobs from their files as soon as they exist.

On a new node containerd's ``blobs/sha256`` directory does not exist until the first
pull. The store must not decide once, at start, that files are unreadable: every blob is
checked when it is served, and the mode it used is counted and visible.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import trio
from spegeld_harness import PrivateContainerd, SpegeldProcess, build_image

from spegeld.containerd import open_containerd
from spegeld.metrics import MetricsRegistry
from spegeld.oci import Digest
from spegeld.routing import StaticRouter
from spegeld.store import ContainerdStore

from ._support import count_sendfile, import_image, serving_registry, wait_for, wait_until

pytestmark = pytest.mark.containerd

MiB = 1024 * 1024


async def fetch(url: str) -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").split("/", 1)[0].rsplit(":", 1)
    target = "/" + url.removeprefix("http://").split("/", 1)[1]
    async with await trio.open_tcp_stream(host, int(port)) as stream:
        await stream.send_all(
            f"GET {target} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".encode()
        )
        data = bytearray()
        while chunk := await stream.receive_some(MiB):
            data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def test_a_store_started_before_the_blobs_dir_exists_uses_files_once_they_appear(
    containerd: PrivateContainerd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blobs_dir = containerd.content_path / "blobs" / "sha256"
    assert not blobs_dir.exists(), "a fresh containerd has no blobs directory yet"
    sent = count_sendfile(monkeypatch)
    image = build_image("example.com/fresh/app:v1", [4 * MiB], seed=91, compresslevel=0)
    layer = Digest(image.platforms[0].layers[0])
    size = image.blobs[layer].size
    target = f"/v2/fresh/app/blobs/{layer}?ns=example.com"
    metrics = MetricsRegistry()
    with trio.fail_after(60):
        async with open_containerd(containerd.socket, containerd.namespace) as client:
            store = ContainerdStore(client, containerd.content_path, metrics=metrics)
            async with trio.open_nursery() as nursery:
                await nursery.start(store.run)
                assert not store.statistics().direct_reads
                assert store.statistics().read_mode == "none"
                await import_image(containerd, image, trio.Path(tmp_path))
                await wait_until(lambda: layer in store.list().digests, 10, "the new layer")
                async with serving_registry(store, StaticRouter([])) as (_, url):
                    status, body = await fetch(url + target)
                assert status == 200
                assert hashlib.sha256(body).hexdigest() == layer.removeprefix("sha256:")
                nursery.cancel_scope.cancel()
            stats = store.statistics()
            assert sent == [size], "the layer went out with sendfile, from its file"
            assert (stats.direct_reads, stats.read_mode) == (True, "file")
            assert (stats.file_reads, stats.grpc_reads) == (1, 0)
            assert 'spegeld_blob_reads_total{path="file"} 1' in metrics.render()

            # What a restarted daemon does: a new store on the same content serves it alike.
            restarted = ContainerdStore(client, containerd.content_path)
            await restarted.sync()
            async with serving_registry(restarted, StaticRouter([])) as (_, url):
                assert (await fetch(url + target))[0] == 200
    assert sent == [size, size], "before and after a restart: the same path"


async def test_the_fallback_is_counted_and_mode_changes_are_logged_once(
    containerd: PrivateContainerd, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    image = build_image("example.com/fresh/two:v1", [1000, 2000], seed=92)
    layers = [Digest(d) for d in image.platforms[0].layers]
    metrics = MetricsRegistry()
    with trio.fail_after(30):
        await import_image(containerd, image, trio.Path(tmp_path))
        async with open_containerd(containerd.socket, containerd.namespace) as client:
            store = ContainerdStore(client, containerd.content_path, metrics=metrics)
            await store.sync()
            caplog.set_level("INFO", logger="spegeld.store._containerd")
            for _ in range(3):
                for layer in layers:
                    blob = await store.open(layer)
                    assert blob.path is not None
            # A blob whose file is not the size the index says is not served from it.
            hidden = containerd.blob_path(layers[0])
            hidden.rename(hidden.with_suffix(".away"))
            hidden.write_bytes(b"short")
            for _ in range(3):
                blob = await store.open(layers[0])
                assert blob.path is None
            hidden.unlink()
            hidden.with_suffix(".away").rename(hidden)
            assert (await store.open(layers[0])).path is not None
    stats = store.statistics()
    assert (stats.file_reads, stats.grpc_reads, stats.read_mode) == (7, 3, "file")
    text = metrics.render()
    assert 'spegeld_blob_reads_total{path="file"} 7' in text
    assert 'spegeld_blob_reads_total{path="grpc"} 3' in text
    changes = [r.getMessage() for r in caplog.records if "blob" in r.getMessage()]
    assert len(changes) == 3, changes  # file, then grpc, then file again: one line each


def test_spegeld_run_on_an_empty_containerd_serves_a_later_image_by_sendfile(
    tmp_path: Path,
) -> None:
    """The real daemon, started before anything was pulled: /status and /metrics say "file"."""
    containerd = PrivateContainerd(tmp_path / "containerd")
    containerd.start()
    try:
        assert not (containerd.content_path / "blobs").exists()
        with SpegeldProcess(tmp_path / "node", containerd, extra_args=["--no-election"]) as node:
            image = build_image("example.com/fresh/run:v1", [2 * MiB], seed=93, compresslevel=0)
            containerd.import_image(image.write_oci_archive(tmp_path / "run.tar"))
            layer = image.platforms[0].layers[0]
            path = f"/v2/fresh/run/blobs/{layer}?ns=example.com"
            wait_for(lambda: node.get_or_none(path) == 200, 10, "the layer to be served")
            status, _, body = node.get(path)
            assert status == 200
            assert hashlib.sha256(body).hexdigest() == layer.removeprefix("sha256:")
            store = node.status()["store"]
            assert store["read_mode"] == "file" and store["grpc_reads"] == 0, store
            assert node.metric('spegeld_blob_reads_total{path="file"}') >= 2
            assert node.metric('spegeld_blob_reads_total{path="grpc"}') == 0
            log = [json.loads(line) for line in node.log_path.read_text().splitlines() if line]
            modes = [e for e in log if "serving blobs" in str(e.get("msg"))]
            assert len(modes) == 1, modes
    finally:
        containerd.close()
