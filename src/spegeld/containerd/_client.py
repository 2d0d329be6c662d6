"""A trio-native containerd client: images, content, events and version.

Every call crosses the asyncio bridge and comes back as typed records or as
spegeld errors; nothing from grpclib or protobuf leaks out of this package.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from google.protobuf import empty_pb2
from grpclib.config import Configuration

from spegeld.errors import ContainerdError, ContainerdUnavailable, NotFound, RemoteProtocolError
from spegeld.oci import Descriptor, Digest, parse_digest

from ._bridge import AioBridge, open_bridge
from ._errors import map_containerd_errors
from ._events import ContainerdEvent, decode_envelope
from ._gen import (
    content_grpc,
    content_pb2,
    descriptor_pb2,
    events_grpc,
    events_pb2,
    images_grpc,
    images_pb2,
    introspection_grpc,
    introspection_pb2,
    namespaces_grpc,
    namespaces_pb2,
    version_grpc,
)

logger = logging.getLogger(__name__)

NAMESPACE_HEADER = "containerd-namespace"  # containerd's namespaces/grpc.go
BACKOFF_INITIAL = 0.05  # seconds; containerd is usually back within ~50 ms of a restart
BACKOFF_CAP = 5.0  # seconds; a long outage is probed every 5 s, not hammered
EVENT_BUFFER = 1024  # events queued before the subscriber applies back-pressure
# Deadlines: a containerd that accepts and then hangs (SIGSTOP, a deadlock) must cost a
# bounded wait, never a stuck sync or a stuck response.
VERSION_TIMEOUT = 5.0  # seconds; Version is what the reconnect loop probes with
CALL_TIMEOUT = 30.0  # seconds for a unary call; Images.List of 1000 images takes ~50 ms
STREAM_IDLE_TIMEOUT = 30.0  # seconds between two replies of Content.Read or Content.List
# Blob bodies are read in ranges of this size, one Content.Read each: containerd sends
# 1 MiB messages and grpclib buffers a whole message before decoding it, so a range
# bounds what one slow reader holds. Measured with stalled readers (one chunk taken,
# then nothing): whole-blob reads held ~3.6 MiB each, 256 KiB ranges ~260 KiB each;
# one stream's throughput went from ~150 to ~110 MB/s (1 MiB ranges: ~1.1 MiB each).
READ_RANGE = 256 * 1024
# Content.Read streams get their own HTTP/2 connection. The stream window only needs to
# cover one range (containerd cannot send more than was asked for; a window smaller
# than the range halves throughput, measured), and the connection window is the
# maximum, so stalled readers can never use it up and block other calls: with
# grpclib's defaults (4 MiB for both, on one shared connection) a single stalled
# reader starved every other call, including Version and the event stream.
READ_CHANNEL = Configuration(
    http2_stream_window_size=4 * READ_RANGE,
    http2_connection_window_size=2**31 - 1,
)
# The content plugin, as containerd's filter syntax names it (both 1.6 and 2.x register
# the local content store as type io.containerd.content.v1, id "content").
CONTENT_PLUGIN_FILTER = "type==io.containerd.content.v1,id==content"
CONTENT_ROOT_EXPORT = "root"  # the directory holding blobs/sha256/<hex>
MAX_ROOT_PATH = 4096  # PATH_MAX: a longer "root" is not a path this host can open


@dataclass(frozen=True, slots=True)
class ContainerdVersion:
    version: str
    revision: str


@dataclass(frozen=True, slots=True)
class ImageRecord:
    name: str
    target: Descriptor
    labels: dict[str, str]


@dataclass(frozen=True, slots=True)
class ContentInfo:
    digest: Digest
    size: int


MAX_MEDIA_TYPE = 255  # RFC 6838: type and subtype are at most 127 characters each
_MEDIA_TYPE = re.compile(rf"[!-~]{{1,{MAX_MEDIA_TYPE}}}")  # visible ASCII: a header value


def _descriptor(msg: descriptor_pb2.Descriptor) -> Descriptor:
    """A descriptor containerd sent, checked: it ends up in response headers."""
    if msg.size < 0:
        raise RemoteProtocolError(f"containerd sent a negative size for {msg.digest[:80]!r}")
    if not _MEDIA_TYPE.fullmatch(msg.media_type):
        raise RemoteProtocolError(f"containerd sent an unusable media type {msg.media_type[:80]!r}")
    return Descriptor(media_type=msg.media_type, digest=parse_digest(msg.digest), size=msg.size)


def _image(msg: images_pb2.Image) -> ImageRecord:
    return ImageRecord(name=msg.name, target=_descriptor(msg.target), labels=dict(msg.labels))


class ContainerdClient:
    """One containerd, one namespace. Build it with :func:`open_containerd`."""

    def __init__(
        self,
        bridge: AioBridge,
        channel: Any,
        socket: Path,
        namespace: str,
        read_channel: Any = None,
    ) -> None:
        self._bridge = bridge
        self._socket = socket
        self.namespace = namespace
        self._md = {NAMESPACE_HEADER: namespace}
        self._version = version_grpc.VersionStub(channel)
        self._images = images_grpc.ImagesStub(channel)
        self._content = content_grpc.ContentStub(channel)
        self._reads = content_grpc.ContentStub(read_channel or channel)
        self._events = events_grpc.EventsStub(channel)
        self._namespaces = namespaces_grpc.NamespacesStub(channel)
        self._introspection = introspection_grpc.IntrospectionStub(channel)

    @property
    def socket(self) -> Path:
        return self._socket

    async def version(self) -> ContainerdVersion:
        with map_containerd_errors(self._socket, "Version"):
            reply = await self._bridge.call(
                self._version.Version, empty_pb2.Empty(), answer_within=VERSION_TIMEOUT
            )
        return ContainerdVersion(version=reply.version, revision=reply.revision)

    async def content_root(self) -> Path | None:
        """The content store's directory as containerd reports it (Introspection.Plugins:
        the content plugin's ``root`` export), or None when it reports none.

        The path is containerd's view: spegeld reads it directly only when it sees the
        same filesystem there (a host service, or a mount at the same path).
        """
        with map_containerd_errors(self._socket, "Introspection.Plugins"):
            reply = await self._bridge.call(
                self._introspection.Plugins,
                introspection_pb2.PluginsRequest(filters=[CONTENT_PLUGIN_FILTER]),
                answer_within=VERSION_TIMEOUT,
            )
        for plugin in reply.plugins:
            if plugin.HasField("init_err") and plugin.init_err.code != 0:
                raise ContainerdError(
                    f"containerd's content plugin failed to start: {plugin.init_err.message[:200]}"
                )
            root = plugin.exports.get(CONTENT_ROOT_EXPORT, "")
            if not root:
                continue
            if len(root) > MAX_ROOT_PATH or "\0" in root or not root.startswith("/"):
                raise RemoteProtocolError(
                    f"containerd reported an unusable content root {root[:80]!r}"
                )
            return Path(root)
        return None

    async def namespace_exists(self) -> bool:
        with map_containerd_errors(self._socket, "Namespaces.List"):
            reply = await self._bridge.call(
                self._namespaces.List,
                namespaces_pb2.ListNamespacesRequest(),
                answer_within=CALL_TIMEOUT,
            )
        return any(ns.name == self.namespace for ns in reply.namespaces)

    async def list_images(self) -> list[ImageRecord]:
        with map_containerd_errors(self._socket, "Images.List"):
            reply = await self._bridge.call(
                self._images.List,
                images_pb2.ListImagesRequest(),
                metadata=self._md,
                answer_within=CALL_TIMEOUT,
            )
        return [image for image in (_lenient(_image, m) for m in reply.images) if image]

    async def get_image(self, name: str) -> ImageRecord:
        with map_containerd_errors(self._socket, f"Images.Get {name}"):
            reply = await self._bridge.call(
                self._images.Get,
                images_pb2.GetImageRequest(name=name),
                metadata=self._md,
                answer_within=CALL_TIMEOUT,
            )
        try:
            return _image(reply.image)
        except RemoteProtocolError as exc:
            raise ContainerdError(f"image {name} has an unusable target: {exc}") from exc

    async def info(self, digest: Digest) -> ContentInfo:
        with map_containerd_errors(self._socket, f"Content.Info {digest}"):
            reply = await self._bridge.call(
                self._content.Info,
                content_pb2.InfoRequest(digest=digest),
                metadata=self._md,
                answer_within=CALL_TIMEOUT,
            )
        return ContentInfo(digest=parse_digest(reply.info.digest), size=reply.info.size)

    async def abort_ingests(self, digest: Digest) -> list[str]:
        """Discard every ingest (a partial write, e.g. a pull's download) of ``digest``.

        containerd resumes an ingest from its offset and never re-checks the bytes
        already in it, so bytes that turned out not to match their digest would make
        every later pull of that blob fail its commit. Returns the refs aborted.
        """
        with map_containerd_errors(self._socket, f"Content.ListStatuses {digest}"):
            reply = await self._bridge.call(
                self._content.ListStatuses,
                content_pb2.ListStatusesRequest(),
                metadata=self._md,
                answer_within=CALL_TIMEOUT,
            )
        aborted: list[str] = []
        for status in reply.statuses:
            # The content store does not keep an ingest's expected digest (``expected`` is
            # empty in the reply); pulls name their ingests ``<kind>-[name@]<digest>``
            # (containerd's remotes.MakeRefKey, 1.6 to 2.x, CRI and ctr alike).
            if status.expected != digest and not status.ref.endswith(digest):
                continue
            try:
                with map_containerd_errors(self._socket, f"Content.Abort {status.ref}"):
                    await self._bridge.call(
                        self._content.Abort,
                        content_pb2.AbortRequest(ref=status.ref),
                        metadata=self._md,
                        answer_within=CALL_TIMEOUT,
                    )
            except NotFound:
                continue  # committed or aborted meanwhile
            aborted.append(status.ref)
        return aborted

    async def list_content(self) -> list[ContentInfo]:
        found: list[ContentInfo] = []
        request = content_pb2.ListContentRequest()
        replies = self._bridge.iterate_unary_stream(
            self._content.List,
            request,
            metadata=self._md,
            open_timeout=CALL_TIMEOUT,
            idle_timeout=STREAM_IDLE_TIMEOUT,
        )
        with map_containerd_errors(self._socket, "Content.List"):
            async with aclosing(replies):
                async for reply in replies:
                    for info in reply.info:
                        try:
                            found.append(ContentInfo(parse_digest(info.digest), info.size))
                        except RemoteProtocolError:
                            logger.debug("skipping content with digest %r", info.digest)
        return found

    async def read(
        self, digest: Digest, offset: int = 0, size: int = 0
    ) -> AsyncGenerator[bytes, None]:
        """Stream a blob from ``offset``; ``size`` 0 reads to the end.

        One Content.Read per ``READ_RANGE`` bytes, so what a slow reader holds is bounded;
        a range that comes back short is the end of the blob. containerd never sends more
        than it was asked for; if it did, the excess is cut, never passed on.
        """
        if offset < 0 or size < 0:
            raise ValueError(f"offset {offset} and size {size} must not be negative")
        remaining = size or None
        while remaining is None or remaining > 0:
            want = READ_RANGE if remaining is None else min(READ_RANGE, remaining)
            got = 0
            async with aclosing(self._read_range(digest, offset, want)) as chunks:
                async for reply in chunks:
                    data = reply[: want - got]
                    got += len(data)
                    if data:
                        yield data
                    if got >= want:
                        break
            if got < want:
                if remaining is not None:
                    raise ContainerdError(
                        f"containerd ended {digest} at {offset + got}, {remaining - got} bytes "
                        "short of the range asked for"
                    )
                return
            offset += got
            if remaining is not None:
                remaining -= got

    async def _read_range(
        self, digest: Digest, offset: int, size: int
    ) -> AsyncGenerator[bytes, None]:
        request = content_pb2.ReadContentRequest(digest=digest, offset=offset, size=size)
        replies = self._bridge.iterate_unary_stream(
            self._reads.Read,
            request,
            metadata=self._md,
            open_timeout=CALL_TIMEOUT,
            idle_timeout=STREAM_IDLE_TIMEOUT,
        )
        with map_containerd_errors(self._socket, f"Content.Read {digest}"):
            async with aclosing(replies):
                async for reply in replies:
                    data = reply.data
                    del reply  # one copy per stream held across the yield, not two
                    if data:
                        yield data

    async def read_all(self, digest: Digest, limit: int) -> bytes:
        """Read a small blob whole; refuse one larger than ``limit`` bytes."""
        parts: list[bytes] = []
        total = 0
        async with aclosing(self.read(digest)) as chunks:  # closed on the early raise too
            async for chunk in chunks:
                total += len(chunk)
                if total > limit:
                    raise ContainerdError(f"{digest} is larger than {limit} bytes")
                parts.append(chunk)
        return b"".join(parts)

    @asynccontextmanager
    async def subscribe(
        self, filters: Sequence[str] = ()
    ) -> AsyncIterator[trio.MemoryReceiveChannel[ContainerdEvent]]:
        """Events of this namespace, through a trio channel.

        The channel ends when the event stream breaks; the context manager then
        raises the ContainerdError that broke it, so a caller can resubscribe.
        """
        send, receive = trio.open_memory_channel[ContainerdEvent](EVENT_BUFFER)
        failure: list[ContainerdError] = []
        request = events_pb2.SubscribeRequest(filters=list(filters))

        async def pump() -> None:
            async with send:
                try:
                    # No deadlines: a quiet node sends no events for hours. A containerd
                    # that hangs is found by the store's periodic resync instead.
                    envelopes = self._bridge.iterate_unary_stream(
                        self._events.Subscribe, request, metadata={}
                    )
                    with map_containerd_errors(self._socket, "Events.Subscribe"):
                        async with aclosing(envelopes):
                            async for envelope in envelopes:
                                event = decode_envelope(envelope)
                                if event is not None and envelope.namespace == self.namespace:
                                    await send.send(event)
                    ended = f"containerd at {self._socket} ended the event stream"
                    raise ContainerdUnavailable(ended)
                except ContainerdError as exc:
                    failure.append(exc)

        body_error: BaseException | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump)
            try:
                async with receive:
                    yield receive
            except BaseException as exc:  # re-raised below, outside the nursery's group
                body_error = exc
            nursery.cancel_scope.cancel()
        if body_error is not None:
            raise body_error
        if failure:
            raise failure[0]

    async def wait_available(self, *, give_up_after: float = math.inf) -> ContainerdVersion:
        """Call Version with capped exponential backoff until containerd answers."""
        delay = BACKOFF_INITIAL
        deadline = trio.current_time() + give_up_after
        while True:
            try:
                return await self.version()
            except ContainerdUnavailable:
                if trio.current_time() + delay > deadline:
                    raise
            await trio.sleep(delay)
            delay = min(delay * 2, BACKOFF_CAP)


def _lenient(convert: Any, message: Any) -> Any:
    """Convert one record; a record containerd sent broken is skipped, not fatal."""
    try:
        return convert(message)
    except RemoteProtocolError as exc:
        logger.warning("skipping a record containerd sent: %s", exc)
        return None


@asynccontextmanager
async def open_containerd(socket: Path, namespace: str) -> AsyncIterator[ContainerdClient]:
    """A client for ``socket``; it connects lazily, so containerd may still be starting."""
    async with open_bridge() as bridge:
        channel = await bridge.open_channel(str(socket))
        try:
            read_channel = await bridge.open_channel(str(socket), READ_CHANNEL)
            try:
                yield ContainerdClient(bridge, channel, socket, namespace, read_channel)
            finally:
                await bridge.close_channel(read_channel)
        finally:
            await bridge.close_channel(channel)
