"""The API server's request handling, free of I/O: bytes and time in, a response out.

The trio shell (``_server``) only moves bytes; everything a test asserts on
(authentication, authorization, routing, Status bodies) is decided here.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from . import _discovery as disc
from . import _protobuf as protobuf
from ._accounts import Account, non_resource_allowed
from ._leases import GROUP as LEASE_GROUP
from ._leases import RESOURCE as LEASES
from ._leases import LeaseStore
from ._protobuf import PROTOBUF
from ._schema import DELETE_OPTIONS, LEASE, SSAR, check_field_validation, decode_body
from ._status import (
    ApiError,
    FieldError,
    bad_request,
    forbidden,
    internal,
    invalid,
    method_not_allowed,
    not_found,
    resource_not_found,
    too_large,
    unauthorized,
)

logger = logging.getLogger(__name__)
MAX_BODY = 3 * 1024 * 1024  # kube-apiserver's request body limit
JSON = "application/json"
ANONYMOUS_PATHS = frozenset({"/version", "/readyz", "/livez", "/healthz"})
_NOT_READY_TEXT = (
    "[+]ping ok\n[+]log ok\n[-]etcd failed: reason withheld\n"
    "[+]poststarthook/start-apiserver-admission-initializer ok\nreadyz check failed\n"
)


@dataclass(frozen=True, slots=True)
class HttpRequest:
    method: str
    target: str
    headers: dict[str, str]  # lower-case names
    body: bytes = b""


@dataclass(slots=True)
class HttpResponse:
    status: int
    body: bytes
    content_type: str = JSON
    headers: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One handled request, for asserting how much load a client put on the API."""

    method: str
    path: str
    code: int
    user: str  # "" when unauthenticated
    at: float  # server wall-clock time (including any clock offset)


def _json(status: int, body: Any, headers: list[tuple[str, str]] | None = None) -> HttpResponse:
    return HttpResponse(status, json.dumps(body).encode(), JSON, headers or [])


def _text(status: int, text: str) -> HttpResponse:
    return HttpResponse(status, text.encode(), "text/plain; charset=utf-8")


