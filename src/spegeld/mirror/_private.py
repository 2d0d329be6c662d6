"""Private registries: their content is served only to a pull the upstream would allow.

docs/security.md, "Design: serving a private registry only to pulls the upstream would
allow". On the mirror listener (containerd's), a request for content under a registry
marked private (``?ns=``) needs ``Authorization: Basic``: without it, ``401`` with a Basic
challenge (containerd then retries with the pull's credentials, or moves on to the
upstream). With it, the upstream is asked once, with those credentials, whether they may
pull from that repository; the verdict is cached per (HMAC of the credentials,
registry, repository). Refused, or the upstream unreachable: ``404`` (fail closed), and
containerd goes to the upstream, which gives the kubelet its own answer.

:class:`PrivateGate` is the sans-I/O core (decision and cache); :func:`check_upstream`
asks the upstream; :class:`PrivateAccess` joins them for the server. Credentials never
leave this module except towards the configured upstream endpoint: not to peers, not
into gossip, logs or metrics (only their HMAC under a key drawn at start is kept).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import trio

from spegeld.metrics import MetricsRegistry

from ._errors import OciError

logger = logging.getLogger(__name__)

# An accepted verdict lasts about one rollout's burst of pulls, and is short enough that
# a revoked credential stops working within a minute.
ACCEPT_TTL = 60.0
# A refused one lasts less: a credential just granted works again within seconds, while a
# pull with wrong credentials (each object asked twice) still costs the upstream one check.
REFUSE_TTL = 10.0
# Distinct (credential, registry, repository) verdicts kept: a few thousand covers every
# repository a node pulls within a minute; beyond, the least recently used is forgotten
# (it costs one more upstream check, never a wrong answer).
CACHE_ENTRIES = 4096
# Upstream checks in flight at once; more (distinct keys at the same moment) are refused
# (404: containerd goes to the upstream) rather than queued without bound.
MAX_CHECKS = 64
# One check (challenge, token, HEAD) may take this long; containerd waits on the mirror
# meanwhile, and its fall-back to the upstream is what a timeout costs.
CHECK_DEADLINE = 5.0
REDIRECTS = frozenset({301, 302, 303, 307, 308})
MAX_HEADER = 4096  # an Authorization header longer than this is not a registry credential
REALM = b'Basic realm="spegeld"'
CHALLENGE = ((b"www-authenticate", REALM),)
_MANIFEST_ACCEPT = ", ".join(
    [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)
_PARAM = re.compile(r'(\w+)="([^"]*)"')
_NETLOC = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)(:\d{1,5})?")


def endpoint_of(entry: str) -> tuple[str, str]:
    """``--private-registry`` ``HOST`` or ``URL`` → (registry as ``ns`` names it, endpoint).

    ``registry.example`` → ``https://registry.example``; ``http://10.0.0.5:5000`` keeps
    its scheme; ``docker.io`` is served by ``https://registry-1.docker.io`` (as containerd
    maps it). Raises ValueError for anything else."""
    text = entry.strip().rstrip("/")
    if "://" not in text:
        text = "https://" + text
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path:
        raise ValueError(f"{entry!r} is not a registry host or http(s) URL")
    if parts.query or parts.fragment or not _NETLOC.fullmatch(parts.netloc):
        raise ValueError(f"{entry!r} is not a registry host or http(s) URL")
    host = parts.netloc
    if host == "docker.io":
        return host, "https://registry-1.docker.io"
    return host, f"{parts.scheme}://{host}"


def basic_credentials(header: bytes | None) -> tuple[str, str] | None:
    """``Authorization: Basic base64(user:secret)`` → (user, secret); None for anything else
    (absent, another scheme, malformed, empty user or secret)."""
    if header is None or len(header) > MAX_HEADER:
        return None
    scheme, _, value = header.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, secret = decoded.partition(":")
    return (user, secret) if sep and user and secret else None


@dataclass(frozen=True, slots=True)
class Challenge:
    """No usable credentials: answer 401 with the Basic challenge."""


@dataclass(frozen=True, slots=True)
class Allowed:
    """A cached acceptance: serve as usual."""


@dataclass(frozen=True, slots=True)
class Denied:
    """A cached refusal: 404, containerd goes to the upstream."""


@dataclass(frozen=True, slots=True)
class Check:
    """Ask the upstream with these credentials, then :meth:`PrivateGate.record`."""

    key: tuple[bytes, str, str]
    endpoint: str
    user: str
    secret: str


Decision = Challenge | Allowed | Denied | Check


class PrivateGate:
    """Which registries are private, and the verdicts cached for them. No I/O, no clock."""

    def __init__(
        self,
        registries: Mapping[str, str],
        *,
        capacity: int = CACHE_ENTRIES,
        secret: bytes | None = None,
    ) -> None:
        """``registries``: registry host (as ``ns`` names it) → upstream endpoint URL."""
        self._endpoints = dict(registries)
        self._capacity = capacity
        self._secret = secret if secret is not None else os.urandom(32)
        self._verdicts: OrderedDict[tuple[bytes, str, str], tuple[bool, float]] = OrderedDict()

    def is_private(self, registry: str | None) -> bool:
        return registry is not None and registry in self._endpoints

    def __len__(self) -> int:
        return len(self._verdicts)

    def decide(
        self, registry: str, repository: str, authorization: bytes | None, now: float
    ) -> Decision:
        """What to do with a request for ``registry/repository`` (a private registry)."""
        creds = basic_credentials(authorization)
        if creds is None:
            return Challenge()
        user, secret = creds
        mac = hmac.new(self._secret, f"{user}\0{secret}".encode(), hashlib.sha256).digest()
        key = (mac, registry, repository)
        cached = self._verdicts.get(key)
        if cached is not None:
            accepted, expires = cached
            if now < expires:
                self._verdicts.move_to_end(key)
                return Allowed() if accepted else Denied()
            del self._verdicts[key]
        return Check(key, self._endpoints[registry], user, secret)

    def record(self, key: tuple[bytes, str, str], accepted: bool, now: float) -> None:
        self._verdicts[key] = (accepted, now + (ACCEPT_TTL if accepted else REFUSE_TTL))
        self._verdicts.move_to_end(key)
        while len(self._verdicts) > self._capacity:
            self._verdicts.popitem(last=False)


async def check_upstream(
    http: httpx.AsyncClient,
    endpoint: str,
    repository: str,
    path: str,
    user: str,
    secret: str,
) -> bool:
    """Whether the upstream lets ``user`` ``HEAD`` ``/v2/<repository>/<path>`` (a manifest or
    blob), following a Basic or Bearer challenge as containerd would. True for 2xx and for
    a redirect (storage behind the registry); a refusal, an error or an unreachable
    upstream is False. The caller sets the deadline."""
    url = f"{endpoint}/v2/{repository}/{path}"
    headers = {"accept": _MANIFEST_ACCEPT}
    basic = httpx.BasicAuth(user, secret)
    try:
        response = await http.head(url, headers=headers, auth=basic)
        if response.status_code == 401:
            token = await _bearer_token(http, response, repository, basic)
            if token is None:
                return False
            headers["authorization"] = f"Bearer {token}"
            response = await http.head(url, headers=headers)
    except httpx.HTTPError as exc:
        logger.info("private registry %s unreachable for a check: %s", endpoint, type(exc).__name__)
        return False
    # A redirect comes after the registry's auth: a blob HEAD on S3 or GCS storage is sent
    # on to the bucket (307) once the pull is allowed. Not followed: the bucket's answer
    # says nothing about the credentials.
    return 200 <= response.status_code < 300 or response.status_code in REDIRECTS


async def _bearer_token(
    http: httpx.AsyncClient, challenged: httpx.Response, repository: str, basic: httpx.BasicAuth
) -> str | None:
    """The token a Bearer challenge's realm gives these credentials, or None."""
    scheme, _, params = challenged.headers.get("www-authenticate", "").partition(" ")
    if scheme.lower() != "bearer":
        return None  # a Basic challenge to Basic credentials: refused
    found = dict(_PARAM.findall(params))
    realm = found.get("realm", "")
    if urlsplit(realm).scheme not in ("http", "https"):
        return None
    query = {"scope": f"repository:{repository}:pull"}
    if "service" in found:
        query["service"] = found["service"]
    response = await http.get(realm, params=query, auth=basic)
    if response.status_code != 200:
        return None
    try:
        doc = response.json()
    except ValueError:
        return None
    token = doc.get("token") or doc.get("access_token") if isinstance(doc, dict) else None
    return token if isinstance(token, str) and token else None


