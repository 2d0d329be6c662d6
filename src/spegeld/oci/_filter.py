"""Which references this node shares: include and exclude rules on registry and repository.

A rule is a regular expression searched (not anchored: write ``^`` and ``$`` yourself) in
``registry/repository[:tag]``, the string Spegel's ``--registry-filters`` matches, so its
patterns carry over unchanged. A reference is shared when no exclude rule matches it and,
if any include rule is given, one of them does. Exclude wins.

The same filter decides what the store indexes (so what is advertised: a digest is
advertised only while an image that is shared reaches it) and what the mirror serves (a
request whose ``ns`` registry and repository are not shared gets 404, locally and from
peers). A request or an image name that does not name its registry is not shared while
any rule is set: no rule can be applied to it.

Private registries (``--private-registry``) are shared, but a digest of theirs only under a
name that holds it: :meth:`ShareFilter.serves_under` is the repository binding of
docs/security.md. With rules or private registries set, content no image names yet (loose
blobs, downloads in flight) is not shared at all (:attr:`ShareFilter.names_required`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from spegeld.errors import ConfigError, RemoteProtocolError
from spegeld.oci._reference import parse_reference


@dataclass(frozen=True, slots=True)
class ShareFilter:
    include: tuple[re.Pattern[str], ...] = ()
    exclude: tuple[re.Pattern[str], ...] = ()
    private: frozenset[str] = frozenset()  # registries (as ``ns`` names them) bound by name

    @classmethod
    def parse(
        cls, include: Iterable[str] = (), exclude: Iterable[str] = (), private: Iterable[str] = ()
    ) -> ShareFilter:
        """Compile the rules; a pattern that is not a regular expression is a ConfigError."""
        return cls(
            include=tuple(_compile(p, "--registry-include") for p in include),
            exclude=tuple(_compile(p, "--registry-filter") for p in exclude),
            private=frozenset(private),
        )

    @property
    def active(self) -> bool:
        """Whether any rule is set (with none, everything is shared)."""
        return bool(self.include or self.exclude)

    @property
    def names_required(self) -> bool:
        """Whether content is shared only once an image names it: with any rule (which
        needs a name to apply to) or a private registry (whose digests are bound to names).
        Loose blobs and downloads in flight carry no name, so they are then not shared."""
        return self.active or bool(self.private)

    def serves_under(self, names: Iterable[str], registry: str | None, repository: str) -> bool:
        """Whether a digest that the images ``names`` reach may be served to a request for
        ``registry/repository`` (the repository binding of docs/security.md).

        Without private registries, always. With them: when an image of a registry that is
        not private reaches the digest (that image already gives it away), or when one of
        its images is named ``registry/repository``. A digest no image names, or only names
        that do not parse (no registry to judge them by), is not served."""
        if not self.private:
            return True
        bound = False
        for name in names:
            try:
                ref = parse_reference(name)
            except RemoteProtocolError:
                continue
            if ref.registry not in self.private:
                return True
            bound = bound or (ref.registry == registry and ref.repository == repository)
        return bound

    def shares(self, registry: str | None, repository: str, tag: str | None = None) -> bool:
        """Whether a request for ``registry/repository[:tag]`` may be answered."""
        if not self.active:
            return True
        if registry is None:
            return False
        return self._shares_text(_text(registry, repository, tag))

    def shares_image(self, name: str) -> bool:
        """Whether a containerd image (by its name) is indexed, advertised and served."""
        if not self.active:
            return True
        try:
            ref = parse_reference(name)
        except RemoteProtocolError:
            return False
        return self._shares_text(_text(ref.registry, ref.repository, ref.tag))

    def rules(self) -> dict[str, list[str]]:
        """The patterns as given, for ``/status`` and doctor."""
        return {
            "include": [p.pattern for p in self.include],
            "exclude": [p.pattern for p in self.exclude],
        }

    def _shares_text(self, text: str) -> bool:
        if any(p.search(text) for p in self.exclude):
            return False
        return not self.include or any(p.search(text) for p in self.include)


def _text(registry: str, repository: str, tag: str | None) -> str:
    return f"{registry}/{repository}" + (f":{tag}" if tag is not None else "")


def _compile(pattern: str, flag: str) -> re.Pattern[str]:
    if not pattern:
        raise ConfigError(f"{flag}: an empty pattern would match every reference")
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"{flag} {pattern!r} is not a regular expression: {exc}") from exc