class ApiCore:
    """State and request handling of one fake kube-apiserver."""

    def __init__(
        self,
        *,
        accounts: list[Account],
        namespaces: set[str],
        wall_clock: Callable[[], float],
        server_address: str = "127.0.0.1:6443",
        field_validation_default: str = "Strict",
    ) -> None:
        self.accounts = {a.token: a for a in accounts}
        self.wall_clock = wall_clock
        self.clock_offset = 0.0
        self.ready = True
        self.server_address = server_address
        self.field_validation_default = field_validation_default
        self.store = LeaseStore(self.now_datetime, set(namespaces))
        self.requests: list[RequestRecord] = []
        # Unexpected exceptions (server bugs), kept so a test can assert there were none.
        self.internal_errors: list[str] = []
        self.on_request: Callable[[RequestRecord], None] | None = None

    def now(self) -> float:
        return self.wall_clock() + self.clock_offset

    def now_datetime(self) -> datetime:
        return datetime.fromtimestamp(self.now(), UTC)

    def handle(self, request: HttpRequest) -> HttpResponse:
        path = unquote(urlsplit(request.target).path)
        user = ""
        try:
            if len(request.body) > MAX_BODY:
                raise too_large()
            account = self._authenticate(request, path)
            user = account.user if account else ""
            response = self._route(request, path, account)
        except ApiError as exc:
            response = _json(exc.code, exc.status())
        except Exception as exc:  # a bug here must not take the server down mid-test
            logger.exception("kubeapi: internal error on %s %s", request.method, path)
            self.internal_errors.append(f"{request.method} {path}: {exc!r}")
            response = _json(500, internal(repr(exc)).status())
        response.headers.append(("Audit-Id", str(uuid.uuid4())))
        response.headers.append(("Cache-Control", "no-cache, private"))
        record = RequestRecord(request.method, path, response.status, user, self.now())
        self.requests.append(record)
        if self.on_request is not None:
            self.on_request(record)
        return response

    def _authenticate(self, request: HttpRequest, path: str) -> Account | None:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            if path in ANONYMOUS_PATHS:
                return None
            raise unauthorized()
        account = self.accounts.get(token.strip()) if scheme.lower() == "bearer" else None
        if account is None:
            raise unauthorized()
        return account

    def _route(self, request: HttpRequest, path: str, account: Account | None) -> HttpResponse:
        parts = [p for p in path.split("/") if p]
        query = {k: v[-1] for k, v in parse_qs(urlsplit(request.target).query).items()}
        method = request.method
        if path in ANONYMOUS_PATHS or path.startswith(("/readyz/", "/livez/", "/healthz/")):
            if method != "GET":
                raise method_not_allowed(method)
            return self._health(path)
        assert account is not None  # only health paths are anonymous
        if parts[:2] == ["openapi", "v3"] and method == "GET":
            return self._openapi(parts[2:])
        if not parts or parts[0] not in ("api", "apis"):
            return _text(404, "404 page not found\n")
        if method == "GET" and (
            parts in (["api"], ["apis"]) or (parts[0] == "apis" and len(parts) in (2, 3))
        ):
            return self._discovery(parts)
        if parts[:2] == ["api", "v1"]:
            if method == "GET" and parts[2:3] == ["namespaces"] and len(parts) == 3:
                return self._list_namespaces(account)
            if method == "GET" and parts[2:3] == ["namespaces"] and len(parts) == 4:
                return self._get_namespace(account, parts[3])
            if len(parts) == 2 and method == "GET":
                return _json(200, disc.core_v1())
            raise resource_not_found()
        if parts[:3] == ["apis", LEASE_GROUP, "v1"]:
            return self._leases(request, parts[3:], query, account)
        if parts == ["apis", "authorization.k8s.io", "v1", "selfsubjectaccessreviews"]:
            if method != "POST":
                raise method_not_allowed(method)
            return self._ssar(request, query, account)
        if len(parts) >= 2 and parts[0] == "apis" and parts[1] not in disc.GROUPS:
            return _text(404, "404 page not found\n")
        raise resource_not_found()

    def _health(self, path: str) -> HttpResponse:
        if path == "/version":
            return _json(200, disc.version_info())
        if not self.ready and not path.startswith("/livez"):
            return _text(500, _NOT_READY_TEXT.replace("readyz", path.strip("/").split("/")[0]))
        return _text(200, "ok")

    def _openapi(self, rest: list[str]) -> HttpResponse:
        if not rest:
            return _json(200, disc.openapi_v3_root())
        if len(rest) == 3 and rest[0] == "apis" and rest[1] in disc.GROUPS and rest[2] == "v1":
            return _json(200, disc.openapi_v3_group(rest[1]))
        return _text(404, "404 page not found\n")

    def _discovery(self, parts: list[str]) -> HttpResponse:
        if parts == ["api"]:
            return _json(200, disc.api_versions(self.server_address))
        if parts == ["apis"]:
            return _json(200, disc.api_group_list())
        group = parts[1]
        if group not in disc.GROUPS or parts[2:] not in ([], ["v1"]):
            return _text(404, "404 page not found\n")
        return _json(200, disc.api_group(group) if len(parts) == 2 else disc.resource_list(group))

    def _authorize(
        self, account: Account, verb: str, resource: str, group: str, namespace: str, name: str = ""
    ) -> None:
        if not account.allows(verb, resource, namespace):
            raise forbidden(account.user, verb, resource, group, namespace, name)

    def _list_namespaces(self, account: Account) -> HttpResponse:
        self._authorize(account, "list", "namespaces", "", "")
        items = [self._namespace(n) for n in sorted(self.store.namespaces)]
        return _json(
            200,
            {
                "kind": "NamespaceList",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": str(self.store.resource_version)},
                "items": items,
            },
        )

    def _get_namespace(self, account: Account, name: str) -> HttpResponse:
        self._authorize(account, "get", "namespaces", "", "", name)
        if name not in self.store.namespaces:
            raise not_found("namespaces", "", name)
        return _json(200, {"kind": "Namespace", "apiVersion": "v1", **self._namespace(name)})

    def _namespace(self, name: str) -> dict[str, Any]:
        uid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"namespace/{name}"))
        return {
            "metadata": {
                "name": name,
                "uid": uid,
                "resourceVersion": "1",
                "creationTimestamp": "2024-12-11T18:00:00Z",
            },
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"},
        }

    def _dry_run(self, query: dict[str, str]) -> bool:
        value = query.get("dryRun")
        if value is None:
            return False
        if value != "All":
            raise bad_request(f"Invalid dryRun: {value!r}: valid values are: [All]")
        return True

    def _field_validation(self, query: dict[str, str]) -> str:
        return check_field_validation(query.get("fieldValidation")) or self.field_validation_default

    def _leases(
        self, request: HttpRequest, rest: list[str], query: dict[str, str], account: Account
    ) -> HttpResponse:
        method = request.method
        if rest == [LEASES]:  # all namespaces
            if method != "GET":
                raise method_not_allowed(method)
            self._authorize(account, "list", LEASES, LEASE_GROUP, "")
            return self._list(request, None, query)
        if len(rest) not in (3, 4) or rest[0] != "namespaces" or rest[2] != LEASES:
            raise resource_not_found()
        namespace = rest[1]
        name = rest[3] if len(rest) == 4 else ""
        if not name:
            if method == "GET":
                self._authorize(account, "list", LEASES, LEASE_GROUP, namespace)
                return self._list(request, namespace, query)
            if method != "POST":
                raise method_not_allowed(method)
            self._authorize(account, "create", LEASES, LEASE_GROUP, namespace)
            dry_run = self._dry_run(query)
            decoded = decode_body(
                request.body,
                request.headers.get("content-type"),
                LEASE,
                self._field_validation(query),
            )
            if (decoded.obj.get("metadata") or {}).get("namespace") not in (None, "", namespace):
                raise bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request"
                )
            lease = self.store.create(namespace, decoded.obj, dry_run=dry_run)
            return _json(201, lease, _warnings(decoded.warnings))
        verb = {"GET": "get", "PUT": "update", "DELETE": "delete"}.get(method)
        if verb is None:
            raise method_not_allowed(method)
        self._authorize(account, verb, LEASES, LEASE_GROUP, namespace, name)
        if method == "GET":
            return self._get_one(request, namespace, name)
        dry_run = self._dry_run(query)
        if method == "DELETE":
            options: dict[str, Any] = {}
            if request.body.strip():
                decoded = decode_body(
                    _as_meta_v1(request.body),
                    request.headers.get("content-type"),
                    DELETE_OPTIONS,
                    "Strict",
                )
                options = decoded.obj
                dry_run = dry_run or "All" in (options.get("dryRun") or [])
            return _json(
                200,
                self.store.delete(
                    namespace, name, options.get("preconditions") or {}, dry_run=dry_run
                ),
            )
        decoded = decode_body(
            request.body, request.headers.get("content-type"), LEASE, self._field_validation(query)
        )
        if (namespace, name) not in self.store.leases:
            # Create on update: the handler also asks the authorizer for "create".
            self._authorize(account, "create", LEASES, LEASE_GROUP, namespace, name)
        lease, created = self.store.update(namespace, name, decoded.obj, dry_run=dry_run)
        return _json(201 if created else 200, lease, _warnings(decoded.warnings))

    def _get_one(self, request: HttpRequest, namespace: str, name: str) -> HttpResponse:
        lease = self.store.get(namespace, name)
        if _wants_table(request):
            return _json(
                200, disc.lease_table([lease], lease["metadata"]["resourceVersion"], self._age)
            )
        return _json(200, lease)

    def _list(
        self, request: HttpRequest, namespace: str | None, query: dict[str, str]
    ) -> HttpResponse:
        if query.get("watch") in ("true", "1"):
            raise bad_request("watch is not supported by this test server")
        items = self.store.list(namespace)
        for selector_key in ("fieldSelector", "labelSelector"):
            for term in filter(None, query.get(selector_key, "").split(",")):
                key, sep, value = term.partition("=")
                if not sep:
                    raise bad_request(f"unable to parse requirement: {term}")
                items = [
                    i
                    for i in items
                    if _selected(i, selector_key, key.rstrip("="), value.lstrip("="))
                ]
        rv = str(self.store.resource_version)
        if _wants_table(request):
            return _json(200, disc.lease_table(items, rv, self._age))
        for item in items:
            del item["kind"], item["apiVersion"]
        return _json(
            200,
            {
                "kind": "LeaseList",
                "apiVersion": "coordination.k8s.io/v1",
                "metadata": {"resourceVersion": rv},
                "items": items,
            },
        )

    def _age(self, created: str) -> float:
        return (
            self.now()
            - datetime.strptime(created, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
        )

    def _ssar(self, request: HttpRequest, query: dict[str, str], account: Account) -> HttpResponse:
        body, content_type = request.body, request.headers.get("content-type")
        if (content_type or "").startswith(PROTOBUF):
            try:
                body, content_type = json.dumps(protobuf.decode(body)).encode(), JSON
            except protobuf.ProtobufError as exc:
                raise bad_request(
                    f'SelfSubjectAccessReview in version "v1" cannot be handled as a SelfSubjectAccessReview: {exc}'
                ) from None
        decoded = decode_body(body, content_type, SSAR, self._field_validation(query))
        review = decoded.obj
        spec = review.get("spec") or {}
        res, non_res = spec.get("resourceAttributes"), spec.get("nonResourceAttributes")
        if (res is None) == (non_res is None):
            error = FieldError(
                "spec.resourceAttributes",
                "Invalid value",
                "exactly one of nonResourceAttributes or resourceAttributes must be specified",
                "null" if res is None else json.dumps(res),
            )
            raise invalid("SelfSubjectAccessReview", "authorization.k8s.io", "", [error])
        if res is not None:
            verb = res.get("verb") or ""
            allowed = account.allows(verb, res.get("resource") or "", res.get("namespace") or "")
        else:
            assert non_res is not None  # exactly one of the two is set
            allowed = non_resource_allowed(non_res.get("verb") or "", non_res.get("path") or "")
        status: dict[str, Any] = {"allowed": allowed}
        if allowed:
            status["reason"] = f"allowed by the test server's grants for User {account.user!r}"
        meta = review.get("metadata") or {}
        meta["creationTimestamp"] = None
        answer = {
            "kind": "SelfSubjectAccessReview",
            "apiVersion": "authorization.k8s.io/v1",
            "metadata": meta,
            "spec": spec,
            "status": status,
        }
        return _json(201, answer, _warnings(decoded.warnings))


def _as_meta_v1(body: bytes) -> bytes:
    """DeleteOptions is accepted in any group version; check it against the meta/v1 schema."""
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return body
    if isinstance(obj, dict) and obj.get("apiVersion") in (
        "meta.k8s.io/v1",
        "coordination.k8s.io/v1",
    ):
        obj["apiVersion"] = "v1"
        return json.dumps(obj).encode()
    return body


def _wants_table(request: HttpRequest) -> bool:
    accept = request.headers.get("accept", "")
    return "as=Table" in accept


def _selected(item: dict[str, Any], selector: str, key: str, value: str) -> bool:
    negate = key.endswith("!")
    key = key.rstrip("!")
    meta = item["metadata"]
    if selector == "fieldSelector":
        actual = {
            "metadata.name": meta.get("name"),
            "metadata.namespace": meta.get("namespace"),
        }.get(key)
    else:
        actual = (meta.get("labels") or {}).get(key)
    return (actual == value) != negate


def _warnings(warnings: tuple[str, ...]) -> list[tuple[str, str]]:
    return [("Warning", f"299 - {json.dumps(w)}") for w in warnings]
