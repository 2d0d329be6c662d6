"""containerd's content directory is found from containerd itself, not configured.

containerd reports its content plugin's ``root`` through the Introspection service
(1.6 and 2.x alike). A node whose containerd keeps its root elsewhere (k3s, RKE2, a
custom ``root =``) serves blobs by sendfile with no ``--containerd-content-path``; the
flag stays as an override; containerd starting late, or restarting with another root,
is followed; ``spegeld doctor`` says which path is used and how it was found.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import trio
from click.testing import CliRunner
from spegeld_harness import (
    BuiltImage,
    PrivateContainerd,
    SpegeldProcess,
    build_image,
    free_port,
)

from spegeld.cli import cli
from spegeld.config import DEFAULT_CONTENT_PATH
from spegeld.containerd import open_containerd
from spegeld.errors import ContainerdError, ContainerdUnavailable
from spegeld.oci import Digest
from spegeld.store import ContainerdStore, ContentSource, choose_content_path
from spegeld.store._contentpath import ContentPathFinder

from ._support import import_image, wait_for, wait_until

MiB = 1024 * 1024
CONTENT_DIR = "io.containerd.content.v1.content"


class CustomRootContainerd(PrivateContainerd):
    """A private containerd whose root and state sit where k3s keeps them (under the test's
    directory), and can move between restarts: ``root_dir`` is read when it (re)starts."""

    def __init__(self, base_dir: Path, **kwargs: Any) -> None:
        super().__init__(base_dir, **kwargs)
        self.root_dir = self.base_dir / "rancher" / "k3s" / "agent" / "containerd"

    @property
    def root(self) -> Path:
        return self.root_dir

    @property
    def state(self) -> Path:
        return self.base_dir / "run" / "k3s" / "containerd"


class NoContentPathFlag(SpegeldProcess):
    """``spegeld run`` exactly as the harness starts it, minus --containerd-content-path."""

    def argv(self) -> list[str]:
        argv = super().argv()
        at = argv.index("--containerd-content-path")
        return argv[:at] + argv[at + 2 :]


# The pure choice: explicit flag > containerd's answer > the built-in default.


@pytest.mark.parametrize(
    ("explicit", "reported", "path", "source"),
    [
        (None, None, DEFAULT_CONTENT_PATH, ContentSource.DEFAULT),
        (None, Path("/k3s/c"), Path("/k3s/c"), ContentSource.INTROSPECTION),
        (Path("/flag"), None, Path("/flag"), ContentSource.FLAG),
        (Path("/flag"), Path("/k3s/c"), Path("/flag"), ContentSource.FLAG),
    ],
)
def test_the_flag_wins_then_containerd_then_the_default(
    explicit: Path | None, reported: Path | None, path: Path, source: ContentSource
) -> None:
    found = choose_content_path(explicit, reported)
    assert (found.path, found.source) == (path, source)
    assert found.disagrees == (explicit is not None and reported is not None)
    assert not choose_content_path(Path("/a/b/"), Path("/a//b")).disagrees


class _Answers:
    """A stand-in for the client, to drive the finder through answers a real containerd
    does not give on demand (an unimplemented service, an outage mid-call)."""

    socket = Path("/run/x.sock")

    def __init__(self, *answers: Path | Exception | None) -> None:
        self._answers = list(answers)

    async def content_root(self) -> Path | None:
        answer = self._answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


async def test_failures_and_disagreements_are_logged_once_and_fall_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="spegeld.store._contentpath")
    finder = ContentPathFinder(None)
    unimplemented = ContainerdError("Introspection.Plugins: unimplemented")
    client: Any = _Answers(unimplemented, unimplemented, Path("/k3s/c"), Path("/k3s/c"))
    for _ in range(2):
        found = await finder.refresh(client)
        assert (found.path, found.source) == (DEFAULT_CONTENT_PATH, ContentSource.DEFAULT)
    assert "unimplemented" in found.problem
    for _ in range(2):
        found = await finder.refresh(client)
        assert (found.path, found.source) == (Path("/k3s/c"), ContentSource.INTROSPECTION)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("cannot ask containerd" in m for m in messages) == 1, messages
    assert sum("content directory: /k3s/c" in m for m in messages) == 1, messages

    # containerd down is an outage for the store's retry loop, not an answer.
    with pytest.raises(ContainerdUnavailable):
        await finder.refresh(_Answers(ContainerdUnavailable("down")))  # type: ignore[arg-type]

    caplog.clear()
    flagged = ContentPathFinder(Path("/flag"))
    client = _Answers(Path("/k3s/c"), Path("/k3s/c"), Path("/k3s/d"))
    for _ in range(3):
        found = await flagged.refresh(client)
        assert (found.path, found.source) == (Path("/flag"), ContentSource.FLAG)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings  # one per containerd answer that disagrees
    assert "/k3s/c" in warnings[0] and "/k3s/d" in warnings[1]


# Real containerd, 1.6 and 2.3.


async def test_containerd_reports_its_content_root(
    tmp_path: Path, containerd_bin_dir: Path | None
) -> None:
    node = CustomRootContainerd(tmp_path / "c", bin_dir=containerd_bin_dir)
    with node, trio.fail_after(30):
        async with open_containerd(node.socket, node.namespace) as client:
            assert await client.content_root() == node.root_dir / CONTENT_DIR


def test_a_custom_root_serves_by_sendfile_with_no_content_path_flag(
    tmp_path: Path, containerd_bin_dir: Path | None
) -> None:
    node = CustomRootContainerd(tmp_path / "c", bin_dir=containerd_bin_dir)
    content = node.root_dir / CONTENT_DIR
    assert content.parts[-5:-1] == ("rancher", "k3s", "agent", "containerd")
    with node, NoContentPathFlag(tmp_path / "node", node, extra_args=["--no-election"]) as daemon:
        assert "--containerd-content-path" not in daemon.argv()
        image = build_image("example.com/k3s/app:v1", [2 * MiB], seed=161, compresslevel=0)
        node.import_image(image.write_oci_archive(tmp_path / "app.tar"))
        layer = image.platforms[0].layers[0]
        path = f"/v2/k3s/app/blobs/{layer}?ns=example.com"
        wait_for(lambda: daemon.get_or_none(path) == 200, 10, "the layer to be served")
        status, _, body = daemon.get(path)
        assert status == 200
        assert hashlib.sha256(body).hexdigest() == layer.removeprefix("sha256:")
        store = daemon.status()["store"]
        assert store["read_mode"] == "file" and store["grpc_reads"] == 0, store
        assert daemon.metric('spegeld_blob_reads_total{path="file"}') >= 2
        assert daemon.metric('spegeld_blob_reads_total{path="grpc"}') == 0
        log = [json.loads(line) for line in daemon.log_path.read_text().splitlines() if line]
        found = [e["msg"] for e in log if "content directory" in str(e.get("msg"))]
        assert found == [f"containerd's content directory: {content} (containerd introspection)"]
        serving = [e["msg"] for e in log if "serving blobs" in str(e.get("msg"))]
        assert serving == [f"serving blobs from their files in {content}/blobs/sha256 (sendfile)"]


async def test_a_containerd_started_later_is_found_and_a_moved_root_followed(
    tmp_path: Path, containerd_bin_dir: Path | None
) -> None:
    node = CustomRootContainerd(tmp_path / "c", bin_dir=containerd_bin_dir)
    images = [
        build_image(f"example.com/late/app:v{i}", [300_000], seed=170 + i, compresslevel=0)
        for i in (1, 2)
    ]
    try:
        with trio.fail_after(90):
            async with open_containerd(node.socket, node.namespace) as client:
                store = ContainerdStore(client)  # no path given: ask containerd
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(store.run)
                    await trio.sleep(0.3)  # the store is retrying: nothing answers yet
                    assert store.content_path.source is ContentSource.DEFAULT
                    assert not store.statistics().synced

                    for image, root in zip(images, ("first", "second"), strict=True):
                        node.root_dir = tmp_path / root / "containerd"
                        await trio.to_thread.run_sync(node.start)
                        await _found_and_served(store, node, image, tmp_path)
                        await trio.to_thread.run_sync(node.stop)
                    nursery.cancel_scope.cancel()
        stats = store.statistics()
        assert (stats.file_reads, stats.grpc_reads) == (2, 0)
        assert str(store.content_path.source) == "containerd introspection"
    finally:
        node.close()


async def _found_and_served(
    store: ContainerdStore, node: CustomRootContainerd, image: BuiltImage, tmp_path: Path
) -> None:
    """The store finds ``node``'s current root, and serves a new image's layer from it."""
    content = node.root_dir / CONTENT_DIR
    await wait_until(lambda: store.content_path.path == content, 15, f"the store to find {content}")
    assert store.content_path.source is ContentSource.INTROSPECTION
    await import_image(node, image, trio.Path(tmp_path))
    layer = Digest(image.platforms[0].layers[0])
    await wait_until(lambda: layer in store.list().digests, 10, layer)
    blob = await store.open(layer)
    assert blob.path == content / "blobs" / "sha256" / layer.split(":")[1]


# spegeld doctor.


def _content_check(args: list[str]) -> dict[str, Any]:
    result = CliRunner(catch_exceptions=False).invoke(
        cli,
        ["doctor", "--json", "--only", "node", "--timeout", "2", *args],
        env={"KUBERNETES_SERVICE_HOST": ""},
    )
    data = json.loads(result.stdout)
    checks: list[dict[str, Any]] = data["checks"]
    (check,) = [c for c in checks if c["check"] == "containerd.content"]
    return check


def test_doctor_says_which_content_path_is_used_and_how_it_was_found(
    tmp_path: Path, containerd_bin_dir: Path | None
) -> None:
    node = CustomRootContainerd(tmp_path / "c", bin_dir=containerd_bin_dir)
    content = node.root_dir / CONTENT_DIR
    with node:
        image = build_image("example.com/doc/app:v1", [1000], seed=181)
        node.import_image(image.write_oci_archive(tmp_path / "doc.tar"))
        common = [
            "--containerd-sock", str(node.socket),
            "--containerd-config", str(node.config_path),
            "--registry-addr", f"127.0.0.1:{free_port('127.0.0.1')}",
        ]  # fmt: skip

        found = _content_check(common)
        assert found["status"] == "ok", found
        assert found["verdict"] == "readable: blobs go out with sendfile"
        assert found["evidence"] == [str(content), "found by: containerd introspection"]

        flagged = _content_check([*common, "--containerd-content-path", str(content)])
        assert flagged["status"] == "ok", flagged
        assert flagged["evidence"] == [str(content), "found by: flag (--containerd-content-path)"]

        elsewhere = tmp_path / "elsewhere"
        wrong = _content_check([*common, "--containerd-content-path", str(elsewhere)])
        assert wrong["status"] == "warn", wrong
        assert "not where containerd keeps its content" in wrong["verdict"]
        assert f"containerd reports: {content}" in wrong["evidence"]
        assert "Drop --containerd-content-path" in wrong["remedy"]

        table = CliRunner(catch_exceptions=False).invoke(
            cli,
            ["doctor", "--only", "node", "--timeout", "2", *common],
            env={"KUBERNETES_SERVICE_HOST": "", "COLUMNS": "240"},
        )
        assert "found by: containerd introspection" in table.stdout, table.stdout
        assert str(content) in table.stdout
