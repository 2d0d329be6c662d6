"""Request targets → routes. Pure: validation happens here, once, before any I/O.

Only ``blobs/sha256/<64 hex>`` can ever reach the content directory: a digest
is validated against ``algorithm:hex`` here, and names, tags and ``ns``
against the OCI grammars, so no request text is ever used as a path.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote

from spegeld.errors import RemoteProtocolError
from spegeld.oci import (
    MAX_NAME_LENGTH,
    NAME_RE,
    REGISTRY_RE,
    TAG_RE,
    Digest,
    is_digest,
    parse_digest,
)

from ._errors import OciError, digest_invalid, name_invalid, not_found, unsupported

READ_METHODS = frozenset({b"GET", b"HEAD"})
MAX_TARGET_LENGTH = 4096
MAX_QUERY_FIELDS = 16
# ``ns`` names a registry host: a DNS name is at most 253 characters in text form, and
# each label at most 63 (RFC 1035 §2.3.4); an IPv6 literal at most 45 (INET6_ADDRSTRLEN
# - 1) plus its brackets. Longer is not a registry, so it is refused before it is used.
MAX_HOST_LENGTH = 253
MAX_LABEL_LENGTH = 63
MAX_IPV6_LITERAL = 45 + 2
MAX_PORT = 65535


class Kind(enum.Enum):
    BASE = "base"
    MANIFEST = "manifest"
    BLOB = "blob"
    HEALTHZ = "healthz"
    READYZ = "readyz"
    METRICS = "metrics"
    STATUS = "status"


_PLAIN = {
    "/healthz": Kind.HEALTHZ,
    "/livez": Kind.HEALTHZ,
    "/readyz": Kind.READYZ,
    "/metrics": Kind.METRICS,
    "/status": Kind.STATUS,
    "/v2": Kind.BASE,
    "/v2/": Kind.BASE,
}


@dataclass(frozen=True, slots=True)
class Route:
    kind: Kind
    name: str = ""
    digest: Digest | None = None
    tag: str | None = None
    upstream: str | None = None  # the ``ns`` query parameter: the upstream registry host

    @property
    def reference(self) -> str:
        return self.digest or self.tag or ""


def parse_target(method: bytes, target: bytes) -> Route:
    """Route a request, or raise the OciError to answer it with."""
    if len(target) > MAX_TARGET_LENGTH:
        raise OciError(414, "UNSUPPORTED", "request target too long")
    try:
        text = target.decode("ascii")
    except UnicodeDecodeError as exc:
        raise name_invalid("request target is not ASCII") from exc
    path, _, query = text.partition("?")
    if "%" in path:
        try:
            path = unquote(path, errors="strict")
        except UnicodeDecodeError as exc:
            raise name_invalid("request path has invalid percent-encoding") from exc
    if method not in READ_METHODS:
        raise unsupported(
            f"{method.decode('ascii', 'replace')} is not supported: a read-only mirror"
        )
    if path in _PLAIN:
        return Route(_PLAIN[path], upstream=_ns(query))
    if not path.startswith("/v2/"):
        raise not_found(f"no route for {path[:100]}")
    rest = path[len("/v2/") :]
    for marker, kind in (("/manifests/", Kind.MANIFEST), ("/blobs/", Kind.BLOB)):
        name, found, reference = rest.rpartition(marker)
        if found:
            return _content_route(kind, name, reference, _ns(query))
    raise not_found(f"no route for {path[:100]}")


def _content_route(kind: Kind, name: str, reference: str, upstream: str | None) -> Route:
    if len(name) > MAX_NAME_LENGTH or not NAME_RE.fullmatch(name):
        raise name_invalid(f"invalid repository name {name[:100]!r}")
    if kind is Kind.BLOB or ":" in reference:
        if not is_digest(reference):
            raise digest_invalid(f"invalid digest {reference[:100]!r}")
        try:
            digest = parse_digest(reference)
        except RemoteProtocolError as exc:  # pragma: no cover - is_digest said yes
            raise digest_invalid(str(exc)) from exc
        return Route(kind, name=name, digest=digest, upstream=upstream)
    if not TAG_RE.fullmatch(reference):
        raise OciError(400, "TAG_INVALID", f"invalid tag {reference[:100]!r}")
    return Route(kind, name=name, tag=reference, upstream=upstream)


def _ns(query: str) -> str | None:
    if not query:
        return None
    try:
        fields = parse_qsl(query, keep_blank_values=True, max_num_fields=MAX_QUERY_FIELDS)
    except ValueError as exc:
        raise OciError(400, "UNSUPPORTED", "malformed query string") from exc
    values = [value for key, value in fields if key == "ns"]
    if not values:
        return None
    if len(values) > 1 or not is_upstream_host(values[0]):
        raise name_invalid(f"invalid ns {values[0][:100]!r}")
    return values[0]


def is_upstream_host(value: str) -> bool:
    """Whether ``value`` is ``host[:port]`` that an upstream registry can really be named by."""
    if len(value) > MAX_HOST_LENGTH + len(":65535") or not REGISTRY_RE.fullmatch(value):
        return False
    if value.startswith("["):
        host, _, rest = value.partition("]")
        host += "]"
        limit = MAX_IPV6_LITERAL
    else:
        host, _, rest = value.partition(":")
        rest = ":" + rest if rest else ""
        limit = MAX_HOST_LENGTH
        if any(len(label) > MAX_LABEL_LENGTH for label in host.split(".")):
            return False
    port = rest.removeprefix(":")
    return len(host) <= limit and (not port or int(port) <= MAX_PORT)
