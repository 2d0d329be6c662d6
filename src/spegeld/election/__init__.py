"""Coordinator election over a Kubernetes Lease: a sans-I/O core and its trio shell.

The seam is :class:`LeaseStore` (one named Lease as records); :class:`KubeLeaseStore`
implements it over the Kubernetes API's Lease calls (:class:`LeaseApi`, which
``spegeld.kube.KubeClient`` has and :class:`MemoryLeaseApi` twins).
"""

from spegeld.election._core import ElectionCore, Role
from spegeld.election._lease import (
    KubeLeaseStore,
    LeaseApi,
    LeaseStore,
    format_micro_time,
    lease_from_record,
    parse_micro_time,
    record_from_lease,
)
from spegeld.election._memory import MemoryLeaseApi, MemoryLeaseApiClient
from spegeld.election._model import (
    DEFAULT_NAME,
    DEFAULT_NAMESPACE,
    GOSSIP_ADDR_ANNOTATION,
    MIRROR_ADDR_ANNOTATION,
    CreateLease,
    ElectionConfig,
    ElectionTimings,
    Event,
    HolderSeen,
    LeadershipChanged,
    LeaseConflicted,
    LeaseRead,
    LeaseRecord,
    LeaseWritten,
    ReadLease,
    Request,
    RequestFailed,
    Response,
    UpdateLease,
)
from spegeld.election._shell import ElectionStatistics, Elector
from spegeld.routing import CoordinatorView  # what gossip says; the election's input

__all__ = [
    "DEFAULT_NAME",
    "DEFAULT_NAMESPACE",
    "GOSSIP_ADDR_ANNOTATION",
    "MIRROR_ADDR_ANNOTATION",
    "CoordinatorView",
    "CreateLease",
    "ElectionConfig",
    "ElectionCore",
    "ElectionStatistics",
    "ElectionTimings",
    "Elector",
    "Event",
    "HolderSeen",
    "KubeLeaseStore",
    "LeadershipChanged",
    "LeaseApi",
    "LeaseConflicted",
    "LeaseRead",
    "LeaseRecord",
    "LeaseStore",
    "LeaseWritten",
    "MemoryLeaseApi",
    "MemoryLeaseApiClient",
    "ReadLease",
    "Request",
    "RequestFailed",
    "Response",
    "Role",
    "UpdateLease",
    "format_micro_time",
    "lease_from_record",
    "parse_micro_time",
    "record_from_lease",
]
