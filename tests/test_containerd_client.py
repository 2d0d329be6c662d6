"""The trio-native containerd client against a real, private containerd."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import trio
from spegeld_harness import PrivateContainerd, build_image

from spegeld.containerd import TOPIC_FILTERS, ImageChanged, ImageDeleted, open_containerd
from spegeld.errors import ContainerdPermission, ContainerdUnavailable, NotFound
from spegeld.oci import Digest

from ._support import import_image, remove_image

pytestmark = pytest.mark.containerd


async def test_version_images_info_and_read(containerd: PrivateContainerd, tmp_path: Path) -> None:
    image = build_image("example.com/team/app:v1", [200_000], seed=11)
    with trio.fail_after(20):
        await import_image(containerd, image, trio.Path(tmp_path))
        async with open_containerd(containerd.socket, "k8s.io") as client:
            version = await client.version()
            assert version.version.startswith(("1.", "2."))
            assert await client.namespace_exists()
            names = [i.name for i in await client.list_images()]
            assert names == ["example.com/team/app:v1"]
            record = await client.get_image("example.com/team/app:v1")
            assert record.target.digest == image.digest
            assert record.target.media_type == image.media_type
            layer = Digest(next(iter(image.layers.values()))[0])
            info = await client.info(layer)
            assert info.size == image.blobs[layer].size
            data = b"".join([c async for c in client.read(layer)])
            assert hashlib.sha256(data).hexdigest() == layer.removeprefix("sha256:")
            part = b"".join([c async for c in client.read(layer, offset=10, size=5)])
            assert part == data[10:15]
            listed = {c.digest for c in await client.list_content()}
            assert listed == image.digests()


async def test_missing_things_map_to_not_found(containerd: PrivateContainerd) -> None:
    with trio.fail_after(10):
        async with open_containerd(containerd.socket, "k8s.io") as client:
            with pytest.raises(NotFound):
                await client.get_image("example.com/none:v1")
            with pytest.raises(NotFound):
                await client.info(Digest("sha256:" + "1" * 64))
            async with open_containerd(containerd.socket, "no-such-namespace") as other:
                assert not await other.namespace_exists()
                assert await other.list_images() == []


async def test_subscribe_delivers_image_events(
    containerd: PrivateContainerd, tmp_path: Path
) -> None:
    image = build_image("example.com/team/events:v1", [1000], seed=12)
    with trio.fail_after(20):
        async with (
            open_containerd(containerd.socket, "k8s.io") as client,
            client.subscribe(TOPIC_FILTERS) as events,
        ):
            await trio.sleep(0.1)  # the stream is open once containerd has the request
            await import_image(containerd, image, trio.Path(tmp_path))
            assert await events.receive() == ImageChanged("example.com/team/events:v1")
            await remove_image(containerd, image.name)
            seen = []
            while ImageDeleted(image.name) not in seen:
                seen.append(await events.receive())


async def test_subscription_ends_with_an_error_when_containerd_dies(
    containerd: PrivateContainerd,
) -> None:
    with trio.fail_after(10):
        async with open_containerd(containerd.socket, "k8s.io") as client:
            with pytest.raises(ContainerdUnavailable):
                async with client.subscribe(TOPIC_FILTERS) as events:
                    await trio.sleep(0.1)
                    await trio.to_thread.run_sync(containerd.kill)
                    async for _ in events:
                        pass


async def test_client_reconnects_after_a_restart(containerd: PrivateContainerd) -> None:
    with trio.fail_after(20):
        async with open_containerd(containerd.socket, "k8s.io") as client:
            await client.version()
            await trio.to_thread.run_sync(containerd.kill)
            with pytest.raises(ContainerdUnavailable):
                await client.version()

            async def restart_soon() -> None:
                await trio.sleep(0.5)
                await trio.to_thread.run_sync(containerd.restart)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(restart_soon)
                version = await client.wait_available(give_up_after=10)
            assert version.version


async def test_wait_available_gives_up_when_asked(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with open_containerd(tmp_path / "absent.sock", "k8s.io") as client:
            with pytest.raises(ContainerdUnavailable, match="does not exist"):
                await client.wait_available(give_up_after=0.3)


@pytest.mark.parametrize("kind", ["missing", "regular-file", "directory"])
async def test_bad_socket_paths_name_the_path(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "containerd.sock"
    if kind == "regular-file":
        path.write_text("not a socket")
    elif kind == "directory":
        path.mkdir()
    with trio.fail_after(10):
        async with open_containerd(path, "k8s.io") as client:
            with pytest.raises(ContainerdUnavailable) as caught:
                await client.version()
    assert str(path) in str(caught.value)
    expected = "does not exist" if kind == "missing" else "is not a socket"
    assert expected in str(caught.value)


def test_permission_problem_is_reported_for_unreadable_sockets(tmp_path: Path) -> None:
    from spegeld.containerd import socket_problem

    guarded = tmp_path / "guarded"
    guarded.mkdir()
    inner = guarded / "containerd.sock"
    import socket

    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(inner))
        assert socket_problem(inner) is None
        guarded.chmod(0o000)
        try:
            # Root ignores directory permissions, so this only bites for other users;
            # tests/test_cli_containerd.py runs the real check as an unprivileged user.
            problem = socket_problem(inner)
            assert problem is None or isinstance(problem, ContainerdPermission)
        finally:
            guarded.chmod(0o755)


async def test_a_connection_lost_while_it_is_made_is_containerd_unavailable(
    tmp_path: Path,
) -> None:
    """grpclib's ``AttributeError: ... '_transport'`` race, made certain.

    A stand-in for containerd, because the real race window (containerd dies between
    accepting a connection and grpclib opening a stream on it) is microseconds wide; see
    tests/test_containerd_restart_load.py for the real thing. A socket that accepts and
    closes at once leaves grpclib exactly there, on nearly every call.
    """
    import socket
    import threading

    path = tmp_path / "closing.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(64)
    stop = threading.Event()

    def accept_and_close() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            conn.close()

    thread = threading.Thread(target=accept_and_close, daemon=True)
    thread.start()
    causes: set[str] = set()
    try:
        with trio.fail_after(20):
            async with open_containerd(path, "k8s.io") as client:
                for _ in range(50):
                    with pytest.raises(ContainerdUnavailable) as caught:
                        await client.version()
                    causes.add(type(caught.value.__cause__).__name__)
    finally:
        stop.set()
        thread.join(5)
        server.close()
    # Which lost-connection error each call meets depends on timing (on a busy machine
    # mostly StreamTerminatedError); every one of them is mapped, and nothing else escapes.
    assert causes <= {"AttributeError", "StreamTerminatedError", "ConnectionResetError",
                      "BrokenPipeError", "ConnectionLost", "ProtocolError"}, causes  # fmt: skip


def test_grpclibs_lost_transport_is_containerd_unavailable(tmp_path: Path) -> None:
    """The race's end state, made certain: grpclib's ``Connection.close()`` deletes
    ``_transport``, and ``create_stream`` on that connection raises the AttributeError
    from grpclib's own frame. The mapping turns exactly that into ContainerdUnavailable."""
    import h2.config
    import h2.connection
    from grpclib.config import Configuration
    from grpclib.protocol import Connection

    from spegeld.containerd._errors import map_containerd_errors

    class Transport:
        def close(self) -> None:
            pass

    h2_connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    lost = Connection(h2_connection, Transport(), config=Configuration())  # type: ignore[arg-type]
    lost.close()
    with pytest.raises(ContainerdUnavailable) as caught:
        with map_containerd_errors(tmp_path / "containerd.sock", "Version"):
            lost.create_stream()
    assert isinstance(caught.value.__cause__, AttributeError)
    assert caught.value.__cause__.name == "_transport"


