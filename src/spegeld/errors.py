"""The errors spegeld raises, translated at each seam from foreign exceptions.

    SpegeldError                    base; ``exit_code`` is what the CLI exits with
    ├── ConfigError                 bad flag, file or environment value
    │   └── KubeconfigError         a kubeconfig or in-cluster credential we cannot use
    ├── ContainerdError             talking to containerd failed
    │   ├── ContainerdUnavailable   socket missing, not a socket, refused, or containerd down
    │   ├── ContainerdPermission    the socket exists but we may not connect
    │   └── ContainerdNamespace     the namespace is unusable
    ├── KubeError                   talking to the Kubernetes API failed
    │   ├── KubeUnreachable         no HTTP answer: DNS, connect, TLS or timeout
    │   └── KubeStatusError         the API answered with an error Status
    │       └── LeaseConflict       409: someone changed the Lease first (a lost race)
    ├── ListenError                 a listening socket could not be opened
    ├── NotFound                    the content or image does not exist
    └── ProtocolError               a message broke its protocol
        ├── LocalProtocolError      we erred
        └── RemoteProtocolError     the peer erred (counted and dropped, never fatal)

grpclib and httpx exceptions never cross a seam: adapters map them to these with
``raise Mapped(...) from exc``.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "ContainerdError",
    "ContainerdNamespace",
    "ContainerdPermission",
    "ContainerdUnavailable",
    "KubeError",
    "KubeStatusError",
    "KubeUnreachable",
    "KubeconfigError",
    "LeaseConflict",
    "ListenError",
    "LocalProtocolError",
    "NotFound",
    "ProtocolError",
    "RemoteProtocolError",
    "SpegeldError",
]


class SpegeldError(Exception):
    """Base of every error spegeld raises on purpose."""

    exit_code = 1


class ConfigError(SpegeldError):
    """A flag, environment variable or config file holds a value we cannot use."""

    exit_code = 2


class ContainerdError(SpegeldError):
    """A call to containerd failed."""


class ContainerdUnavailable(ContainerdError):
    """containerd cannot be reached: no socket, not a socket, refused, or restarting."""


class ContainerdPermission(ContainerdError):
    """The containerd socket exists but this process may not connect to it."""


class ContainerdNamespace(ContainerdError):
    """The containerd namespace is invalid."""


class KubeconfigError(ConfigError):
    """A kubeconfig (or in-cluster credential) is missing a part, malformed or unsupported."""


class KubeError(SpegeldError):
    """A call to the Kubernetes API failed."""


class KubeUnreachable(KubeError):
    """No HTTP answer from the API server; ``__cause__`` holds the transport error."""


class KubeStatusError(KubeError):
    """The API server answered with an error ``Status``."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(f"{code} {reason}: {message}" if message else f"{code} {reason}")
        self.code = code
        self.reason = reason  # the Status ``reason``, e.g. Forbidden, Conflict, NotFound
        self.message = message


class LeaseConflict(KubeStatusError):
    """409: the Lease changed (or appeared) since we read it. A lost race, not a failure."""


class ListenError(SpegeldError):
    """An address to listen on is taken, not ours, or not permitted."""


class NotFound(SpegeldError):
    """The requested content, image or object does not exist."""


class ProtocolError(SpegeldError):
    """A message did not follow its protocol."""


class LocalProtocolError(ProtocolError):
    """We broke the protocol: a bug on our side."""


class RemoteProtocolError(ProtocolError):
    """The other side broke the protocol: count it, drop it, carry on."""
