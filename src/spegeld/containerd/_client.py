"""A trio-native containerd client: images, content, events and version.

Every call crosses the asyncio bridge and comes back as typed records or as
spegeld errors; nothing from grpclib or protobuf leaks out of this package.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from google.protobuf import empty_pb2

from spegeld.errors import ContainerdError, ContainerdUnavailable, RemoteProtocolError
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
    namespaces_grpc,
    namespaces_pb2,
    version_grpc,
)

logger = logging.getLogger(__name__)

NAMESPACE_HEADER = "containerd-namespace"  # containerd's namespaces/grpc.go
BACKOFF_INITIAL = 0.05  # seconds; containerd is usually back within ~50 ms of a restart
BACKOFF_CAP = 5.0  # seconds; a long outage is probed every 5 s, not hammered
EVENT_BUFFER = 1024  # events queued before the subscriber applies back-pressure


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


def _descriptor(msg: descriptor_pb2.Descriptor) -> Descriptor:
    return Descriptor(media_type=msg.media_type, digest=parse_digest(msg.digest), size=msg.size)


def _image(msg: images_pb2.Image) -> ImageRecord:
    return ImageRecord(name=msg.name, target=_descriptor(msg.target), labels=dict(msg.labels))


class ContainerdClient:
    """One containerd, one namespace. Build it with :func:`open_containerd`."""

    def __init__(self, bridge: AioBridge, channel: Any, socket: Path, namespace: str) -> None:
        self._bridge = bridge
        self._socket = socket
        self.namespace = namespace
        self._md = {NAMESPACE_HEADER: namespace}
        self._version = version_grpc.VersionStub(channel)
        self._images = images_grpc.ImagesStub(channel)
        self._content = content_grpc.ContentStub(channel)
        self._events = events_grpc.EventsStub(channel)
        self._namespaces = namespaces_grpc.NamespacesStub(channel)

    @property
    def socket(self) -> Path:
        return self._socket

    async def version(self) -> ContainerdVersion:
        with map_containerd_errors(self._socket, "Version"):
            reply = await self._bridge.call(self._version.Version, empty_pb2.Empty())
        return ContainerdVersion(version=reply.version, revision=reply.revision)

    async def namespace_exists(self) -> bool:
        with map_containerd_errors(self._socket, "Namespaces.List"):
            reply = await self._bridge.call(
                self._namespaces.List, namespaces_pb2.ListNamespacesRequest()
            )
        return any(ns.name == self.namespace for ns in reply.namespaces)

    async def list_images(self) -> list[ImageRecord]:
        with map_containerd_errors(self._socket, "Images.List"):
            reply = await self._bridge.call(
                self._images.List, images_pb2.ListImagesRequest(), metadata=self._md
            )
        return [image for image in (_lenient(_image, m) for m in reply.images) if image]

    async def get_image(self, name: str) -> ImageRecord:
        with map_containerd_errors(self._socket, f"Images.Get {name}"):
            reply = await self._bridge.call(
                self._images.Get, images_pb2.GetImageRequest(name=name), metadata=self._md
            )
        try:
            return _image(reply.image)
        except RemoteProtocolError as exc:
            raise ContainerdError(f"image {name} has an unusable target: {exc}") from exc

    async def info(self, digest: Digest) -> ContentInfo:
        with map_containerd_errors(self._socket, f"Content.Info {digest}"):
            reply = await self._bridge.call(
                self._content.Info, content_pb2.InfoRequest(digest=digest), metadata=self._md
            )
        return ContentInfo(digest=parse_digest(reply.info.digest), size=reply.info.size)

    async def list_content(self) -> list[ContentInfo]:
        found: list[ContentInfo] = []
        request = content_pb2.ListContentRequest()
        with map_containerd_errors(self._socket, "Content.List"):
            async for reply in self._bridge.iterate_unary_stream(
                self._content.List, request, metadata=self._md
            ):
                for info in reply.info:
                    try:
                        found.append(ContentInfo(parse_digest(info.digest), info.size))
                    except RemoteProtocolError:
                        logger.debug("skipping content with digest %r", info.digest)
        return found

    async def read(self, digest: Digest, offset: int = 0, size: int = 0) -> AsyncIterator[bytes]:
        """Stream a blob from ``offset``; ``size`` 0 reads to the end."""
        request = content_pb2.ReadContentRequest(digest=digest, offset=offset, size=size)
        with map_containerd_errors(self._socket, f"Content.Read {digest}"):
            async for reply in self._bridge.iterate_unary_stream(
                self._content.Read, request, metadata=self._md
            ):
                if reply.data:
                    yield reply.data

    async def read_all(self, digest: Digest, limit: int) -> bytes:
        """Read a small blob whole; refuse one larger than ``limit`` bytes."""
        parts: list[bytes] = []
        total = 0
        async for chunk in self.read(digest):
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
                    with map_containerd_errors(self._socket, "Events.Subscribe"):
                        async for envelope in self._bridge.iterate_unary_stream(
                            self._events.Subscribe, request, metadata={}
                        ):
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
            yield ContainerdClient(bridge, channel, socket, namespace)
        finally:
            await bridge.close_channel(channel)
