"""The election's seam, :class:`LeaseStore`, and its Kubernetes implementation.

Two roles, two protocols:

- :class:`LeaseStore` is what the elector uses: one named Lease as :class:`LeaseRecord`
  values, read, created and updated with their resourceVersion (DESIGN's seam).
- :class:`LeaseApi` is the Kubernetes API's Lease calls on plain objects:
  ``spegeld.kube.KubeClient`` has them, and ``MemoryLeaseApi`` is their in-memory twin.

:class:`KubeLeaseStore` is the one implementation of the first over the second. Its
codec validates the API's JSON into a record so that ``Any`` stops here; a Lease we
cannot understand is a :class:`RemoteProtocolError`. It keeps the last object it saw,
so an update carries the labels, annotations and other metadata that someone else
put on the Lease.
"""

from __future__ import annotations

import copy
import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Protocol

from spegeld.errors import ConfigError, RemoteProtocolError

from ._model import (
    DEFAULT_NAME,
    DEFAULT_NAMESPACE,
    GOSSIP_ADDR_ANNOTATION,
    MIRROR_ADDR_ANNOTATION,
    LeaseRecord,
)

API_VERSION = "coordination.k8s.io/v1"
KIND = "Lease"
# RFC 3339 as the API server writes it; MicroTime has 6 digits, but accept 0-9 on input.
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?([Zz]|[+-]\d{2}:\d{2})"
)
_INT32_MAX = 2**31 - 1


class LeaseStore(Protocol):
    """One named Lease, as records: the election's seam.

    ``update`` sends the record's resourceVersion; a Lease changed since is a
    ``LeaseConflict`` (409), as is a ``create`` of one that exists. Other failures are
    spegeld errors too: ``KubeStatusError``, ``KubeUnreachable``, ``RemoteProtocolError``.
    """

    async def get(self) -> LeaseRecord | None: ...

    async def create(self, record: LeaseRecord) -> LeaseRecord: ...

    async def update(self, record: LeaseRecord) -> LeaseRecord: ...


