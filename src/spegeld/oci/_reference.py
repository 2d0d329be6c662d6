"""Image references as containerd names them, and the tag keys spegeld advertises.

A tag key is ``registry/repository:tag``: it is what a peer must know to answer
``GET /v2/<repository>/manifests/<tag>?ns=<registry>``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from spegeld.errors import RemoteProtocolError
from spegeld.oci._digest import Digest, parse_digest

# The distribution reference grammar (distribution/reference/regexp.go), spelled out.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_HOST_LABEL = r"(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9])"
_PORT = r"(?::[0-9]{1,5})?"
REGISTRY_RE = re.compile(rf"{_HOST_LABEL}(?:\.{_HOST_LABEL})*{_PORT}|\[[0-9A-Fa-f:.]+\]{_PORT}")
MAX_NAME_LENGTH = 255


@dataclass(frozen=True, slots=True)
class Reference:
    """A fully qualified reference: ``registry/repository[:tag][@digest]``."""

    registry: str
    repository: str
    tag: str | None = None
    digest: Digest | None = None

    def tag_key(self) -> str | None:
        """The key peers advertise for this tag, or None for a digest-only reference."""
        if self.tag is None:
            return None
        return tag_key(self.registry, self.repository, self.tag)

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text


def tag_key(registry: str, repository: str, tag: str) -> str:
    return f"{registry}/{repository}:{tag}"


def looks_like_registry(component: str) -> bool:
    """Docker's rule: a first component with a dot or a port, or 'localhost', is a host."""
    return "." in component or ":" in component or component == "localhost"


def parse_reference(text: str) -> Reference:
    """Parse a containerd image name; it must name its registry (containerd's always do)."""
    rest, at, digest_text = text.partition("@")
    digest = parse_digest(digest_text) if at else None
    registry, slash, path = rest.partition("/")
    if not slash or not looks_like_registry(registry) or not REGISTRY_RE.fullmatch(registry):
        raise RemoteProtocolError(f"reference {text[:200]!r} does not start with a registry host")
    repository, tag = path, None
    colon = path.rfind(":")
    if colon != -1:
        repository, tag = path[:colon], path[colon + 1 :]
        if not TAG_RE.fullmatch(tag):
            raise RemoteProtocolError(f"reference {text[:200]!r} has an invalid tag")
    if not NAME_RE.fullmatch(repository) or len(repository) > MAX_NAME_LENGTH:
        raise RemoteProtocolError(f"reference {text[:200]!r} has an invalid repository name")
    if tag is None and digest is None:
        raise RemoteProtocolError(f"reference {text[:200]!r} has neither a tag nor a digest")
    return Reference(registry=registry, repository=repository, tag=tag, digest=digest)
