"""Validation of the mirror target and the mirrored registries (pure, no I/O)."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from spegeld.errors import ConfigError

__all__ = ["MirroredRegistry", "parse_mirror_target", "parse_registries", "parse_registry"]

_URL_RE = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<authority>[^/?#]*)(?P<rest>.*)", re.S
)
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOSTNAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_NUMERIC_RE = re.compile(r"[0-9.]+")
_PORT_RE = re.compile(r"[0-9]{1,5}")
_MAX_HOSTNAME = 253
_SCHEMES = ("http", "https")

# containerd's docker.DefaultHost: Docker Hub's API does not live at docker.io itself.
DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"


@dataclass(frozen=True, slots=True)
class MirroredRegistry:
    """One mirrored registry, as ``--mirrored-registries`` names it (``https://docker.io``).

    ``host`` is ``host`` or ``host:port``, lowercased: the name containerd looks up under
    its hosts directory and the first component of an image reference.
    """

    scheme: str
    host: str

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}"

    @property
    def directory(self) -> str:
        """containerd's directory name for this registry: the host, with its port if any."""
        return self.host

    @property
    def server(self) -> str:
        """The upstream URL containerd falls back to (``docker.io`` → ``registry-1.docker.io``)."""
        host = DOCKER_HUB_API if self.host == DOCKER_HUB else self.host
        return f"{self.scheme}://{host}"


def _shown(text: str) -> str:
    return repr(text if len(text) <= 200 else text[:200] + "…")


def _split(text: str, what: str, given: str | None = None) -> tuple[str, str, str | None]:
    """``scheme://host[:port]`` → (scheme, host, port); ConfigError naming the value otherwise.

    ``given`` is the value as the user wrote it, when ``text`` added a scheme to it.
    """

    def bad(why: str) -> ConfigError:
        return ConfigError(
            f"{what} {_shown(text if given is None else given)} is not usable: {why}"
        )

    match = _URL_RE.fullmatch(text)
    if match is None:
        raise bad("expected a URL like http://host:port")
    scheme = match["scheme"].lower()
    if scheme not in _SCHEMES:
        raise bad(f"the scheme must be http or https, not {match['scheme']}")
    authority, rest = match["authority"], match["rest"]
    if rest not in ("", "/"):
        raise bad("it must not have a path, query or fragment")
    if "@" in authority:
        raise bad("it must not carry user information")
    if authority.startswith("["):
        inner, bracket, after = authority[1:].partition("]")
        if not bracket:
            raise bad("an IPv6 address needs its closing ]")
        try:
            if "%" in inner:
                raise ValueError
            ipaddress.IPv6Address(inner)
        except ValueError:
            raise bad(f"[{inner}] is not an IPv6 address") from None
        host = f"[{inner.lower()}]"
    else:
        host, colon, port_text = authority.partition(":")
        after = colon + port_text
        host = host.lower()
        if not host:
            raise bad("it has no host")
        if _NUMERIC_RE.fullmatch(host):
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise bad(f"{host} is not an IPv4 address") from None
        elif len(host) > _MAX_HOSTNAME or not _HOSTNAME_RE.fullmatch(host):
            raise bad(f"{host!r} is not a hostname, IPv4 address or [IPv6] address")
    port: str | None = None
    if after:
        if not after.startswith(":") or not _PORT_RE.fullmatch(after[1:]):
            raise bad("the port must be a number after the host")
        number = int(after[1:])
        if not 1 <= number <= 65535:
            raise bad(f"port {number} is out of range")
        port = str(number)
    return scheme, host, port


def parse_mirror_target(text: str) -> str:
    """Validate this node's mirror URL; returns it normalized (``http://127.0.0.1:5000``).

    It must be ``http(s)://host:port`` with an explicit port and nothing after it.
    """
    what = "mirror target"
    scheme, host, port = _split(text.strip(), what)
    if port is None:
        raise ConfigError(
            f"{what} {_shown(text)} is not usable: give the port spegeld listens on "
            "(e.g. http://127.0.0.1:5000)"
        )
    return f"{scheme}://{host}:{port}"


def parse_registry(text: str) -> MirroredRegistry:
    """Validate one mirrored registry: a URL (``http://10.0.0.1:5000``) or a bare host.

    A bare host (``docker.io``, ``10.0.0.1:5000``) means https, containerd's default
    scheme; ``spegeld run`` and ``spegeld configure`` both parse with this function.
    """
    stripped = text.strip()
    url = stripped if "://" in stripped else f"https://{stripped}"
    scheme, host, port = _split(url, "mirrored registry", stripped)
    return MirroredRegistry(scheme=scheme, host=host if port is None else f"{host}:{port}")


def parse_registries(text: str) -> tuple[MirroredRegistry, ...]:
    """A comma-separated list, in order and without repeats; empty means every registry.

    Two entries for one host with different schemes are refused: containerd keeps one
    hosts.toml per host.
    """
    found: dict[str, MirroredRegistry] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        registry = parse_registry(item)
        seen = found.get(registry.host)
        if seen is not None and seen != registry:
            raise ConfigError(
                f"mirrored registries {seen.url} and {registry.url} name one host; keep one"
            )
        found[registry.host] = registry
    return tuple(found.values())