class LeaseApi(Protocol):
    """The Kubernetes API's Lease calls, on Lease objects; ``spegeld.kube.KubeClient`` has them.

    Failures are spegeld errors: ``LeaseConflict`` for 409, ``KubeStatusError`` for
    other error Statuses, ``KubeUnreachable`` when no answer came.
    """

    async def get_lease(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    async def create_lease(self, namespace: str, lease: dict[str, Any]) -> dict[str, Any]: ...

    async def update_lease(
        self, namespace: str, name: str, lease: dict[str, Any]
    ) -> dict[str, Any]: ...


def format_micro_time(moment: datetime) -> str:
    """Kubernetes MicroTime: UTC, exactly six fractional digits, ``Z``."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("MicroTime needs an aware datetime, not a naive one")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_micro_time(text: object) -> datetime:
    if not isinstance(text, str) or (match := _RFC3339.fullmatch(text)) is None:
        raise RemoteProtocolError(f"Lease time {str(text)[:64]!r} is not RFC 3339")
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    micros = int((fraction or "0")[:6].ljust(6, "0"))
    if zone in ("Z", "z"):
        tz = UTC
    else:
        sign = 1 if zone[0] == "+" else -1
        tz = timezone(sign * timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6])))
    try:
        moment = datetime(
            int(year), int(month), int(day), int(hour), int(minute), int(second), micros, tz
        )
    except ValueError as exc:
        raise RemoteProtocolError(f"Lease time {text[:64]!r} is not a valid time") from exc
    return moment.astimezone(UTC)


def _int_field(spec: dict[str, Any], name: str) -> int:
    value = spec.get(name, 0)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _INT32_MAX:
        raise RemoteProtocolError(f"Lease spec.{name} is not a non-negative int32: {value!r}")
    return value


def _time_field(spec: dict[str, Any], name: str) -> datetime | None:
    value = spec.get(name)
    return None if value is None else parse_micro_time(value)


def _str_field(mapping: dict[str, Any], name: str, where: str) -> str:
    value = mapping.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RemoteProtocolError(f"Lease {where}.{name} is not a string")
    return value


def _mapping(value: object, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RemoteProtocolError(f"Lease {where} is not an object")
    return value


def record_from_lease(lease: object) -> LeaseRecord:
    """Validate a Lease object from the API into a record."""
    obj = _mapping(lease, "object")
    if obj.get("kind", KIND) != KIND:
        raise RemoteProtocolError(f"expected a Lease, got kind {str(obj.get('kind'))[:64]!r}")
    metadata = _mapping(obj.get("metadata"), "metadata")
    annotations = _mapping(metadata.get("annotations"), "metadata.annotations")
    spec = _mapping(obj.get("spec"), "spec")
    resource_version = metadata.get("resourceVersion")
    if resource_version is not None and not isinstance(resource_version, str):
        raise RemoteProtocolError("Lease metadata.resourceVersion is not a string")
    return LeaseRecord(
        holder=_str_field(spec, "holderIdentity", "spec"),
        duration=_int_field(spec, "leaseDurationSeconds"),
        acquire_time=_time_field(spec, "acquireTime"),
        renew_time=_time_field(spec, "renewTime"),
        transitions=_int_field(spec, "leaseTransitions"),
        gossip_addr=_str_field(annotations, GOSSIP_ADDR_ANNOTATION, "annotation"),
        mirror_addr=_str_field(annotations, MIRROR_ADDR_ANNOTATION, "annotation"),
        resource_version=resource_version or None,
    )


def lease_from_record(
    record: LeaseRecord, namespace: str, name: str, base: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The Lease object to send: ``base`` (the object we last read) with our spec.

    Our annotations are set, or removed when empty; everything else in ``base`` stays.
    """
    lease: dict[str, Any] = copy.deepcopy(base) if base is not None else {}
    lease["apiVersion"] = API_VERSION
    lease["kind"] = KIND
    metadata = lease.setdefault("metadata", {})
    metadata["name"] = name
    metadata["namespace"] = namespace
    if record.resource_version is not None:
        metadata["resourceVersion"] = record.resource_version
    else:
        metadata.pop("resourceVersion", None)
    annotations = metadata.get("annotations") or {}
    for key, value in (
        (GOSSIP_ADDR_ANNOTATION, record.gossip_addr),
        (MIRROR_ADDR_ANNOTATION, record.mirror_addr),
    ):
        if value:
            annotations[key] = value
        else:
            annotations.pop(key, None)
    if annotations:
        metadata["annotations"] = annotations
    else:
        metadata.pop("annotations", None)
    spec: dict[str, Any] = {
        "holderIdentity": record.holder,
        "leaseDurationSeconds": record.duration,
        "leaseTransitions": record.transitions,
    }
    if record.acquire_time is not None:
        spec["acquireTime"] = format_micro_time(record.acquire_time)
    if record.renew_time is not None:
        spec["renewTime"] = format_micro_time(record.renew_time)
    lease["spec"] = spec
    lease.pop("status", None)
    return lease


class KubeLeaseStore:
    """The :class:`LeaseStore` on Kubernetes: one named Lease through a :class:`LeaseApi`."""

    def __init__(
        self, api: LeaseApi, namespace: str = DEFAULT_NAMESPACE, name: str = DEFAULT_NAME
    ) -> None:
        if not namespace or not name:
            raise ConfigError("election Lease namespace and name must not be empty")
        self._api = api
        self.namespace = namespace
        self.name = name
        self._last: dict[str, Any] | None = None

    async def get(self) -> LeaseRecord | None:
        lease = await self._api.get_lease(self.namespace, self.name)
        if lease is None:
            self._last = None
            return None
        return self._remember(lease)

    async def create(self, record: LeaseRecord) -> LeaseRecord:
        lease = lease_from_record(replace(record, resource_version=None), self.namespace, self.name)
        return self._remember(await self._api.create_lease(self.namespace, lease))

    async def update(self, record: LeaseRecord) -> LeaseRecord:
        lease = lease_from_record(record, self.namespace, self.name, self._last)
        return self._remember(await self._api.update_lease(self.namespace, self.name, lease))

    def _remember(self, lease: object) -> LeaseRecord:
        record = record_from_lease(lease)
        assert isinstance(lease, dict)
        self._last = lease
        return record
