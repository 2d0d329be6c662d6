"""The mirror's metrics: Spegel's names where Spegel has one, ``spegeld_`` otherwise.

Spegel's Grafana dashboard reads ``spegel_mirror_requests_total``,
``spegel_resolve_duration_seconds`` and the ``spegel_advertised_*`` gauges, so
those keep Spegel's names and labels.
"""

from __future__ import annotations

from collections.abc import Callable

from spegeld.metrics import MetricsRegistry

RESOLVE_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)


class MirrorMetrics:
    def __init__(self, metrics: MetricsRegistry) -> None:
        self.mirror_requests = metrics.counter(
            "spegel_mirror_requests_total",
            "Mirror requests by registry and whether they were served (hit) or not (miss).",
            ("registry", "cache", "source"),
        )
        self.resolve_duration = metrics.histogram(
            "spegel_resolve_duration_seconds",
            "Time to find the holders of a key in the router.",
            ("router",),
            buckets=RESOLVE_BUCKETS,
        )
        self.bytes_served = metrics.counter(
            "spegeld_bytes_served_total",
            "Body bytes sent to clients, by where they came from (local, peer or inflight).",
            ("source",),
        )
        self.proxy_errors = metrics.counter(
            "spegeld_proxy_errors_total",
            "Failed fetches from peers, by reason.",
            ("reason",),
        )
        self.bad_peers = metrics.counter(
            "spegeld_bad_peers_total",
            "Peers marked bad for sending bytes that do not match their digest.",
        )
        self.hedges = metrics.counter(
            "spegeld_proxy_hedged_requests_total",
            "Second fetches started because the first peer was slow to answer.",
        )
        self.http_errors = metrics.counter(
            "spegeld_http_errors_total",
            "Client connections ended by the server, by kind: handler, body or internal (an "
            "error, logged), head_timeout, write_timeout, handler_timeout or body_timeout (a "
            "deadline), refused (the source was over its connection cap), accept (accept "
            "failed: out of file descriptors).",
            ("kind",),
        )
        self.peer_auth_failures = metrics.counter(
            "spegeld_peer_auth_failures_total",
            "Requests on the peer listener refused (401) for their node authentication, by "
            "reason: missing, malformed, unknown_key, bad_signature, stale or replay.",
            ("reason",),
        )
        self._advertised = {
            name: metrics.gauge(f"spegel_advertised_{name}", help_text, ("registry",))
            for name, help_text in (
                ("images", "Images this node advertises."),
                ("image_tags", "Image tags this node advertises."),
                ("image_digests", "Image digests this node advertises."),
                ("keys", "Keys this node advertises."),
            )
        }

    def track_advertised(self, name: str, value: Callable[[], float]) -> None:
        """Compute ``spegel_advertised_<name>`` at scrape time."""
        self._advertised[name].labels(registry="all").set_function(value)
