"""Lease storage with kube-apiserver's create/update/delete semantics (sans-I/O).

Mirrors ``genericregistry.Store`` with the Lease strategy: one server-wide
resourceVersion counter, 409 AlreadyExists/Conflict, 422 for a missing
resourceVersion (leases do not allow unconditional update), create on PUT
(``AllowCreateOnUpdate`` is true for leases), no-op updates that keep the
resourceVersion, and dry runs that check everything but store nothing.
"""

from __future__ import annotations

import copy
import re
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ._schema import format_micro_time, format_time, parse_micro_time
from ._status import (
    ApiError,
    FieldError,
    GoHex,
    already_exists,
    bad_request,
    conflict,
    internal,
    invalid,
    not_found,
)

GROUP = "coordination.k8s.io"
RESOURCE = "leases"
KIND = "Lease"
API_VERSION = f"{GROUP}/v1"
_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z")
_SUBDOMAIN_MSG = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, "
    "'-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', "
    "regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)
# Fields the server owns: a client's values are replaced on create.
_SYSTEM_META = (
    "uid",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "selfLink",
    "generation",
)


def validate_lease(lease: dict[str, Any]) -> list[FieldError]:
    """pkg/apis/coordination/validation.ValidateLease, plus ObjectMeta's name rules."""
    errors: list[FieldError] = []
    name = lease["metadata"].get("name") or ""
    if not name:
        errors.append(
            FieldError("metadata.name", "Required value", "name or generateName is required")
        )
    elif len(name) > 253:
        errors.append(
            FieldError(
                "metadata.name", "Invalid value", "must be no more than 253 characters", name
            )
        )
    elif not _SUBDOMAIN.match(name):
        errors.append(FieldError("metadata.name", "Invalid value", _SUBDOMAIN_MSG, name))
    spec = lease.get("spec") or {}
    duration = spec.get("leaseDurationSeconds")
    if duration is not None and duration <= 0:
        errors.append(
            FieldError(
                "spec.leaseDurationSeconds", "Invalid value", "must be greater than 0", duration
            )
        )
    transitions = spec.get("leaseTransitions")
    if transitions is not None and transitions < 0:
        errors.append(
            FieldError(
                "spec.leaseTransitions",
                "Invalid value",
                "must be greater than or equal to 0",
                transitions,
            )
        )
    return errors


def _normalize(lease: dict[str, Any]) -> None:
    """What a decode/encode round trip through the Go types does to a body."""
    spec = lease.get("spec")
    if not isinstance(spec, dict):
        lease["spec"] = {}
        return
    for key in ("acquireTime", "renewTime"):
        if isinstance(spec.get(key), str):
            spec[key] = format_micro_time(parse_micro_time(spec[key]))
    # The CoordinatedLeaderElection feature gate is alpha (off) in 1.32: the strategy clears these.
    spec.pop("strategy", None)
    spec.pop("preferredHolder", None)
    for key in [k for k, v in spec.items() if v is None]:
        del spec[key]
    meta = lease["metadata"]
    for key in [k for k, v in meta.items() if v in (None, {}, [])]:
        del meta[key]


