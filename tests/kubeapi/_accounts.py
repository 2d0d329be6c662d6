"""Bearer-token accounts and the allowed-verbs table that stands in for RBAC."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

ALL = "*"
SPEGELD_USER = "system:serviceaccount:spegeld:spegeld"
LEASE_VERBS = frozenset({"get", "create", "update"})  # what spegeld's Role grants (DESIGN.md §6)


@dataclass
class Account:
    """A user with a bearer token and grants ``(resource, namespace) -> verbs``.

    ``"*"`` matches any resource, namespace or verb; a namespace of ``"*"`` also
    covers cluster-scoped requests, like a ClusterRoleBinding does.
    """

    user: str
    token: str
    grants: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    groups: tuple[str, ...] = ("system:authenticated",)

    def __repr__(self) -> str:  # the token is a secret
        return f"Account(user={self.user!r}, grants={self.grants!r})"

    def allows(self, verb: str, resource: str, namespace: str) -> bool:
        for (res, ns), verbs in self.grants.items():
            if res not in (ALL, resource):
                continue
            if ns != ALL and (not namespace or ns != namespace):
                continue
            if ALL in verbs or verb in verbs:
                return True
        return False

    def grant(self, resource: str, namespace: str, verbs: Iterable[str]) -> None:
        self.grants.setdefault((resource, namespace), set()).update(verbs)

    def deny(self, resource: str, namespace: str, verbs: Iterable[str]) -> None:
        """Take verbs away from one exact grant entry (wildcard entries are untouched)."""
        held = self.grants.get((resource, namespace))
        if held is not None:
            held.difference_update(verbs)

    @classmethod
    def admin(cls, token: str, user: str = "kubernetes-admin") -> Account:
        return cls(user, token, {(ALL, ALL): {ALL}}, ("system:masters", "system:authenticated"))

    @classmethod
    def lease_holder(
        cls,
        token: str,
        user: str = SPEGELD_USER,
        namespace: str = "spegeld",
        verbs: Iterable[str] = LEASE_VERBS,
    ) -> Account:
        return cls(user, token, {("leases", namespace): set(verbs)})

    def to_json(self) -> dict[str, Any]:
        return {
            "user": self.user,
            "token": self.token,
            "groups": list(self.groups),
            "grants": [
                {"resource": r, "namespace": ns, "verbs": sorted(v)}
                for (r, ns), v in self.grants.items()
            ],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Account:
        grants = {(g["resource"], g["namespace"]): set(g["verbs"]) for g in data.get("grants", [])}
        groups = tuple(data.get("groups", ("system:authenticated",)))
        return cls(str(data["user"]), str(data["token"]), grants, groups)


# Paths any authenticated user may GET (the system:discovery and
# system:public-info-viewer ClusterRoles of a real cluster).
PUBLIC_PATH_PREFIXES = ("/api", "/apis", "/version", "/healthz", "/readyz", "/livez", "/openapi")


def non_resource_allowed(verb: str, path: str) -> bool:
    return verb == "get" and any(
        path == p or path.startswith(p + "/") for p in PUBLIC_PATH_PREFIXES
    )
