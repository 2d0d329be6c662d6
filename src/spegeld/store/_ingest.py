"""Blobs containerd is downloading right now: its content store's ingest area.

containerd's local content store keeps each write in ``ingest/<sha256 of ref>/`` with
the files ``ref`` (``<namespace>/<n>/<ref>`` as the metadata store names it), ``total``
(the expected size, from the descriptor), ``data`` (the bytes so far, appended in order),
``startedat`` and ``updatedat``. On commit ``data`` is renamed to ``blobs/sha256/<hex>``
and the directory removed; on abort the directory is removed. The store keeps no
expected digest for an ingest (Content.Status answers an empty ``expected``), but every
pull names its ingest ``<kind>-[name@]<digest>`` (containerd's remotes.MakeRefKey, 1.6 to
2.x), so the digest is the ref's tail.

The scan reads those files directly: one ``scandir`` when idle, and three small reads
and a stat per ingest when not, with no containerd call (see docs/protocol.md,
"In-flight content", for the measured cost). The table is sans-I/O: it takes a scan and
the facts it needs as arguments and returns the change of advertised keys.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from spegeld.oci import Digest

INFLIGHT_PREFIX = "inflight:"  # an in-flight key is this and the digest: never a tag or digest
# The ref file is ``<namespace>/<n>/<ref>``; refs are short (a kind, a name, a digest).
MAX_REF_FILE = 4096  # bytes; a larger ref file is not a pull's and is skipped
MAX_TOTAL_FILE = 32  # bytes; a decimal size
_REF_DIGEST = re.compile(r"(?:^|[-@])(sha256:[0-9a-f]{64})$")
# Seconds a committed blob stays advertised as in flight while no image names it yet.
# containerd 1.6 and 1.7 publish no event for a commit, so a layer joins the index only
# when its image record appears at the end of the pull; until then it is served as an
# in-flight blob from its committed file. Past this, a pull that never finished leaves
# blobs the GC will take: they are withdrawn.
LANDED_TTL = 600.0
# Seconds between scans of the ingest area while a download is under way: a peer learns
# of an in-flight blob within this (plus gossip), and a commit or abort is withdrawn as
# fast. A scan of a few ingests costs tens of microseconds (docs/protocol.md).
INGEST_SCAN_ACTIVE = 0.1
# Seconds since its data last grew after which an ingest is not shared: a pull that was
# cancelled (ctr killed, kubelet gave up) leaves its ingest for a later resume, and
# followers of it would only be cut, a stall later (INFLIGHT_STALL, also 5 s), on every
# retry. A resumed download writes again and is shared again.
INGEST_STALE = 5.0
# Seconds between scans while nothing is downloading: one scandir of an empty directory
# (a few microseconds), so a pull's first blob is noticed within a quarter second.
INGEST_SCAN_IDLE = 0.25


def inflight_key(digest: Digest) -> str:
    """The key a node advertises for a blob it is downloading (not yet complete)."""
    return INFLIGHT_PREFIX + digest


@dataclass(frozen=True, slots=True)
class Ingest:
    """A blob being written: its growing ``data`` file, the size it will have, and the
    file it becomes when containerd commits it."""

    digest: Digest
    data: Path
    total: int
    blob: Path


# What an ingest directory's ``ref`` and ``total`` say (they never change while it
# lives): its digest and total, or None for one that is not shared. Keyed by the name.
IngestMemo = dict[str, tuple[Digest, int] | None]


def scan_ingests(
    content_path: Path, namespace: str, memo: IngestMemo | None = None
) -> dict[Digest, Ingest]:
    """The ingests of ``namespace`` whose ref names a digest and whose total is known,
    and whose data grew in the last ``INGEST_STALE`` seconds.

    Nothing (not an error) when the ingest directory is missing or unreadable: a fresh
    node has none, and a content path that is not containerd's shares no in-flight data.
    ``memo`` (kept by the caller between scans) saves reading ``ref`` and ``total``
    again: a known ingest then costs one stat of its ``data``.
    """
    found: dict[Digest, Ingest] = {}
    sizes: dict[Digest, int] = {}
    memo = {} if memo is None else memo
    # A file's mtime is wall-clock time: the one place here that reads that clock.
    stale_before = time.time() - INGEST_STALE
    try:
        entries = list(os.scandir(content_path / "ingest"))
    except OSError:
        return found
    for gone in memo.keys() - {entry.name for entry in entries}:
        del memo[gone]
    for entry in entries:
        if entry.name not in memo:
            memo[entry.name] = _identify(Path(entry.path), namespace)
        known = memo[entry.name]
        if known is None:
            continue
        digest, total = known
        data = Path(entry.path) / "data"
        try:
            stat = os.stat(data)
        except OSError:
            continue
        size = stat.st_size
        if stat.st_mtime < stale_before:
            continue  # abandoned, for now
        if total <= 0 or size > total or sizes.get(digest, -1) >= size:
            continue  # a second writer of one digest: the one further along serves
        sizes[digest] = size
        blob = content_path / "blobs" / "sha256" / digest.removeprefix("sha256:")
        found[digest] = Ingest(digest, data, total, blob)
    return found


def _identify(ingest: Path, namespace: str) -> tuple[Digest, int] | None:
    ref = _read_small(ingest / "ref", MAX_REF_FILE)
    if ref is None or not ref.startswith(namespace + "/"):
        return None
    match = _REF_DIGEST.search(ref.rstrip("\n"))
    total_text = _read_small(ingest / "total", MAX_TOTAL_FILE)
    if match is None or total_text is None or not total_text.strip().isdigit():
        return None
    return Digest(match.group(1)), int(total_text.strip())


def _read_small(path: Path, limit: int) -> str | None:
    try:
        with open(path, "rb") as f:
            raw = f.read(limit + 1)
    except OSError:
        return None
    if len(raw) > limit:
        return None
    return raw.decode("utf-8", "replace")


@dataclass(frozen=True, slots=True)
class InflightChange:
    """Keys the table started or stopped advertising (a ``KeysChanged`` to publish)."""

    added: frozenset[str]
    removed: frozenset[str]


class InflightTable:
    """What this node advertises as in flight: ingests, then blobs they committed that
    no image names yet (``landed``), until the index holds them or they are gone."""

    def __init__(self) -> None:
        self._ingests: dict[Digest, Ingest] = {}
        self._landed_at: dict[Digest, float] = {}
        self._memo: IngestMemo = {}

    def rescan(
        self,
        content_path: Path | None,
        namespace: str,
        now: float,
        *,
        indexed: Callable[[Digest], bool],
        landed: Callable[[Ingest], bool],
    ) -> InflightChange:
        """Scan ``content_path``'s ingest area (None: share nothing) and ``update``."""
        found = {} if content_path is None else scan_ingests(content_path, namespace, self._memo)
        return self.update(found, now, indexed=indexed, landed=landed)

    def get(self, digest: Digest) -> Ingest | None:
        return self._ingests.get(digest)

    def digests(self) -> frozenset[Digest]:
        return frozenset(self._ingests)

    def active(self) -> bool:
        """Whether any download is under way (landed blobs only need the slow pace)."""
        return len(self._ingests) > len(self._landed_at)

    def update(
        self,
        found: Mapping[Digest, Ingest],
        now: float,
        *,
        indexed: Callable[[Digest], bool],
        landed: Callable[[Ingest], bool],
    ) -> InflightChange:
        """Take a new scan; ``indexed``: the digest is advertised complete already;
        ``landed``: the blob's committed file is there."""
        current: dict[Digest, Ingest] = {}
        for digest, ingest in found.items():
            if not indexed(digest):
                current[digest] = ingest
                self._landed_at.pop(digest, None)
        for digest, ingest in self._ingests.items():
            if digest in current or indexed(digest) or not landed(ingest):
                continue
            since = self._landed_at.setdefault(digest, now)
            if now - since < LANDED_TTL:
                current[digest] = ingest
        for digest in [d for d in self._landed_at if d not in current]:
            del self._landed_at[digest]
        added = frozenset(inflight_key(d) for d in current.keys() - self._ingests.keys())
        removed = frozenset(inflight_key(d) for d in self._ingests.keys() - current.keys())
        self._ingests = current
        return InflightChange(added=added, removed=removed)
