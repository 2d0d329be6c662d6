"""The mirror's metrics: Spegel's names where Spegel has one, ``spegeld_`` otherwise.

Spegel's Grafana dashboard reads ``spegel_mirror_requests_total``,
``spegel_resolve_duration_seconds``, the ``spegel_advertised_*`` gauges and the
``http_*`` request metrics, so those keep Spegel's names, label names and buckets.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import cast

from spegeld.metrics import HistogramChild, MetricsRegistry
from spegeld.oci import Digest
from spegeld.store import Store

from ._labels import HANDLERS, NO_NS, handler_label, method_label
from ._messages import Request

RESOLVE_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)
# Spegel's response-size buckets (Go's ExponentialBuckets(1024, 5, 10)): 1 KiB to 2 GB,
# so a manifest, a small layer and a large layer each land in buckets of their own.
RESPONSE_SIZE_BUCKETS = tuple(1024.0 * 5**power for power in range(10))
# Seconds a scrape may spend counting advertised content per registry (AdvertisedCounts):
# a few times a scrape's own cost, and short enough that the requests waiting meanwhile
# do not notice (a local blob GET costs about 0.3 ms of CPU).
CONTENT_BUDGET = 0.02
SOURCES = ("local", "peer", "inflight")  # spegeld_bytes_served_total's
# spegeld_proxy_errors_total's reasons (_proxy, _swarm); a peer's unexpected status adds
# status_4xx, status_5xx, ... (_proxy._status_reason) as it happens.
PROXY_ERROR_REASONS = (
    "unreachable",
    "broken",
    "bad_range",
    "unauthorized",
    "first_byte_timeout",
    "tag_disagreement",
)


class HttpMetrics:
    """Spegel's ``http_*`` series, fed by the server for every request its handler got
    (``_http.RequestAccounting``). Labels ``handler``, ``method`` and ``code`` as Spegel's;
    the duration runs until the body is sent, as in Spegel (its handlers write the body).

    Hot path: one dictionary lookup per request for the two histograms' series (cached
    by handler, method and status), one for the in-flight gauge's."""

    def __init__(self, metrics: MetricsRegistry) -> None:
        self.duration = metrics.histogram(
            "http_request_duration_seconds",
            "The latency of the HTTP requests.",
            ("handler", "method", "code"),
        )
        self.size = metrics.histogram(
            "http_response_size_bytes",
            "The size of the HTTP responses.",
            ("handler", "method", "code"),
            buckets=RESPONSE_SIZE_BUCKETS,
        )
        inflight = metrics.gauge(
            "http_requests_inflight",
            "The number of inflight requests being handled at the same time.",
            ("handler",),
        )
        self._inflight = {handler: inflight.labels(handler=handler) for handler in HANDLERS}
        self._series: dict[tuple[str, str, int], tuple[HistogramChild, HistogramChild]] = {}

    def begin(self, request: Request) -> tuple[str, str, float]:
        handler = handler_label(request.target)
        self._inflight[handler].inc()
        return handler, method_label(request.method), time.perf_counter()

    def end(self, token: object, status: int, size: int) -> None:
        handler, method, started = cast(tuple[str, str, float], token)
        key = (handler, method, status)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = self._add(handler, method, status)
        series[0].observe(time.perf_counter() - started)
        series[1].observe(size)
        self._inflight[handler].dec()

    def _add(self, handler: str, method: str, status: int) -> tuple[HistogramChild, HistogramChild]:
        labels = {"handler": handler, "method": method, "code": str(status)}
        return self.duration.labels(**labels), self.size.labels(**labels)


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
        self.last_success = metrics.gauge(
            "spegel_mirror_last_success_timestamp_seconds",
            "The timestamp of the last successful mirror request.",
        )
        # Every known label value from the start: a dashboard's rate() and a test's
        # lookup find the series at 0 instead of no series until the first event.
        for source in SOURCES:
            self.bytes_served.labels(source=source)
        for reason in PROXY_ERROR_REASONS:
            self.proxy_errors.labels(reason=reason)


class AdvertisedCounts:
    """Spegel's ``spegel_advertised_*`` gauges per registry, counted at scrape time.

    - ``image_tags``: the tag keys held (``registry/repository:tag``);
    - ``image_digests``: the distinct manifests (or indexes) those tags name;
    - ``content_digests``: the digests held, each counted under every registry an image
      that reaches it is named in (a layer shared by two registries' images counts twice).

    The registry is that of containerd's image names (a name without one: ``unknown``).
    Tags are counted whenever the held keys changed. Content asks the store, per digest,
    for its images: O(digests x images), 0.7 s for 10,000 digests of 1,000 images. So a
    scrape spends at most ``budget`` seconds on it and the next one goes on where it
    stopped; the gauge shows the last complete count meanwhile, and a change during a
    pass starts another once it ends. A scrape never stalls the event loop (every
    request waits while it runs) for longer than that.
    """

    def __init__(
        self, metrics: MetricsRegistry, store: Store, budget: float = CONTENT_BUDGET
    ) -> None:
        self._store = store
        self._budget = budget
        self._gauges = {
            name: metrics.gauge(f"spegel_advertised_{name}", help_text, ("registry",))
            for name, help_text in (
                ("image_tags", "Number of image tags advertised to be available."),
                ("image_digests", "Number of image digests advertised to be available."),
                ("content_digests", "Number of content digests advertised to be available."),
            )
        }
        self._held: tuple[frozenset[str], frozenset[tuple[str, str]]] | None = None
        self._pending: list[Digest] | None = None  # digests the content pass has yet to count
        self._counted: Counter[str] = Counter()
        self._stale = False  # the held digests changed since the pass under way began
        metrics.on_scrape(self.refresh)

    def refresh(self) -> None:
        snapshot = self._store.list()
        held = (frozenset(snapshot.digests), frozenset(snapshot.tags.items()))
        if held != self._held:
            self._held = held
            self._count_tags(snapshot.tags)
            if self._pending is None:
                self._pending, self._counted = list(snapshot.digests), Counter()
            else:
                self._stale = True
        if self._pending is not None:
            self._count_content(snapshot.digests)

    def _count_tags(self, held: Mapping[str, Digest]) -> None:
        tags: Counter[str] = Counter()
        images: dict[str, set[str]] = {}
        for key, digest in held.items():
            registry = registry_of(key)
            tags[registry] += 1
            images.setdefault(registry, set()).add(digest)
        self._publish("image_tags", tags)
        self._publish("image_digests", Counter({r: len(d) for r, d in images.items()}))

    def _count_content(self, latest: Iterable[Digest]) -> None:
        deadline = time.perf_counter() + self._budget
        while self._pending is not None:
            pending, counted = self._pending, self._counted
            while pending:
                names = self._store.image_names(pending.pop())
                counted.update({registry_of(name) for name in names})
                if time.perf_counter() >= deadline and pending:
                    return
            self._publish("content_digests", counted)
            self._pending = None
            if self._stale:
                self._stale = False
                self._pending, self._counted = list(latest), Counter()
                if time.perf_counter() >= deadline:
                    return

    def _publish(self, name: str, counts: Counter[str]) -> None:
        gauge = self._gauges[name]
        # A registry no longer held reads 0 (its series stays: label values are bounded
        # by the registries this node's images ever came from).
        for (held_before,) in gauge.label_values():
            if held_before not in counts:
                gauge.labels(registry=held_before).set(0)
        for registry, count in counts.items():
            gauge.labels(registry=registry).set(count)


def registry_of(name: str) -> str:
    """The registry of a containerd image name or tag key (``docker.io/library/x:1``)."""
    first, slash, _ = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        return first
    return NO_NS
