"""Which content directory to read blobs from, and how it was found.

Precedence: an explicit ``--containerd-content-path`` (flag, environment or config
file), then what containerd reports through its Introspection service, then the
built-in default. The choice itself is pure (``choose_content_path``); ``ContentPathFinder`` asks
containerd each time the store (re)connects, because containerd may start after
spegeld, or restart with another ``root``.
"""

from __future__ import annotations

import enum
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from spegeld.config import DEFAULT_CONTENT_PATH
from spegeld.containerd import ContainerdClient
from spegeld.errors import ContainerdError, ContainerdUnavailable, NotFound, RemoteProtocolError

logger = logging.getLogger(__name__)


class ContentSource(enum.StrEnum):
    FLAG = "flag"
    INTROSPECTION = "containerd introspection"
    DEFAULT = "default"


@dataclass(frozen=True, slots=True)
class ContentPath:
    path: Path
    source: ContentSource
    reported: Path | None = None  # what containerd said, when it was asked and answered
    problem: str = ""  # why containerd could not say, when asking failed

    @property
    def disagrees(self) -> bool:
        """An explicit path that is not where containerd keeps its content."""
        return (
            self.source is ContentSource.FLAG
            and self.reported is not None
            and not _same_path(self.path, self.reported)
        )


def choose_content_path(
    explicit: Path | None, reported: Path | None, problem: str = ""
) -> ContentPath:
    if explicit is not None:
        return ContentPath(explicit, ContentSource.FLAG, reported, problem)
    if reported is not None:
        return ContentPath(reported, ContentSource.INTROSPECTION, reported, problem)
    return ContentPath(DEFAULT_CONTENT_PATH, ContentSource.DEFAULT, None, problem)


async def ask_containerd(client: ContainerdClient) -> tuple[Path | None, str]:
    """containerd's content root, or None and why not. ``ContainerdUnavailable`` (containerd
    down) propagates: that is an outage for the caller's retry loop, not an answer."""
    try:
        root = await client.content_root()
    except ContainerdUnavailable:
        raise
    except (ContainerdError, NotFound, RemoteProtocolError) as exc:
        return None, str(exc) or type(exc).__name__
    return root, "" if root is not None else "containerd reported no content root"


def disagreement(found: ContentPath) -> str:
    return (
        f"--containerd-content-path {found.path} is not where containerd keeps its content "
        f"({found.reported}, from its introspection API): using the flag. Drop the flag to "
        "follow containerd, unless that directory is mounted here under the flag's path"
    )


class ContentPathFinder:
    """Asks containerd on each (re)connect; logs a change of path, and a disagreement or a
    failure once (until it changes), never on every reconnect."""

    def __init__(self, explicit: Path | None) -> None:
        self._explicit = explicit
        self.current = choose_content_path(explicit, None)
        self._said: tuple[str, str] = ("", "")  # the last disagreement and failure logged

    async def refresh(self, client: ContainerdClient) -> ContentPath:
        reported, problem = await ask_containerd(client)
        found = choose_content_path(self._explicit, reported, problem)
        previous, self.current = self.current, found
        said = (disagreement(found) if found.disagrees else "", problem)
        if said[0] and said[0] != self._said[0]:
            logger.warning("%s", said[0])
        if problem and problem != self._said[1]:
            logger.warning(
                "cannot ask containerd at %s for its content directory (%s): using %s (%s)",
                client.socket,
                problem,
                found.path,
                found.source,
            )
        self._said = said
        if found.path != previous.path or found.source is not previous.source:
            logger.info("containerd's content directory: %s (%s)", found.path, found.source)
        return found


def _same_path(a: Path, b: Path) -> bool:
    return os.path.normpath(a) == os.path.normpath(b)
