"""The few Kubernetes API calls spegeld makes, over one pooled ``httpx.AsyncClient``.

httpx errors stop here: no answer at all becomes :class:`KubeUnreachable` with the
transport error chained as ``__cause__`` (the doctor classifies DNS, refused,
timeout and TLS failures from it); an error answer becomes :class:`KubeStatusError`
built from the API's ``Status`` body, and a 409 on a Lease write :class:`LeaseConflict`.

Proxies from the environment are ignored (``trust_env=False``): the API is reached
directly, as a node-local daemon talking to KubePrism or the service VIP should.
"""

from __future__ import annotations

import json as jsonlib
import logging
import re
import ssl
import weakref
from collections.abc import Mapping
from http import HTTPStatus
from types import TracebackType
from typing import Any, Self

import httpx
import trio

from spegeld.errors import (
    ConfigError,
    KubeStatusError,
    KubeUnreachable,
    LeaseConflict,
)
from spegeld.kube._credentials import Credentials
from spegeld.kube._tls import ssl_context
from spegeld.metrics import Counter, MetricsRegistry

__all__ = ["VERBS", "KubeClient"]

logger = logging.getLogger(__name__)

# The fixed values of the ``verb`` label: a bounded set keeps the series count bounded.
VERBS = frozenset({"get", "create", "update", "delete", "version", "readyz", "review"})
# API answers here are a few KiB; a cap stops a broken or hostile endpoint exhausting memory.
MAX_BODY_BYTES = 1024 * 1024
READYZ_TEXT_LIMIT = 2000
# httpx applies ``timeout`` per phase (connect, write, each read); the whole request
# gets twice that, so a silent connect is still reported as the connect timeout it is.
TOTAL_TIMEOUT_FACTOR = 2
MAX_CAUSE_DEPTH = 20  # exception chains are short; the bound guards against cycles
_LEASES = "/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
_REVIEWS = "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"
# DNS-1123 subdomain: what namespaces and Lease names must be, and safe in a URL path.
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")

# One counter per registry, however many clients share it (the registry refuses a
# second registration of the same name). Weak keys: no registry outlives its owner.
_COUNTERS: weakref.WeakKeyDictionary[MetricsRegistry, Counter] = weakref.WeakKeyDictionary()


def _requests_counter(registry: MetricsRegistry) -> Counter:
    counter = _COUNTERS.get(registry)
    if counter is None:
        counter = registry.counter(
            "spegeld_kube_requests_total",
            "Kubernetes API requests by verb and HTTP status (error: no answer).",
            ("verb", "code"),
        )
        _COUNTERS[registry] = counter
    return counter


def _default_user_agent() -> str:
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    try:
        return f"spegeld/{version('spegeld')}"
    except PackageNotFoundError:
        return "spegeld/unknown"