class PrivateAccess:
    """The gate with its I/O: one upstream check per key at a time, bounded in number."""

    def __init__(
        self,
        registries: Mapping[str, str],
        metrics: MetricsRegistry,
        *,
        deadline: float = CHECK_DEADLINE,
        capacity: int = CACHE_ENTRIES,
    ) -> None:
        self.gate = PrivateGate(registries, capacity=capacity)
        self._deadline = deadline
        self._pending: dict[tuple[bytes, str, str], trio.Event] = {}
        self._http: httpx.AsyncClient | None = None  # made at the first check (TLS setup)
        checks = metrics.counter(
            "spegeld_private_checks_total",
            "Upstream checks of pull credentials for private registries, by result.",
            ("result",),
        )
        self._checks = {r: checks.labels(result=r) for r in ("accepted", "refused", "busy")}
        decisions = metrics.counter(
            "spegeld_private_requests_total",
            "Mirror requests for private registries, by decision.",
            ("decision",),
        )
        self._decisions = {
            d: decisions.labels(decision=d) for d in ("challenged", "served", "refused", "unbound")
        }

    def is_private(self, registry: str | None) -> bool:
        return self.gate.is_private(registry)

    def unbound(self) -> None:
        """Count a request the repository binding kept from a private digest."""
        self._decisions["unbound"].inc()

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()

    async def authorize(
        self, registry: str, repository: str, path: str, authorization: bytes | None
    ) -> None:
        """Return if the request may be served; else raise the OciError to answer with
        (401 with the challenge, or 404). ``path``: ``manifests/<ref>`` or ``blobs/<digest>``
        in the repository, what the upstream is asked about."""
        for _ in range(3):  # a waiter re-decides once the check it waited for is recorded
            decision = self.gate.decide(registry, repository, authorization, trio.current_time())
            if isinstance(decision, Challenge):
                self._decisions["challenged"].inc()
                raise OciError(401, "UNAUTHORIZED", "credentials required", CHALLENGE)
            if isinstance(decision, Allowed):
                self._decisions["served"].inc()
                return
            if isinstance(decision, Denied):
                break
            pending = self._pending.get(decision.key)
            if pending is not None:
                with trio.move_on_after(self._deadline):
                    await pending.wait()
                continue
            if len(self._pending) >= MAX_CHECKS:
                self._checks["busy"].inc()
                break
            await self._check(decision, path)
        self._decisions["refused"].inc()
        raise OciError(404, "NOT_FOUND", f"{registry}/{repository} is not served to this pull")

    async def _check(self, decision: Check, path: str) -> None:
        if self._http is None:
            # trust_env=False: no proxy or netrc from the environment sees the credentials.
            self._http = httpx.AsyncClient(timeout=self._deadline, trust_env=False)
        done = self._pending[decision.key] = trio.Event()
        accepted = False
        try:
            with trio.move_on_after(self._deadline):
                accepted = await check_upstream(
                    self._http,
                    decision.endpoint,
                    decision.key[2],
                    path,
                    decision.user,
                    decision.secret,
                )
            self._checks["accepted" if accepted else "refused"].inc()
            self.gate.record(decision.key, accepted, trio.current_time())
        finally:
            del self._pending[decision.key]
            done.set()
