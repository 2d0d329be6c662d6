"""A strict Kubernetes API test server (kube-apiserver v1.32 stand-in) on trio + h11.

No kube-apiserver can be installed on these machines, so spegeld's tests talk to
this one. It serves, over TLS from a ``trustme`` CA with HTTP/1.1 keep-alive:
``/version``, ``/readyz``, ``/livez``, ``/healthz``; legacy discovery (``/api``,
``/api/v1``, ``/apis``, ``/apis/{group}[/v1]``) and a skeleton ``/openapi/v3``;
namespaces (get/list); ``coordination.k8s.io/v1`` Leases (list, get, create,
update, delete, ``?dryRun=All``); ``authorization.k8s.io/v1``
SelfSubjectAccessReviews (JSON or protobuf bodies). Errors are real ``Status``
objects with kube-apiserver's wording. ``tests/test_kubeapi.py`` drives it with the
real ``kubectl`` and the official ``kubernetes`` Python client.

Faithful on purpose (each checked against kube-apiserver's source):

- Body decode failures are 400 ``BadRequest``, not 422: a bad MicroTime (exactly
  six fractional digits, ``2026-11-27T06:30:00.123456Z``), a wrong JSON type, a
  float or out-of-range int32, a wrong ``kind``/``apiVersion``, bad JSON. Unknown
  fields follow ``?fieldValidation`` (Strict → 400 ``strict decoding error``).
  422 ``Invalid`` is for validation: missing/bad name, ``leaseDurationSeconds <= 0``,
  ``leaseTransitions < 0``, an update without ``metadata.resourceVersion`` (leases
  do not allow unconditional update), a changed uid.
- PUT of a missing lease creates it (201): the Lease strategy has
  ``AllowCreateOnUpdate() == true``; the caller then also needs ``create``.
- POST into a missing namespace is 404 ``namespaces "X" not found`` (NamespaceLifecycle);
  GET/PUT/DELETE of a lease there is the lease's own 404; listing gives an empty list.
- A no-op update keeps the resourceVersion; a body carrying a resourceVersion on
  create is a 500, as etcd3's ``ErrResourceVersionSetOnCreate`` is.
- ``spec.strategy``/``preferredHolder`` are dropped (CoordinatedLeaderElection is alpha, off).
- MicroTimes are stored re-encoded in UTC; request bodies over 3 MiB get 413.

Deliberate deviations:

- Unknown fields are rejected by default even without ``?fieldValidation=Strict``
  (the real default is Warn: dropped with a ``Warning`` header); pass
  ``field_validation_default="Warn"`` for the real default. Catching a field the
  real server would silently drop is the point of a strict test server.
- A request without ``Authorization`` is 401 except on ``/version`` and the health
  endpoints (a cluster with anonymous auth off but public-info readable); there is
  no anonymous user. Client certificates are not accepted.
- Authorization is a token → ``(resource, namespace) → verbs`` table, not RBAC; the
  SSAR ``reason`` text is the server's own. SSAR is always allowed to create.
- No watch (``?watch=true`` → 400), no PATCH (405), no managedFields, no
  labels/annotations validation, legacy discovery only (kubectl falls back to it),
  only the openapi/v3 skeleton kubectl needs to see ``fieldValidation`` support.
- Selectors: ``metadata.name``/``metadata.namespace`` fields and label equality only.
- ``set_ready(False)`` fails ``/readyz`` and ``/healthz`` (500) but not ``/livez``.
- ``gitCommit`` is all zeros.

What kubectl 1.32 needs (seen with ``-v=8``): ``/version``; legacy discovery;
``/openapi/v3`` plus the group document, or ``kubectl create`` refuses to run
("failed to download openapi") since it must learn that the server supports
``fieldValidation`` (it then sends ``?fieldValidation=Strict``); Table output for
``get``; a GET after DELETE (the 404 ends its wait); and ``auth can-i`` POSTs the
review as protobuf, answered here in JSON (its Accept allows both).

Unexpected exceptions in request handling become a 500 Status and are kept in
``KubeAPI.core.internal_errors``, so a test can assert the server had no bug.

Use ``open_kube_api`` in-process, or ``python -m tests.kubeapi`` (see ``__main__``)
to run the same server in another process or network namespace.
"""

from ._accounts import ALL, LEASE_VERBS, SPEGELD_USER, Account
from ._core import ApiCore, HttpRequest, HttpResponse, RequestRecord
from ._schema import format_micro_time, parse_micro_time
from ._server import (
    DEFAULT_NAMESPACES,
    CertKind,
    KubeAPI,
    default_accounts,
    issue_server_cert,
    open_kube_api,
    serve,
)

__all__ = [
    "ALL",
    "DEFAULT_NAMESPACES",
    "LEASE_VERBS",
    "SPEGELD_USER",
    "Account",
    "ApiCore",
    "CertKind",
    "HttpRequest",
    "HttpResponse",
    "KubeAPI",
    "RequestRecord",
    "default_accounts",
    "format_micro_time",
    "issue_server_cert",
    "open_kube_api",
    "parse_micro_time",
    "serve",
]