class KubeClient:
    """``async with KubeClient(creds) as kube: await kube.get_lease(ns, name)``.

    The bearer token is fetched from ``creds`` for every request, so a rotated token
    file is picked up without a restart. If the file becomes unreadable later, the last
    token read is used (as client-go does) and a warning is logged.
    """

    def __init__(
        self,
        creds: Credentials,
        *,
        timeout: float = 5.0,
        metrics: MetricsRegistry | None = None,
        user_agent: str | None = None,
    ) -> None:
        self.creds = creds
        self.timeout = timeout
        self.last_date: str | None = None  # the last answer's Date header, for skew checks
        self._verify: ssl.SSLContext | bool = ssl_context(creds) if creds.uses_tls else True
        self._user_agent = user_agent or _default_user_agent()
        self._requests = _requests_counter(metrics) if metrics is not None else None
        self._extensions = {"sni_hostname": creds.tls_server_name} if creds.tls_server_name else {}
        self._last_token: str | None = None
        self._token_failing = False
        self._client: httpx.AsyncClient | None = None

    async def __aenter__(self) -> Self:
        self._client = httpx.AsyncClient(
            base_url=self.creds.server,
            verify=self._verify,
            timeout=httpx.Timeout(self.timeout),
            headers={"User-Agent": self._user_agent, "Accept": "application/json"},
            trust_env=False,
            follow_redirects=False,  # never carry the token to another address
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def request(
        self,
        method: str,
        path: str,
        *,
        verb: str,
        json: Any = None,
        params: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """One call; any HTTP answer is returned, no answer raises :class:`KubeUnreachable`."""
        if verb not in VERBS:
            raise ValueError(f"verb label {verb!r} is not one of {sorted(VERBS)}")
        if self._client is None:
            raise RuntimeError("KubeClient is used outside `async with`")
        headers = {}
        token = self._token()
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        what = f"{method} {self.creds.server}{path}"
        try:
            with trio.fail_after(self.timeout * TOTAL_TIMEOUT_FACTOR):
                response = await self._send(method, path, headers, json, params)
        except (httpx.RequestError, ssl.SSLError, OSError, trio.TooSlowError) as exc:
            self._count(verb, "error")
            raise KubeUnreachable(f"{what}: {_describe(exc)}") from exc
        except KubeStatusError as exc:  # an answer too large to keep
            self._count(verb, str(exc.code))
            raise
        self._count(verb, str(response.status_code))
        self.last_date = response.headers.get("Date")
        return response

    async def get_lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The Lease, or ``None`` when it does not exist."""
        path = f"{_leases(namespace)}/{_checked('Lease name', name)}"
        response = await self.request("GET", path, verb="get")
        if response.status_code == HTTPStatus.NOT_FOUND:
            return None
        return _object(response)

    async def create_lease(
        self, namespace: str, lease: dict[str, Any], *, dry_run: bool = False
    ) -> dict[str, Any]:
        """Create ``lease``; :class:`LeaseConflict` when it already exists."""
        params = {"dryRun": "All"} if dry_run else None
        response = await self.request(
            "POST", _leases(namespace), verb="create", json=lease, params=params
        )
        return _object(response)

    async def update_lease(
        self, namespace: str, name: str, lease: dict[str, Any]
    ) -> dict[str, Any]:
        """Replace the Lease; :class:`LeaseConflict` when its ``resourceVersion`` is stale."""
        path = f"{_leases(namespace)}/{_checked('Lease name', name)}"
        response = await self.request("PUT", path, verb="update", json=lease)
        return _object(response)

    async def delete_lease(self, namespace: str, name: str) -> bool:
        """Delete the Lease; ``False`` when it was already gone."""
        path = f"{_leases(namespace)}/{_checked('Lease name', name)}"
        response = await self.request("DELETE", path, verb="delete")
        if response.status_code == HTTPStatus.NOT_FOUND:
            return False
        _object(response)
        return True

    async def version(self) -> dict[str, Any]:
        return _object(await self.request("GET", "/version", verb="version"))

    async def readyz(self) -> tuple[int, str]:
        """The status code and (truncated) text of ``/readyz``; error codes are returned."""
        response = await self.request("GET", "/readyz", verb="readyz")
        return response.status_code, response.text[:READYZ_TEXT_LIMIT]

    async def access_review(
        self, namespace: str, verb: str, group: str, resource: str
    ) -> tuple[bool, str]:
        """Whether we may ``verb`` ``resource`` in ``namespace``, and the authorizer's reason."""
        review = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SelfSubjectAccessReview",
            "spec": {
                "resourceAttributes": {
                    "namespace": namespace,
                    "verb": verb,
                    "group": group,
                    "resource": resource,
                }
            },
        }
        answer = _object(await self.request("POST", _REVIEWS, verb="review", json=review))
        status = answer.get("status")
        if not isinstance(status, dict):
            return False, "the review came back without a status"
        allowed = status.get("allowed") is True
        reason = status.get("reason") or status.get("evaluationError") or ""
        return allowed, reason if isinstance(reason, str) else ""

    async def _send(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        json: Any,
        params: Mapping[str, str] | None,
    ) -> httpx.Response:
        assert self._client is not None
        request = self._client.build_request(
            method, path, headers=headers, json=json, params=params, extensions=self._extensions
        )
        response = await self._client.send(request, stream=True)
        try:
            body = bytearray()
            if _declared_length(response) <= MAX_BODY_BYTES:
                # Drain to the end even past the cap (the deadline bounds it): leaving
                # the stream's async generators half-consumed would leak them.
                async for chunk in response.aiter_raw():
                    if len(body) <= MAX_BODY_BYTES:
                        body += chunk
        finally:
            await response.aclose()
        if len(body) > MAX_BODY_BYTES or _declared_length(response) > MAX_BODY_BYTES:
            raise KubeStatusError(
                response.status_code,
                "ResponseTooLarge",
                f"the answer to {method} {path} is over {MAX_BODY_BYTES} bytes",
            )
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            content=bytes(body),
            request=request,
            extensions={"http_version": response.extensions.get("http_version", b"HTTP/1.1")},
        )

    def _token(self) -> str | None:
        try:
            token = self.creds.bearer_token()
        except ConfigError as exc:
            if self._last_token is None:
                raise
            if not self._token_failing:  # once per outage, not once per request
                logger.warning("%s; using the last token read", exc)
            self._token_failing = True
            return self._last_token
        self._last_token, self._token_failing = token, False
        return token

    def _count(self, verb: str, code: str) -> None:
        if self._requests is not None:
            self._requests.labels(verb=verb, code=code).inc()


