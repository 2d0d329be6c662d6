"""An in-memory Lease API: the twin of ``spegeld.kube.KubeClient``'s Lease calls (``LeaseApi``).

It keeps the API server's rules that the election depends on: every write gets a
new resourceVersion, an update whose resourceVersion is not the current one is a
409 Conflict, a create of an existing Lease is a 409 AlreadyExists, and an update of
a missing one is a 404. Objects go in and out as copies, as they would over HTTP.
Tests can make it fail (``failure``), make it slow (``latency``) and count calls. An
elector uses it as any Lease API: through a ``KubeLeaseStore``, so the codec runs too.
"""

from __future__ import annotations

import copy
from typing import Any

import trio

from spegeld.errors import KubeError, KubeStatusError, LeaseConflict


class MemoryLeaseApi:
    """The shared API server's Lease objects; each node talks to it through ``client()``."""

    def __init__(self) -> None:
        self._leases: dict[tuple[str, str], dict[str, Any]] = {}
        self._version = 0
        self.requests = 0  # every call, failed ones too
        self.requests_by: dict[str, int] = {}  # per caller, for views made by client()
        self.failure: KubeError | None = None  # raised by every call while set
        self.latency = 0.0  # seconds each call takes

    def lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The stored object, for assertions."""
        stored = self._leases.get((namespace, name))
        return copy.deepcopy(stored) if stored is not None else None

    def client(self, caller: str) -> MemoryLeaseApiClient:
        """One node's connection: the same Leases, its calls counted under ``caller``."""
        return MemoryLeaseApiClient(self, caller)

    async def get_lease(
        self, namespace: str, name: str, *, caller: str = ""
    ) -> dict[str, Any] | None:
        await self._call(caller)
        stored = self._leases.get((namespace, name))
        return copy.deepcopy(stored) if stored is not None else None

    async def create_lease(
        self, namespace: str, lease: dict[str, Any], *, caller: str = ""
    ) -> dict[str, Any]:
        await self._call(caller)
        name = self._name_of(lease)
        if (namespace, name) in self._leases:
            raise LeaseConflict(409, "AlreadyExists", f'leases "{name}" already exists')
        if lease.get("metadata", {}).get("resourceVersion"):
            raise KubeStatusError(
                400, "BadRequest", "resourceVersion should not be set on objects to be created"
            )
        return self._store(namespace, name, lease)

    async def update_lease(
        self, namespace: str, name: str, lease: dict[str, Any], *, caller: str = ""
    ) -> dict[str, Any]:
        await self._call(caller)
        if self._name_of(lease) != name:
            raise KubeStatusError(400, "BadRequest", "the name of the object does not match")
        stored = self._leases.get((namespace, name))
        if stored is None:
            raise KubeStatusError(404, "NotFound", f'leases "{name}" not found')
        expected = lease.get("metadata", {}).get("resourceVersion")
        if expected and expected != stored["metadata"]["resourceVersion"]:
            raise LeaseConflict(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on leases.coordination.k8s.io "{name}": the '
                "object has been modified; please apply your changes to the latest version "
                "and try again",
            )
        return self._store(namespace, name, lease)

    async def _call(self, caller: str) -> None:
        self.requests += 1
        self.requests_by[caller] = self.requests_by.get(caller, 0) + 1
        if self.latency:
            await trio.sleep(self.latency)
        else:
            await trio.lowlevel.checkpoint()
        if self.failure is not None:
            raise self.failure

    @staticmethod
    def _name_of(lease: dict[str, Any]) -> str:
        name = lease.get("metadata", {}).get("name")
        if not isinstance(name, str) or not name:
            raise KubeStatusError(422, "Invalid", "metadata.name: Required value")
        return name

    def _store(self, namespace: str, name: str, lease: dict[str, Any]) -> dict[str, Any]:
        self._version += 1
        stored = copy.deepcopy(lease)
        metadata = stored.setdefault("metadata", {})
        metadata["namespace"] = namespace
        metadata["resourceVersion"] = str(self._version)
        self._leases[(namespace, name)] = stored
        return copy.deepcopy(stored)


class MemoryLeaseApiClient:
    """One caller's connection to a :class:`MemoryLeaseApi`: a ``LeaseApi``."""

    def __init__(self, api: MemoryLeaseApi, caller: str) -> None:
        self.api = api
        self.caller = caller

    async def get_lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self.api.get_lease(namespace, name, caller=self.caller)

    async def create_lease(self, namespace: str, lease: dict[str, Any]) -> dict[str, Any]:
        return await self.api.create_lease(namespace, lease, caller=self.caller)

    async def update_lease(
        self, namespace: str, name: str, lease: dict[str, Any]
    ) -> dict[str, Any]:
        return await self.api.update_lease(namespace, name, lease, caller=self.caller)
