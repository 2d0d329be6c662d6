"""The OCI distribution pull API over the node's store, with the peer proxy on a miss.

Up to three listeners, one server: every request knows which it came in on.

- ``mirror`` (``--registry-addr``, loopback by default): containerd's. The pull API
  (proxying misses to peers), ``/status``, ``/metrics``, ``/healthz``, ``/readyz``.
- ``peer`` (``--peer-addr``): other nodes'. The pull API only, from this node's store
  (never proxied on), and only for a request signed with the cluster key (``_auth``);
  anything else is a 401, counted by reason.
- ``metrics`` (``--metrics-addr``, optional): ``/metrics`` and ``/status`` only.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from spegeld.errors import ContainerdError, ListenError, NotFound
from spegeld.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from spegeld.metrics import MetricsRegistry
from spegeld.netaddr import join_host_port, open_tcp_listeners
from spegeld.oci import Digest, ShareFilter, is_index, is_manifest, tag_key
from spegeld.routing import Router
from spegeld.store import Store

from ._auth import HEADER as AUTH_HEADER
from ._auth import NonceMemory, PeerKeys, Refused, sign, verify
from ._errors import OciError, blob_unknown, manifest_unknown, not_found
from ._http import (
    ERROR_KINDS,
    BytesBody,
    FileBody,
    HttpServer,
    Limits,
    Request,
    Response,
    StreamBody,
)
from ._inflight import Designation, InflightFeeds, blob_holders, inflight_response, tracked
from ._labels import RegistryLabels
from ._metrics import AdvertisedCounts, HttpMetrics, MirrorMetrics
from ._peer import MIRRORED_HEADER
from ._private import PrivateAccess
from ._proxy import Proxy, ProxySettings
from ._ranges import parse_range
from ._routes import Kind, Route, parse_target
from ._unproven import DiscardPartial

logger = logging.getLogger(__name__)

MAX_MANIFEST_SIZE = 4 * 1024 * 1024
JSON = b"application/json"
API_VERSION = (b"docker-distribution-api-version", b"registry/2.0")
UNBOUNDED = 1 << 62  # validates a Range header's syntax when the size is not known here
CONTAINERD_AGENT = b"containerd/"  # how containerd's requests name themselves (User-Agent)
MIRROR, PEER, METRICS = "mirror", "peer", "metrics"  # the listeners' names (Request.listener)
_PULL = frozenset({Kind.BASE, Kind.MANIFEST, Kind.BLOB})
_METRICS_ONLY = frozenset({Kind.METRICS, Kind.STATUS})
_CHALLENGE = (b"www-authenticate", b'SpegeldPeer realm="spegeld"')


@dataclass(frozen=True, slots=True)
class Listen:
    """One more listener: ``host:port`` to bind, or the sockets systemd passed for it."""

    host: str
    port: int
    inherited: tuple[trio.SocketListener, ...] = ()


@dataclass(frozen=True, slots=True)
class MirrorSettings:
    host: str = "127.0.0.1"
    port: int = 5000
    mirrored_registries: frozenset[str] = frozenset()  # empty: every registry
    resolve_tags: bool = True
    share: ShareFilter = field(default_factory=ShareFilter)  # registry filters: 404 if not shared
    limits: Limits = field(default_factory=Limits)
    proxy: ProxySettings = field(default_factory=ProxySettings)
    # Sockets systemd passed (socket activation): served instead of host:port.
    inherited: tuple[trio.SocketListener, ...] = ()
    # The peer listener. None: no separate one, peers use the mirror listener unsigned
    # (in-process tests and benchmarks; the daemon always has one).
    peer: Listen | None = None
    metrics: Listen | None = None  # None: /metrics and /status on the mirror listener only
    # --private-registry: (registry as ``ns`` names it, upstream endpoint URL) pairs whose
    # content the mirror listener serves only to credentials the upstream accepts.
    private_registries: tuple[tuple[str, str], ...] = ()
    # --coordinate-pulls: simultaneous misses of one repository let one node fetch each
    # blob upstream while the others follow its download (docs/protocol.md §9). The daemon
    # turns it on with gossip; it needs a router that names only the nodes holding a key
    # (a static one names every peer for everything), so it is off here by default.
    coordinate_pulls: bool = False


class MirrorServer:
    def __init__(
        self,
        store: Store,
        router: Router,
        metrics: MetricsRegistry,
        settings: MirrorSettings,
        *,
        ready: Callable[[], bool],
        status: Callable[[], dict[str, Any]],
        discard_partial: DiscardPartial | None = None,
        peer_keys: PeerKeys | None = None,
    ) -> None:
        """``peer_keys``: this node's name and cluster keys, to sign requests to peers and
        check requests on the peer listener; None or keyless: neither (insecure mode)."""
        self._store = store
        self._router = router
        self._metrics_registry = metrics
        self._metrics = MirrorMetrics(metrics)
        AdvertisedCounts(metrics, store)  # counted at every scrape
        self._settings = settings
        self._ready = ready
        self._status = status
        self._keys = peer_keys
        self._nonces = NonceMemory()
        self._feeds = InflightFeeds()  # blobs proxied from in-flight holders right now
        # Who fetches a blob nobody holds yet when several nodes pull at once (§9).
        self._designation = Designation(
            router, self._node, settings.proxy.holders_to_try,
            downloading=lambda digest: store.inflight(digest) is not None,
        )  # fmt: skip
        self._proxy = Proxy(router, self._metrics, settings.proxy, discard_partial, sign=self._sign)
        self._refused = {
            reason: self._metrics.peer_auth_failures.labels(reason=reason)
            for reason in ("missing", "malformed", "unknown_key", "bad_signature", "stale",
                           "replay")
        }  # fmt: skip
        self._labels = RegistryLabels(settings.mirrored_registries)
        self._private = PrivateAccess(dict(settings.private_registries), metrics)
        errors = {kind: self._metrics.http_errors.labels(kind=kind) for kind in ERROR_KINDS}
        self._server = HttpServer(
            self.handle,
            settings.limits,
            on_error=lambda kind: errors[kind].inc(),
            accounting=HttpMetrics(metrics),
        )
        self.addresses: list[tuple[str, int]] = []  # the mirror listener's
        self.peer_addresses: list[tuple[str, int]] = []
        self.metrics_addresses: list[tuple[str, int]] = []

    def set_peer_keys(self, keys: PeerKeys | None) -> None:
        """New keys (a reload rotated the cluster key): they sign and verify from now on."""
        self._keys = keys

    def _node(self) -> str:
        """This node's name (gossip's node id); empty without keys (in-process tests)."""
        return self._keys.node if self._keys is not None else ""

    def _sign(self, method: bytes, target: bytes) -> bytes | None:
        keys = self._keys
        return None if keys is None else sign(method, target, time.time(), keys)

    def statistics(self) -> dict[str, int]:
        return dataclasses.asdict(self._server.stats)

    def shutdown(self) -> None:
        self._server.shutdown()

    async def run(
        self, *, task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen, report the mirror listener's addresses, and serve until :meth:`shutdown`
        has drained. Every listener is bound before any is served: one that cannot be is a
        ListenError, and the others are closed."""
        settings = self._settings
        wanted = [(MIRROR, Listen(settings.host, settings.port, settings.inherited))]
        wanted += [(name, spec) for name, spec in ((PEER, settings.peer),
                   (METRICS, settings.metrics)) if spec is not None]  # fmt: skip
        listeners: list[trio.SocketListener] = []
        names: list[str] = []
        try:
            for name, spec in wanted:
                bound = list(spec.inherited) or await _listen(name, spec)
                listeners += bound
                names += [name] * len(bound)
        except BaseException:
            for listener in listeners:
                listener.socket.close()
            raise
        found: dict[str, list[tuple[str, int]]] = {MIRROR: [], PEER: [], METRICS: []}
        for name, listener in zip(names, listeners, strict=True):
            found[name].append(listener.socket.getsockname()[:2])
        self.addresses, self.peer_addresses = found[MIRROR], found[PEER]
        self.metrics_addresses = found[METRICS]

        async def serve(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            await self._server.serve(listeners, names=names, task_status=task_status)

        try:
            async with trio.open_nursery() as background:
                background.start_soon(self._designation.expire)
                await self._serve(serve, task_status)
                background.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self._private.aclose()

    async def _serve(
        self,
        serve: Callable[..., Any],
        task_status: trio.TaskStatus[list[tuple[str, int]]],
    ) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve)
            logger.info("registry mirror listening on %s", _describe(self.addresses))
            exposed = beyond_loopback(self.addresses)
            if exposed:
                logger.warning(
                    "the mirror listens on %s, not only on loopback: anyone who reaches it "
                    "can fetch any content any node holds, unauthenticated (containerd on "
                    "this host needs only --registry-addr 127.0.0.1:%d; peers use "
                    "--peer-addr)",
                    _describe(exposed),
                    exposed[0][1],
                )
            if self.peer_addresses:
                logger.info(
                    "peer listener on %s (%s)",
                    _describe(self.peer_addresses),
                    "node authentication required"
                    if self._keys is not None and self._keys.secure
                    else "NOT authenticated",
                )
            if self.metrics_addresses:
                logger.info("metrics listener on %s", _describe(self.metrics_addresses))
            task_status.started(self.addresses)

    async def handle(self, request: Request) -> Response:
        try:
            route = parse_target(request.method, request.target)
            if request.listener == PEER:
                if route.kind not in _PULL:
                    raise not_found(f"{route.kind.value} is not served to peers")
                self._authenticate(request)
                return await self._route(route, request, from_peer=True)
            if request.listener == METRICS and route.kind not in _METRICS_ONLY:
                raise not_found("only /metrics and /status are served here")
            if request.listener == MIRROR and route.kind in _PULL:
                await self._authorize_private(route, request)
            return await self._route(route, request)
        except OciError as exc:
            return _error(exc)
        except Exception:
            # A bug, not bad input: bad input is an OciError above.
            logger.exception("internal error answering %r", request.target[:200])
            self._server.record_error("handler")
            return _error(OciError(500, "UNKNOWN", "internal error"))

    def _authenticate(self, request: Request) -> None:
        """Nothing for a signed request (or in insecure mode); else the 401 OciError."""
        keys = self._keys
        if keys is None or not keys.secure:
            return
        verdict = verify(
            request.method,
            request.target,
            request.header(AUTH_HEADER),
            time.time(),
            keys,
            self._nonces,
        )
        if isinstance(verdict, Refused):
            self._refused[verdict.reason].inc()
            logger.debug("peer request refused (%s): %s", verdict.reason, verdict.detail)
            raise OciError(
                401,
                "UNAUTHORIZED",
                f"node authentication failed ({verdict.reason}): {verdict.detail}",
                (_CHALLENGE,),
            )

    async def _authorize_private(self, route: Route, request: Request) -> None:
        """Content of a --private-registry only for credentials its upstream accepts
        (``_private``): else the 401 challenge or a 404 OciError. Peers never ask here."""
        if route.kind is Kind.BASE or not self._private.is_private(route.upstream):
            return
        assert route.upstream is not None
        kind = "manifests" if route.kind is Kind.MANIFEST else "blobs"
        await self._private.authorize(
            route.upstream,
            route.name,
            f"{kind}/{route.reference}",
            request.header(b"authorization"),
        )

    async def _route(self, route: Route, request: Request, *, from_peer: bool = False) -> Response:
        if route.kind is Kind.BASE:
            return Response(200, [(b"content-type", JSON), API_VERSION], BytesBody(b"{}"))
        if route.kind is Kind.HEALTHZ:
            return _text(200, b"ok\n")
        if route.kind is Kind.READYZ:
            return _text(200, b"ready\n") if self._ready() else _text(503, b"not ready\n")
        if route.kind is Kind.METRICS:
            body = self._metrics_registry.render().encode()
            return Response(
                200, [(b"content-type", METRICS_CONTENT_TYPE.encode())], BytesBody(body)
            )
        if route.kind is Kind.STATUS:
            body = json.dumps(self._status(), indent=2, sort_keys=True).encode()
            return Response(200, [(b"content-type", JSON)], BytesBody(body))
        return await self._content(route, request, from_peer)

    async def _content(self, route: Route, request: Request, from_peer: bool) -> Response:
        upstream = route.upstream or "unknown"
        # A peer's request is answered from this node's store only: never proxied on.
        mirrored = from_peer or request.header(MIRRORED_HEADER) == b"true"
        source = "internal" if mirrored else "external"
        unknown = manifest_unknown if route.kind is Kind.MANIFEST else blob_unknown
        allow = self._settings.mirrored_registries
        if allow and route.upstream not in allow:
            raise unknown(f"registry {upstream} is not mirrored here")
        if not self._settings.share.shares(route.upstream, route.name, route.tag):
            raise unknown(f"{upstream}/{route.name} is not shared (registry filters)")
        key = self._key(route)
        if not mirrored:
            self._note_pull(route, key, request)
        response = await self._local(route, request, key)
        if response is None and mirrored and route.kind is Kind.BLOB and route.digest:
            response = await self._inflight(route.digest, request)
        if response is None and not mirrored:
            response = await self._proxied(route, request, key)
        cache = "hit" if response is not None else "miss"
        if response is not None:
            self._metrics.last_success.set(time.time())
        if response is not None and route.tag is not None and route.upstream is not None:
            self._labels.tag_hit(route.upstream)
        label = self._labels.label(route.upstream)  # bounded: ``ns`` is the client's choice
        self._metrics.mirror_requests.labels(registry=label, cache=cache, source=source).inc()
        if response is None:
            raise unknown(f"{route.name}:{route.reference} is not held by this cluster")
        return response

    def _key(self, route: Route) -> str:
        if route.digest is not None:
            return route.digest
        assert route.tag is not None
        if not self._settings.resolve_tags:
            raise manifest_unknown("tags are not resolved by this mirror")
        if route.upstream is None:
            raise manifest_unknown("the ns query parameter is required to resolve a tag")
        return tag_key(route.upstream, route.name, route.tag)

    def _note_pull(self, route: Route, key: str, request: Request) -> None:
        """containerd's manifest and blob requests mark this node as pulling the repository.

        Only containerd's (its User-Agent, ``containerd/<version>``, from ctr, CRI and the
        transfer service alike) start a pull: other clients (curl, skopeo, a registry UI)
        read without downloading into containerd's ingest, and co-pullers would wait for
        downloads that never come (docs/protocol.md §9)."""
        if not self._settings.coordinate_pulls:
            return
        repository = f"{route.upstream}/{route.name}"
        if route.kind is Kind.MANIFEST:
            if (request.header(b"user-agent") or b"").startswith(CONTAINERD_AGENT):
                self._designation.manifest(repository, key)
        elif route.kind is Kind.BLOB:
            self._designation.blob(repository)

    async def _local(self, route: Route, request: Request, key: str) -> Response | None:
        try:
            digest = route.digest or self._store.resolve(key)
            desc = self._store.descriptor(digest)
            if not self._bound(route, digest):
                return None
            if route.kind is Kind.MANIFEST:
                if not (is_index(desc.media_type) or is_manifest(desc.media_type)):
                    return None
                return await self._local_manifest(digest, desc.media_type, desc.size)
            return await self._local_blob(digest, desc.size, request)
        except (NotFound, ContainerdError) as exc:
            logger.debug("local miss for %s: %s", key, exc)
            return None

    def _bound(self, route: Route, digest: Digest) -> bool:
        """The repository binding of a private registry's digest (``ShareFilter.serves_under``):
        one request names the repository its credentials were checked for, and is served only
        what an image of that name (or of a registry that is not private) holds."""
        share = self._settings.share
        if not share.private:
            return True
        if share.serves_under(self._store.image_names(digest), route.upstream, route.name):
            return True
        self._private.unbound()
        logger.debug(
            "%s is not served under %s/%s (private binding)", digest, route.upstream, route.name
        )
        return False

    async def _local_manifest(self, digest: Digest, media_type: str, size: int) -> Response:
        if size > MAX_MANIFEST_SIZE:
            raise manifest_unknown(f"{digest} is too large to be a manifest")
        blob = await self._store.open(digest)
        body = b"".join([chunk async for chunk in blob.chunks])
        self._metrics.bytes_served.labels(source="local").inc(len(body))
        headers = [
            (b"content-type", media_type.encode()),
            (b"docker-content-digest", digest.encode()),
        ]
        return Response(200, headers, BytesBody(body))

    async def _local_blob(self, digest: Digest, size: int, request: Request) -> Response:
        wanted = parse_range(request.header(b"range"), size)
        offset, length = (wanted.start, wanted.length) if wanted else (0, size)
        headers = [
            (b"content-type", b"application/octet-stream"),
            (b"docker-content-digest", digest.encode()),
            (b"accept-ranges", b"bytes"),
        ]
        if wanted is not None:
            headers.append((b"content-range", wanted.content_range(size).encode()))
        status = 206 if wanted else 200
        if request.method != b"HEAD":
            self._metrics.bytes_served.labels(source="local").inc(length)
        blob = await self._store.open(digest, offset, length)
        if blob.path is not None:
            return Response(status, headers, FileBody(blob.path, offset, length))
        return Response(status, headers, StreamBody(blob.chunks, length))

    async def _proxied(self, route: Route, request: Request, key: str) -> Response | None:
        by_tag = route.kind is Kind.MANIFEST and route.digest is None
        inflight = False
        if route.kind is Kind.BLOB and route.digest is not None:
            if self._settings.coordinate_pulls:
                repository = f"{route.upstream}/{route.name}"
                holders, inflight = await self._designation.holders(
                    self._proxy, route.digest, repository
                )
            else:
                holders, inflight = blob_holders(self._proxy, route.digest)
        else:
            holders = self._proxy.holders(key, tag=by_tag)
        if not holders:
            return None
        kind = "manifests" if route.kind is Kind.MANIFEST else "blobs"
        target = f"/v2/{route.name}/{kind}/{route.reference}"
        if route.upstream is not None:
            target += f"?ns={route.upstream}"
        if by_tag:
            return await self._proxy.tag(holders, request, target.encode())
        if route.kind is Kind.MANIFEST:
            return await self._proxy.manifest(holders, request, target.encode(), route.digest)
        assert route.digest is not None
        range_header = request.header(b"range")
        wanted = parse_range(range_header, UNBOUNDED) if range_header else None
        fetch = self._proxy.blob(
            holders, request, target.encode(), route.digest, wanted, range_header
        )
        return await (tracked(self._feeds, route.digest, fetch) if inflight else fetch)

    async def _inflight(self, digest: Digest, request: Request) -> Response | None:
        """A peer's request for a blob this node is downloading now (``_inflight``)."""
        ingest = self._store.inflight(digest)
        if ingest is None or self._feeds.fed(digest):
            return None
        served = self._metrics.bytes_served.labels(source="inflight").inc
        return await inflight_response(ingest, request, served)


def _error(exc: OciError) -> Response:
    headers = [(b"content-type", JSON), API_VERSION, *exc.headers]
    return Response(exc.status, headers, BytesBody(exc.body()))


def _text(status: int, body: bytes) -> Response:
    return Response(status, [(b"content-type", b"text/plain; charset=utf-8")], BytesBody(body))


async def _listen(name: str, spec: Listen) -> list[trio.SocketListener]:
    try:
        return await open_tcp_listeners(spec.host, spec.port)  # "::": dual-stack
    except OSError as exc:
        reason = exc.strerror or str(exc)
        what = {MIRROR: "the mirror", PEER: "the peer listener", METRICS: "the metrics listener"}
        raise ListenError(
            f"{what[name]} cannot listen on {join_host_port(spec.host, spec.port)}: {reason}"
        ) from exc


def _describe(addresses: list[tuple[str, int]]) -> str:
    return ", ".join(join_host_port(host, port) for host, port in addresses)


def beyond_loopback(addresses: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """The listening addresses another host could reach (anything but loopback)."""
    return [a for a in addresses if not ipaddress.ip_address(a[0].split("%")[0]).is_loopback]
