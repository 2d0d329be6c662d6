"""Nothing a client or a body does ends the HTTP server, and every wait on a client ends.

Real servers on loopback, real TCP clients. The stores here are MemoryStore subclasses
whose streams fail or whose blobs sit in files: the point is the server's reaction, and
a real containerd cannot be made to fail mid-body on cue (test_store_* kill it for real).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import h11
import pytest
import trio
from spegeld_harness import build_image

from spegeld.errors import ContainerdUnavailable
from spegeld.mirror import Limits
from spegeld.mirror._http import HttpServer, Request, Response, StreamBody
from spegeld.mirror._slots import LOOPBACK, Slots, Source, source_of
from spegeld.oci import Descriptor, Digest, parse_reference
from spegeld.routing import StaticRouter
from spegeld.store import MemoryStore, OpenBlob

from ._support import memory_blobs, serving_registry

MiB = 1024 * 1024
IMAGE = build_image("example.com/team/robust:v1", [4 * MiB], seed=77, compresslevel=0)
LAYER = IMAGE.platforms[0].layers[0]
LAYER_BYTES = IMAGE.read_blob(LAYER)
BLOB_PATH = f"/v2/team/robust/blobs/{LAYER}"
HTTP_LOGGER = "spegeld.mirror._http"


# -- helpers ---------------------------------------------------------------------------


def split(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def request_bytes(target: str, method: str = "GET") -> bytes:
    conn = h11.Connection(h11.CLIENT)
    head = conn.send(h11.Request(method=method, target=target, headers=[(b"host", b"r")]))
    return (head or b"") + (conn.send(h11.EndOfMessage()) or b"")


async def fetch(url: str, target: str) -> tuple[int, int | None, bytes, bool]:
    """GET on a new connection: status, Content-Length, the body received, and whether
    the response ended complete (False: the connection was cut mid-body)."""
    host, port = split(url)
    conn = h11.Connection(h11.CLIENT)
    async with await trio.open_tcp_stream(host, port) as stream:
        await stream.send_all(request_bytes(target))
        status, length, body = 0, None, bytearray()
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:  # the connection ended mid-body
                return status, length, bytes(body), False
            if event is h11.NEED_DATA:
                try:
                    conn.receive_data(await stream.receive_some(256 * 1024))
                except trio.BrokenResourceError:
                    conn.receive_data(b"")
            elif isinstance(event, h11.Response):
                status = event.status_code
                found = dict(event.headers).get(b"content-length")
                length = int(found) if found is not None else None
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return status, length, bytes(body), True
            else:
                return status, length, bytes(body), False


def metric(text: str, kind: str) -> float:
    prefix = f'spegeld_http_errors_total{{kind="{kind}"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.removeprefix(prefix))
    return 0.0


async def metrics_of(url: str) -> str:
    status, _, body, complete = await fetch(url, "/metrics")
    assert status == 200 and complete
    return body.decode()


async def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    start = trio.current_time()
    with trio.move_on_after(timeout):
        while not condition():
            await trio.sleep(0.005)
        return trio.current_time() - start
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class FailingStore(MemoryStore):
    """Blob streams that raise ``error`` after ``good`` bytes."""

    def __init__(self, error: Exception, good: int) -> None:
        super().__init__()
        self._error = error
        self._good = good

    async def open(self, digest: Digest, offset: int = 0, length: int | None = None) -> OpenBlob:
        blob = await super().open(digest, offset, length)
        return OpenBlob(blob.descriptor, None, self._failing(blob.chunks))

    async def _failing(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        sent = 0
        async for chunk in chunks:
            if sent >= self._good:
                raise self._error
            sent += len(chunk)
            yield chunk


class FileStore(MemoryStore):
    """Blobs served from files (the sendfile path), as ContainerdStore does."""

    def __init__(self, directory: Path) -> None:
        super().__init__()
        self._directory = directory

    async def open(self, digest: Digest, offset: int = 0, length: int | None = None) -> OpenBlob:
        blob = await super().open(digest, offset, length)
        path = self._directory / digest.removeprefix("sha256:")
        if not path.exists():
            path.write_bytes(
                b"".join([chunk async for chunk in (await super().open(digest)).chunks])
            )
        return OpenBlob(blob.descriptor, path, blob.chunks)


class BrokenStore(MemoryStore):
    """A store with a bug: every descriptor lookup raises."""

    def descriptor(self, digest: Digest) -> Descriptor:
        raise RuntimeError("a bug in the store")


def fill(store: MemoryStore) -> MemoryStore:
    """``store`` holding IMAGE, as image_in_memory does for a plain MemoryStore."""
    tag_key = parse_reference(IMAGE.name).tag_key()
    assert tag_key is not None
    store.add_image(IMAGE.name, memory_blobs(IMAGE), {tag_key: Digest(IMAGE.digest)})
    return store


# -- nothing ends the server -----------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "level"),
    [
        (RuntimeError("a bug in a body"), logging.ERROR),
        (ContainerdUnavailable("containerd at /run/x.sock is not answering"), logging.WARNING),
    ],
    ids=["unexpected", "containerd-gone"],
)
async def test_a_body_that_raises_cuts_that_response_and_the_server_goes_on(
    error: Exception, level: int, caplog: pytest.LogCaptureFixture
) -> None:
    store = fill(FailingStore(error, good=MiB))
    with trio.fail_after(15):
        async with serving_registry(store, StaticRouter([])) as (registry, url):
            with caplog.at_level(logging.DEBUG, logger=HTTP_LOGGER):
                status, length, body, complete = await fetch(url, BLOB_PATH)
            assert status == 200 and length == len(LAYER_BYTES)
            assert not complete, "the client sees a cut response"
            assert MiB <= len(body) < len(LAYER_BYTES)
            assert body == LAYER_BYTES[: len(body)]
            # The server is still there: a new connection is served.
            status, _, manifest, complete = await fetch(
                url, f"/v2/team/robust/manifests/{IMAGE.digest}"
            )
            assert status == 200 and complete and manifest == IMAGE.read_blob(IMAGE.digest)
            await wait_until(lambda: registry.statistics()["errors"] == 1, 2, "the error count")
            assert metric(await metrics_of(url), "body") == 1
            stats = registry.statistics()
            assert stats["aborted"] == 1
    records = [r for r in caplog.records if r.name == HTTP_LOGGER and r.levelno >= logging.WARNING]
    assert len(records) == 1, [r.getMessage() for r in records]
    assert records[0].levelno == level
    if level == logging.ERROR:
        assert records[0].exc_info is not None and records[0].exc_info[1] is error
    else:
        assert records[0].exc_info is None and str(error) in records[0].getMessage()


async def test_a_handler_bug_is_a_500_counted_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = fill(BrokenStore())
    with trio.fail_after(10):
        async with serving_registry(store, StaticRouter([])) as (registry, url):
            with caplog.at_level(logging.ERROR):
                status, _, body, complete = await fetch(url, BLOB_PATH)
            assert status == 500 and complete
            assert b'"UNKNOWN"' in body
            assert metric(await metrics_of(url), "handler") == 1
            assert registry.statistics()["errors"] == 1
            assert (await fetch(url, "/healthz"))[0] == 200
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None


async def test_a_bare_server_answers_500_when_its_handler_raises() -> None:
    calls = 0
    kinds: list[str] = []

    async def handler(request: Request) -> Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ValueError("not an OciError")
        return Response(200)

    server = HttpServer(handler, Limits(), on_error=kinds.append)
    with trio.fail_after(10):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        host, port = listeners[0].socket.getsockname()[:2]
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, listeners)
            url = f"http://{host}:{port}"
            status, _, body, complete = await fetch(url, "/")
            assert (status, complete) == (500, True)
            assert body == b"internal error\n"
            assert (await fetch(url, "/"))[0] == 200
            server.shutdown()
    assert kinds == ["handler"]
    assert server.stats.errors == 1


async def test_a_handler_error_racing_its_deadline_is_a_500_not_the_servers_end() -> None:
    """A child's error and the handler deadline at once: trio leaves an ExceptionGroup
    outside the deadline's scope, and it is still only this request's failure."""
    kinds: list[str] = []

    async def handler(request: Request) -> Response:
        async def fails_late() -> None:
            with trio.CancelScope(shield=True):
                await trio.sleep(0.3)  # past the deadline below
            raise ValueError("a bug in a child task")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(fails_late)
            nursery.start_soon(trio.sleep_forever)
        return Response(200)  # pragma: no cover

    server = HttpServer(handler, Limits(handler_timeout=0.1), on_error=kinds.append)
    with trio.fail_after(10):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        host, port = listeners[0].socket.getsockname()[:2]
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, listeners)
            url = f"http://{host}:{port}"
            assert (await fetch(url, "/"))[:1] == (500,)
            assert (await fetch(url, "/"))[:1] == (500,), "the server is still there"
            server.shutdown()
    assert kinds == ["handler", "handler"]


async def test_keyboard_interrupt_from_a_handler_still_propagates() -> None:
    async def handler(request: Request) -> Response:
        raise KeyboardInterrupt

    server = HttpServer(handler, Limits())
    with trio.fail_after(10):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        host, port = listeners[0].socket.getsockname()[:2]
        with pytest.RaisesGroup(KeyboardInterrupt, flatten_subgroups=True):
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve, listeners)
                async with await trio.open_tcp_stream(host, port) as stream:
                    await stream.send_all(request_bytes("/"))
                    await trio.sleep_forever()


# -- deadlines -------------------------------------------------------------------------


async def test_backstops_a_handler_that_never_answers_and_a_body_that_stalls() -> None:
    """A component that lost its own deadline still cannot hang a client."""
    kinds: list[str] = []

    async def stalled_body() -> AsyncIterator[bytes]:
        yield b"x" * 10
        await trio.sleep_forever()
        yield b""  # pragma: no cover

    async def handler(request: Request) -> Response:
        if request.target == b"/hang":
            await trio.sleep_forever()
        return Response(200, body=StreamBody(stalled_body(), 20))

    limits = Limits(handler_timeout=0.3, body_timeout=0.3)
    server = HttpServer(handler, limits, on_error=kinds.append)
    with trio.fail_after(10):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        host, port = listeners[0].socket.getsockname()[:2]
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, listeners)
            url = f"http://{host}:{port}"
            start = trio.current_time()
            status, _, _, complete = await fetch(url, "/hang")
            assert (status, complete) == (503, True)
            assert trio.current_time() - start >= limits.handler_timeout
            status, length, body, complete = await fetch(url, "/stall")
            assert (status, length, body, complete) == (200, 20, b"x" * 10, False)
            assert (await fetch(url, "/hang"))[0] == 503, "and the server goes on"
            server.shutdown()
    assert kinds == ["handler_timeout", "body_timeout", "handler_timeout"]
    assert server.stats.timeouts == 3


async def test_a_head_that_drips_in_is_cut_at_the_head_deadline() -> None:
    limits = Limits(head_timeout=0.5, idle_timeout=5)
    head = request_bytes("/healthz")
    with trio.fail_after(10):
        async with serving_registry(MemoryStore(), StaticRouter([]), limits=limits) as (
            registry,
            url,
        ):
            async with await trio.open_tcp_stream(*split(url)) as stream:
                start = trio.current_time()
                dripped = 0
                with pytest.raises((trio.BrokenResourceError, OSError)):
                    for byte in head[:-1]:  # never the whole head
                        await stream.send_all(bytes([byte]))
                        dripped += 1
                        with trio.move_on_after(0.05):
                            if await stream.receive_some(16) == b"":
                                raise OSError("closed by the server")
                cut_after = trio.current_time() - start
            assert dripped < len(head) - 1, "the server closed before the head was done"
            assert cut_after >= limits.head_timeout, cut_after
            await wait_until(lambda: registry.statistics()["timeouts"] == 1, 2, "the count")
            assert metric(await metrics_of(url), "head_timeout") == 1


async def test_an_idle_keep_alive_connection_is_closed_quietly() -> None:
    limits = Limits(idle_timeout=0.3)
    with trio.fail_after(10):
        async with serving_registry(MemoryStore(), StaticRouter([]), limits=limits) as (
            registry,
            url,
        ):
            async with await trio.open_tcp_stream(*split(url)) as stream:
                assert await stream.receive_some(16) == b""
            assert registry.statistics()["timeouts"] == 0, "an idle client is no error"


def small_receive_buffer_stream(host: str, port: int, size: int = 4096) -> trio.SocketStream:
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)  # before connect: no autotuning
    raw.settimeout(5)
    raw.connect((host, port))
    raw.setblocking(False)
    return trio.SocketStream(trio.socket.from_stdlib_socket(raw))


@pytest.mark.parametrize("path", ["stream", "sendfile"])
async def test_a_client_that_stops_reading_is_cut_at_the_write_deadline(
    path: str, tmp_path: Path
) -> None:
    limits = Limits(write_timeout=0.5)
    store = fill(FileStore(tmp_path) if path == "sendfile" else MemoryStore())
    with trio.fail_after(20):
        async with serving_registry(store, StaticRouter([]), limits=limits) as (registry, url):
            stream = small_receive_buffer_stream(*split(url))
            async with stream:
                start = trio.current_time()
                await stream.send_all(request_bytes(BLOB_PATH))
                # Read nothing: the server's socket buffer fills, then it waits on us.
                await wait_until(lambda: registry.statistics()["timeouts"] == 1, 10, "the cut")
                waited = trio.current_time() - start
                assert registry.statistics()["aborted"] == 1
                await wait_until(
                    lambda: registry.statistics()["connections"] == 0, 2, "the slot back"
                )
            assert waited >= limits.write_timeout
            assert metric(await metrics_of(url), "write_timeout") == 1


@pytest.mark.parametrize("path", ["stream", "sendfile"])
async def test_a_slow_but_steady_reader_is_never_cut(path: str, tmp_path: Path) -> None:
    """The deadline is on inactivity: a response may take many times write_timeout."""
    limits = Limits(write_timeout=0.3)
    store = fill(FileStore(tmp_path) if path == "sendfile" else MemoryStore())
    with trio.fail_after(30):
        async with serving_registry(store, StaticRouter([]), limits=limits) as (registry, url):
            stream = small_receive_buffer_stream(*split(url), 64 * 1024)
            conn = h11.Connection(h11.CLIENT)
            received = bytearray()
            still_sending_after = 0.0  # how long the server was seen waiting on us
            async with stream:
                start = trio.current_time()
                await stream.send_all(request_bytes(BLOB_PATH))
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        await trio.sleep(0.1)  # well inside the deadline, every time
                        if registry.statistics()["in_flight"]:
                            still_sending_after = trio.current_time() - start
                        conn.receive_data(await stream.receive_some(256 * 1024))
                    elif isinstance(event, h11.Data):
                        received += event.data
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    else:
                        assert isinstance(event, h11.Response), event
                took = trio.current_time() - start
            assert bytes(received) == LAYER_BYTES
            assert still_sending_after > 3 * limits.write_timeout, (still_sending_after, took)
            assert registry.statistics()["timeouts"] == 0


# -- connection slots ------------------------------------------------------------------


def test_slots_reserve_loopback_and_cap_each_source() -> None:
    slots = Slots(shared=3, per_source=2, loopback=1)
    a, b, c = (Source(f"10.0.0.{i}", False) for i in (1, 2, 3))
    local = Source(LOOPBACK, True)
    assert slots.take(a) and slots.take(a)
    assert not slots.take(a), "over its own cap"
    assert slots.take(b)
    assert not slots.take(c), "the shared pool is full"
    assert slots.take(local), "loopback has its own pool"
    assert not slots.take(local)
    slots.give(a)
    assert slots.take(c)
    slots.give(local)
    assert slots.take(local)


async def test_source_of_classifies_loopback_and_v4_mapped_addresses() -> None:
    with trio.fail_after(5):
        for family, host in ((socket.AF_INET, "127.0.0.9"), (socket.AF_INET6, "::1")):
            listener = trio.socket.socket(family)
            await listener.bind((host, 0))
            listener.listen()
            client = trio.socket.socket(family)
            await client.connect(listener.getsockname())
            accepted, _ = await listener.accept()
            assert source_of(accepted) == Source(LOOPBACK, True)
            for sock in (accepted, client, listener):
                sock.close()
    mapped = trio.socket.socket(socket.AF_INET6)
    mapped.close()
    assert source_of(mapped) is None, "a closed socket has no source, and no crash"


async def test_loopback_over_its_pool_is_closed_at_once_and_the_slot_comes_back() -> None:
    limits = Limits(loopback_connections=4, idle_timeout=10)
    with trio.fail_after(15):
        async with serving_registry(MemoryStore(), StaticRouter([]), limits=limits) as (
            registry,
            url,
        ):
            host, port = split(url)
            held = [await trio.open_tcp_stream(host, port) for _ in range(4)]
            await wait_until(lambda: registry.statistics()["connections"] == 4, 2, "4 held")
            over = [await trio.open_tcp_stream(host, port) for _ in range(6)]
            for stream in over:  # closed at accept, never queued
                with trio.fail_after(2):
                    with contextlib.suppress(trio.BrokenResourceError):
                        assert await stream.receive_some(16) == b""
                await stream.aclose()
            assert registry.statistics()["refused"] == 6
            assert registry.statistics()["connections"] == 4
            await held.pop().aclose()
            await wait_until(lambda: registry.statistics()["connections"] == 3, 2, "a slot")
            status, _, _, complete = await fetch(url, "/healthz")
            assert (status, complete) == (200, True)
            for stream in held:
                await stream.aclose()


async def test_the_server_survives_running_out_of_file_descriptors() -> None:
    """accept() failing with EMFILE is waited out (and counted), never the server's end."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    clients: list[socket.socket] = []
    with trio.fail_after(15):
        async with serving_registry(MemoryStore(), StaticRouter([])) as (registry, url):
            host, port = split(url)
            in_use = len(os.listdir("/proc/self/fd"))
            resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 8, hard))
            try:
                for _ in range(16):
                    try:
                        raw = socket.socket()
                    except OSError as exc:
                        assert exc.errno == errno.EMFILE
                        break
                    raw.setblocking(False)
                    clients.append(raw)
                    with contextlib.suppress(BlockingIOError):
                        raw.connect((host, port))
                    await trio.sleep(0.01)  # let the server accept (until it cannot)
                await wait_until(
                    lambda: registry.statistics()["connections"] > 0, 2, "some accepted"
                )
                await trio.sleep(0.3)  # the accept loop is now retrying on EMFILE
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            for raw in clients:
                raw.close()
            status, _, _, complete = await fetch(url, "/healthz")
            assert (status, complete) == (200, True)
            assert metric(await metrics_of(url), "accept") >= 1
