"""Decode index and manifest documents into the descriptors they point at.

This is the codec boundary: JSON arrives as ``Any`` and leaves as typed
descriptors, or as a RemoteProtocolError naming what was wrong.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from spegeld.errors import RemoteProtocolError
from spegeld.oci._digest import Digest, parse_digest
from spegeld.oci._media import INDEX_TYPES, MANIFEST_TYPES


@dataclass(frozen=True, slots=True)
class Descriptor:
    """What a digest is: its media type and size in bytes."""

    media_type: str
    digest: Digest
    size: int


@dataclass(frozen=True, slots=True)
class IndexEntry:
    descriptor: Descriptor
    platform: str | None  # "os/arch[/variant]", when the index says


@dataclass(frozen=True, slots=True)
class Index:
    manifests: tuple[IndexEntry, ...]


@dataclass(frozen=True, slots=True)
class Manifest:
    config: Descriptor
    layers: tuple[Descriptor, ...]


def parse_descriptor(raw: Any) -> Descriptor:
    if not isinstance(raw, dict):
        raise RemoteProtocolError("descriptor is not an object")
    media_type, digest, size = raw.get("mediaType"), raw.get("digest"), raw.get("size")
    if not isinstance(media_type, str) or not isinstance(digest, str):
        raise RemoteProtocolError("descriptor lacks mediaType or digest")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise RemoteProtocolError(f"descriptor {digest[:80]!r} has an invalid size")
    return Descriptor(media_type=media_type, digest=parse_digest(digest), size=size)


def _platform(raw: Any) -> str | None:
    if not isinstance(raw, dict):
        return None
    parts = [raw.get("os"), raw.get("architecture"), raw.get("variant")]
    return "/".join(p for p in parts if isinstance(p, str) and p) or None


def _load(data: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise RemoteProtocolError(f"document is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise RemoteProtocolError("document is not a JSON object")
    return doc


def parse_document(media_type: str, data: bytes) -> Index | Manifest | None:
    """Parse an index or manifest; return None for anything else (configs, layers)."""
    if media_type not in INDEX_TYPES and media_type not in MANIFEST_TYPES:
        return None
    doc = _load(data)
    if media_type in INDEX_TYPES:
        entries = doc.get("manifests")
        if not isinstance(entries, list):
            raise RemoteProtocolError("index has no manifests list")
        return Index(
            tuple(
                IndexEntry(parse_descriptor(e), _platform(e.get("platform")))
                for e in entries
                if isinstance(e, dict)
            )
        )
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise RemoteProtocolError("manifest has no layers list")
    return Manifest(
        config=parse_descriptor(doc.get("config")),
        layers=tuple(parse_descriptor(layer) for layer in layers),
    )
