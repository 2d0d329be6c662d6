"""The ``registry`` label of the mirror metrics, from a bounded set.

``?ns=`` is chosen by the client, so its value cannot be a label as it is: every
distinct one would be a new series kept for the life of the daemon. A label is
the ``ns`` only when it is configured (``--mirrored-registries``), well known, or
proven by a tag this cluster holds under it; anything else is ``other``.
"""

from __future__ import annotations

from collections.abc import Iterable

# Registries most clusters pull from, so their series exist from the first request.
WELL_KNOWN_REGISTRIES = frozenset(
    {
        "docker.io",
        "registry-1.docker.io",
        "ghcr.io",
        "quay.io",
        "registry.k8s.io",
        "gcr.io",
        "k8s.gcr.io",
        "public.ecr.aws",
        "mcr.microsoft.com",
        "nvcr.io",
        "registry.gitlab.com",
    }
)
# Registries learned from tag hits. A tag hit proves that this cluster holds an image
# under that registry, so this fills only as images from new registries are pulled; the
# cap holds however many there are (Spegel's dashboard is read by registry, and a few
# dozen registries is already a very mixed cluster).
MAX_LEARNED_REGISTRIES = 64
OTHER = "other"
NO_NS = "unknown"  # requests without ?ns= (a client that is not containerd)


class RegistryLabels:
    def __init__(self, configured: Iterable[str] = ()) -> None:
        self._fixed = WELL_KNOWN_REGISTRIES | frozenset(configured)
        self._learned: set[str] = set()

    def label(self, registry: str | None) -> str:
        if registry is None:
            return NO_NS
        if registry in self._fixed or registry in self._learned:
            return registry
        return OTHER

    def tag_hit(self, registry: str) -> None:
        """A tag under ``registry`` was served: the registry is real and may be a label."""
        if registry not in self._fixed and len(self._learned) < MAX_LEARNED_REGISTRIES:
            self._learned.add(registry)


# The ``handler`` label of the http_* metrics: Spegel's value for its pull API ("/v2/*",
# its Go mux pattern "/v2/" with the trailing slash as "*") and the path of each fixed
# route. A path no route serves is "other": the target is the client's choice, so it is
# never a label as it is.
V2_HANDLER = "/v2/*"
FIXED_HANDLERS = {
    b"/healthz": "/healthz",
    b"/livez": "/livez",
    b"/readyz": "/readyz",
    b"/metrics": "/metrics",
    b"/status": "/status",
}
HANDLERS = (V2_HANDLER, *FIXED_HANDLERS.values(), OTHER)
# The ``method`` label: the methods HTTP defines; any other token a client sends is OTHER.
METHODS = {
    method.encode(): method
    for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE")
}
OTHER_METHOD = "OTHER"


def handler_label(target: bytes) -> str:
    """The ``handler`` label for a request target: bounded whatever the client sends."""
    if target.startswith(b"/v2/") or target == b"/v2" or target.startswith(b"/v2?"):
        return V2_HANDLER
    return FIXED_HANDLERS.get(target.partition(b"?")[0], OTHER)


def method_label(method: bytes) -> str:
    return METHODS.get(method, OTHER_METHOD)
