"""The election's data: timings, the Lease record, and the core's requests and events."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime

from spegeld.errors import ConfigError

DEFAULT_NAMESPACE = "spegeld"
DEFAULT_NAME = "spegeld-coordinator"
GOSSIP_ADDR_ANNOTATION = "spegeld.io/gossip-addr"
# The coordinator's mirror address; the key keeps its old name: Leases written by
# running daemons carry it.
MIRROR_ADDR_ANNOTATION = "spegeld.io/registry-addr"
# client-go requires renew deadline > JitterFactor (1.2) x retry period, so a leader gets
# at least one retry in before it gives up.
RETRY_JITTER_FACTOR = 1.2


@dataclass(frozen=True, slots=True)
class ElectionTimings:
    """client-go's LeaderElectionConfig timings, in seconds of the local monotonic clock.

    Every node of a cluster must use the same ``renew_deadline``: a reader's first-view
    backdating assumes the holder fences itself after at most that long.
    """

    lease_duration: int = 15
    renew_deadline: float = 10.0
    retry_period: float = 2.0
    max_backoff: float = 30.0  # cap of the doubling retry while the API fails and we don't lead
    request_timeout: float = 5.0  # one API call; longer counts as a failure

    def __post_init__(self) -> None:
        numbers = {
            "lease duration": self.lease_duration,
            "renew deadline": self.renew_deadline,
            "retry period": self.retry_period,
            "max backoff": self.max_backoff,
            "request timeout": self.request_timeout,
        }
        for what, value in numbers.items():
            if isinstance(value, bool) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"election {what} must be a positive number, not {value!r}")
        if not isinstance(self.lease_duration, int):
            raise ConfigError(
                f"election lease duration must be whole seconds, not {self.lease_duration!r}"
            )
        if not self.lease_duration > self.renew_deadline:
            raise ConfigError(
                f"election lease duration ({self.lease_duration} s) must be longer than the "
                f"renew deadline ({self.renew_deadline} s)"
            )
        if not self.renew_deadline > RETRY_JITTER_FACTOR * self.retry_period:
            raise ConfigError(
                f"election renew deadline ({self.renew_deadline} s) must be longer than "
                f"{RETRY_JITTER_FACTOR} x the retry period ({self.retry_period} s)"
            )
        if self.max_backoff < self.retry_period:
            raise ConfigError(
                f"election max backoff ({self.max_backoff} s) must not be shorter than the "
                f"retry period ({self.retry_period} s)"
            )


@dataclass(frozen=True, slots=True)
class ElectionConfig:
    identity: str  # the node name: holderIdentity
    gossip_addr: str = ""  # "host:port", published for joining nodes
    mirror_addr: str = ""  # "host:port", published beside the gossip address
    timings: ElectionTimings = field(default_factory=ElectionTimings)

    def __post_init__(self) -> None:
        if not self.identity or not self.identity.strip():
            raise ConfigError("election identity (the node name) must not be empty")


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    """The parts of a Lease the election reads and writes."""

    holder: str  # "" when released
    duration: int  # leaseDurationSeconds
    acquire_time: datetime | None = None
    renew_time: datetime | None = None
    transitions: int = 0
    gossip_addr: str = ""
    mirror_addr: str = ""
    resource_version: str | None = None  # None: not read from the API (or the API gave none)

    def spec_key(self) -> object:
        """What identifies this version: the resourceVersion, or the whole record without one."""
        if self.resource_version is not None:
            return ("rv", self.resource_version)
        return ("spec", self.holder, self.duration, self.acquire_time, self.renew_time,
                self.transitions, self.gossip_addr, self.mirror_addr)  # fmt: skip


# ---- requests the core asks the shell to make ------------------------------------------


@dataclass(frozen=True, slots=True)
class ReadLease:
    request_id: int


@dataclass(frozen=True, slots=True)
class CreateLease:
    request_id: int
    record: LeaseRecord


@dataclass(frozen=True, slots=True)
class UpdateLease:
    """A conditional update: ``record.resource_version`` is the version we read."""

    request_id: int
    record: LeaseRecord


Request = ReadLease | CreateLease | UpdateLease


# ---- what came back ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LeaseRead:
    request_id: int
    record: LeaseRecord | None  # None: the Lease does not exist


@dataclass(frozen=True, slots=True)
class LeaseWritten:
    request_id: int
    record: LeaseRecord  # as the API stored it, with its new resourceVersion


@dataclass(frozen=True, slots=True)
class LeaseConflicted:
    """409: the Lease changed or appeared since we read it. A lost race, not a failure."""

    request_id: int


@dataclass(frozen=True, slots=True)
class RequestFailed:
    request_id: int
    reason: str  # short, for debug logs; the shell diagnoses the exception itself


Response = LeaseRead | LeaseWritten | LeaseConflicted | RequestFailed


# ---- events for the app --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LeadershipChanged:
    leader: bool


@dataclass(frozen=True, slots=True)
class HolderSeen:
    """With no gossip view, a read showed a live holder: its address is our gossip seed."""

    record: LeaseRecord


Event = LeadershipChanged | HolderSeen