def test_an_attribute_error_of_our_own_is_not_mapped(tmp_path: Path) -> None:
    from spegeld.containerd._errors import map_containerd_errors

    with pytest.raises(AttributeError), map_containerd_errors(tmp_path / "sock", "Version"):
        object().missing  # type: ignore[attr-defined]  # noqa: B018
    with pytest.raises(AssertionError), map_containerd_errors(tmp_path / "sock", "Version"):
        raise AssertionError("ours")


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


STALLED = 32
STALLED_RSS_LIMIT = 32 * 1024 * 1024  # ~8 MiB measured; whole-blob reads held ~3.6 MiB each


async def test_stalled_reads_hold_little_memory_and_never_block_other_calls(
    containerd: PrivateContainerd, tmp_path: Path
) -> None:
    image = build_image("example.com/team/stall:v1", [16 * 1024 * 1024], seed=13, compresslevel=0)
    layer = Digest(image.platforms[0].layers[0])
    with trio.fail_after(60):
        await import_image(containerd, image, trio.Path(tmp_path))
        async with open_containerd(containerd.socket, "k8s.io") as client:
            await client.version()
            warm = client.read(layer)
            await warm.__anext__()
            await warm.aclose()  # type: ignore[attr-defined]
            before = _rss()
            readers = []
            for _ in range(STALLED):
                reader = client.read(layer)
                await reader.__anext__()  # one chunk taken, then the reader stalls
                readers.append(reader)
            await trio.sleep(0.5)  # time for containerd to fill whatever windows are open
            growth = _rss() - before
            with trio.fail_after(5):  # the stalled streams leave the other calls alone
                assert layer in {c.digest for c in await client.list_content()}
                await client.version()
            for reader in readers:
                await reader.aclose()  # type: ignore[attr-defined]
    print(f"{STALLED} stalled reads: RSS growth {growth / 1024 / 1024:.1f} MiB")
    assert growth < STALLED_RSS_LIMIT, growth


async def test_a_connection_out_of_stream_ids_is_redialled(containerd: PrivateContainerd) -> None:
    """grpclib never redials a connection whose 2**30 client streams are spent. Spending
    them for real takes about 256 TiB of gRPC reads, so the test moves the real h2
    connection's stream counter to its last ID; everything else is real."""
    with trio.fail_after(20):
        async with open_containerd(containerd.socket, "k8s.io") as client:
            await client.version()
            channel = client._version.Version.channel
            h2_connection = channel._protocol.processor.connection._connection
            h2_connection.highest_outbound_stream_id = 2**31 - 1
            with pytest.raises(ContainerdUnavailable, match="stream IDs"):
                await client.version()
            assert (await client.version()).version  # a new connection
            assert channel._protocol.processor.connection._connection is not h2_connection