def _declared_length(response: httpx.Response) -> int:
    try:
        return int(response.headers.get("Content-Length", "0"))
    except ValueError:
        return 0


def _leases(namespace: str) -> str:
    return _LEASES.format(namespace=_checked("namespace", namespace))


def _checked(what: str, name: str) -> str:
    if len(name) > 253 or not _DNS_SUBDOMAIN.fullmatch(name):
        raise ConfigError(f"{what} {name!r} is not a valid Kubernetes name")
    return name


def _describe(exc: BaseException) -> str:
    """One line: the httpx error type plus the innermost reason, e.g. ``Connection refused``.

    The reason sits several links down: httpx → httpcore → OSError → (trio's
    happy-eyeballs ExceptionGroup) → ConnectionRefusedError or SSLCertVerificationError.
    """
    if isinstance(exc, trio.TooSlowError):  # our overall deadline (trio.fail_after)
        return "no complete answer in time"
    text = ""
    current: BaseException | None = exc
    for _ in range(MAX_CAUSE_DEPTH):
        if current is None:
            break
        text = " ".join(str(current).split()) or text
        following = current.__cause__ or current.__context__
        if following is None and isinstance(current, BaseExceptionGroup):
            following = current.exceptions[0]
        current = following
    if not text:
        text = "timed out" if isinstance(exc, httpx.TimeoutException) else "no detail"
    return f"{type(exc).__name__}: {text}"


def _object(response: httpx.Response) -> dict[str, Any]:
    """The JSON object of a 2xx answer; any other answer raises its Status as an error."""
    if not response.is_success:
        raise _status_error(response)
    try:
        value = jsonlib.loads(response.content)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise KubeStatusError(response.status_code, "InvalidResponse", "the body is not JSON")
    return value


def _status_error(response: httpx.Response) -> KubeStatusError:
    code = response.status_code
    try:
        phrase = HTTPStatus(code).phrase
    except ValueError:
        phrase = "Unknown"
    reason, message = phrase, ""
    try:
        body = jsonlib.loads(response.content)
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("kind") == "Status":
        if isinstance(body.get("reason"), str) and body["reason"]:
            reason = body["reason"]
        if isinstance(body.get("message"), str):
            message = body["message"]
    else:
        message = response.content[:200].decode("utf-8", "replace")
    message = " ".join(message.split())
    error_type = LeaseConflict if code == HTTPStatus.CONFLICT else KubeStatusError
    return error_type(code, reason, message)