@dataclass
class LeaseStore:
    """Leases by (namespace, name); ``now`` gives the (possibly skewed) server time."""

    now: Callable[[], datetime]
    namespaces: set[str]
    resource_version: int = 1000
    leases: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)

    def _bump(self) -> str:
        self.resource_version += 1
        return str(self.resource_version)

    def get(self, namespace: str, name: str) -> dict[str, Any]:
        lease = self.leases.get((namespace, name))
        if lease is None:
            raise not_found(RESOURCE, GROUP, name)
        return copy.deepcopy(lease)

    def list(self, namespace: str | None) -> list[dict[str, Any]]:
        return [
            copy.deepcopy(v)
            for (ns, _), v in sorted(self.leases.items())
            if namespace is None or ns == namespace
        ]

    def _check_namespace(self, namespace: str) -> None:
        if namespace not in self.namespaces:
            # The NamespaceLifecycle admission plugin's answer, not the lease's.
            raise not_found("namespaces", "", namespace)

    def create(self, namespace: str, lease: dict[str, Any], *, dry_run: bool) -> dict[str, Any]:
        meta = lease.setdefault("metadata", {}) or {}
        lease["metadata"] = meta
        self._check_namespace(namespace)
        meta["namespace"] = namespace
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + secrets.token_hex(3)[:5]
        for key in _SYSTEM_META:
            meta.pop(key, None)
        _normalize(lease)
        errors = validate_lease(lease)
        if errors:
            raise invalid(KIND, GROUP, meta.get("name") or "", errors)
        if meta.get("resourceVersion"):
            raise internal("resourceVersion should not be set on objects to be created")
        name = meta["name"]
        if (namespace, name) in self.leases:
            raise already_exists(RESOURCE, GROUP, name)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = format_time(self.now())
        meta["resourceVersion"] = str(self.resource_version + 1)
        lease = _ordered(lease)
        if not dry_run:
            self._bump()
            self.leases[(namespace, name)] = copy.deepcopy(lease)
        return lease

    def update(
        self, namespace: str, name: str, lease: dict[str, Any], *, dry_run: bool
    ) -> tuple[dict[str, Any], bool]:
        """Replace a lease; returns (object, created)."""
        meta = lease.setdefault("metadata", {}) or {}
        lease["metadata"] = meta
        if meta.get("namespace") and meta["namespace"] != namespace:
            raise bad_request(
                "the namespace of the provided object does not match the namespace sent on the request"
            )
        if meta.get("name") != name:
            raise bad_request(
                f"the name of the object ({meta.get('name') or ''}) does not match the name on the URL ({name})"
            )
        old = self.leases.get((namespace, name))
        if old is None:
            meta.pop("resourceVersion", None)
            return self.create(namespace, lease, dry_run=dry_run), True
        wanted = meta.get("resourceVersion") or ""
        if not wanted:
            error = FieldError(
                "metadata.resourceVersion",
                "Invalid value",
                "must be specified for an update",
                GoHex(0),
            )
            raise invalid(RESOURCE, GROUP, name, [error])
        if wanted != old["metadata"]["resourceVersion"]:
            raise conflict(RESOURCE, GROUP, name)
        old_meta = old["metadata"]
        if meta.get("uid") and meta["uid"] != old_meta["uid"]:
            error = FieldError("metadata.uid", "Invalid value", "field is immutable", meta["uid"])
            raise invalid(KIND, GROUP, name, [error])
        meta["namespace"] = namespace
        for key in ("uid", "creationTimestamp"):
            meta[key] = old_meta[key]
        for key in ("deletionTimestamp", "deletionGracePeriodSeconds", "selfLink", "generation"):
            meta.pop(key, None)
        _normalize(lease)
        errors = validate_lease(lease)
        if errors:
            raise invalid(KIND, GROUP, name, errors)
        lease = _ordered(lease)
        if lease == old:
            return copy.deepcopy(old), False  # etcd3 skips the write: same resourceVersion
        lease["metadata"]["resourceVersion"] = str(self.resource_version + 1)
        if not dry_run:
            self._bump()
            self.leases[(namespace, name)] = copy.deepcopy(lease)
        return lease, False

    def delete(
        self, namespace: str, name: str, preconditions: dict[str, Any], *, dry_run: bool
    ) -> dict[str, Any]:
        old = self.leases.get((namespace, name))
        if old is None:
            raise not_found(RESOURCE, GROUP, name)
        meta = old["metadata"]
        for field_name, key in (("UID", "uid"), ("ResourceVersion", "resourceVersion")):
            want = preconditions.get(key)
            if want and want != meta[key]:
                raise conflict(
                    RESOURCE,
                    GROUP,
                    name,
                    f"Precondition failed: {field_name} in precondition: {want}, "
                    f"{field_name} in object meta: {meta[key]}",
                )
        if not dry_run:
            self._bump()
            del self.leases[(namespace, name)]
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "details": {"name": name, "group": GROUP, "kind": RESOURCE, "uid": meta["uid"]},
        }


def _ordered(lease: dict[str, Any]) -> dict[str, Any]:
    """Field order as the Go encoder writes it (kind, apiVersion, metadata, spec)."""
    meta_order = (
        "name",
        "generateName",
        "namespace",
        "uid",
        "resourceVersion",
        "creationTimestamp",
    )
    meta = lease["metadata"]
    ordered_meta = {k: meta[k] for k in meta_order if k in meta}
    ordered_meta.update({k: v for k, v in meta.items() if k not in ordered_meta})
    return {
        "kind": KIND,
        "apiVersion": API_VERSION,
        "metadata": ordered_meta,
        "spec": lease.get("spec") or {},
    }


__all__ = ["API_VERSION", "GROUP", "KIND", "RESOURCE", "ApiError", "LeaseStore", "validate_lease"]
