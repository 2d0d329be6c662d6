"""containerd events decoded by topic, so 1.6's and 1.7+'s type URLs both work."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError

from spegeld.oci import Digest, is_digest

from ._gen import content_events_pb2, image_events_pb2

TOPIC_FILTERS = ('topic~="/images/"', 'topic~="/content/"')


@dataclass(frozen=True, slots=True)
class ImageChanged:
    """An image was created or updated: its target may be new."""

    name: str


@dataclass(frozen=True, slots=True)
class ImageDeleted:
    name: str


@dataclass(frozen=True, slots=True)
class ContentDeleted:
    digest: Digest


@dataclass(frozen=True, slots=True)
class ContentCreated:
    """A blob was committed; containerd 2.1+ only, earlier versions emit no such event."""

    digest: Digest
    size: int


ContainerdEvent = ImageChanged | ImageDeleted | ContentDeleted | ContentCreated


def decode_envelope(envelope: Any) -> ContainerdEvent | None:
    """Decode by topic, never by type URL; an unknown or broken event is None."""
    topic, payload = envelope.topic, envelope.event.value
    try:
        if topic in ("/images/create", "/images/update"):
            image = image_events_pb2.ImageCreate.FromString(payload)
            return ImageChanged(image.name) if image.name else None
        if topic == "/images/delete":
            deleted = image_events_pb2.ImageDelete.FromString(payload)
            return ImageDeleted(deleted.name) if deleted.name else None
        if topic == "/content/delete":
            digest = content_events_pb2.ContentDelete.FromString(payload).digest
            return ContentDeleted(Digest(digest)) if is_digest(digest) else None
        if topic == "/content/create":
            created = content_events_pb2.ContentCreate.FromString(payload)
            if not is_digest(created.digest) or created.size < 0:
                return None
            return ContentCreated(Digest(created.digest), created.size)
    except DecodeError:
        return None
    return None
