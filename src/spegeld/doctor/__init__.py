"""Preflight, runtime diagnosis and ``spegeld doctor``: one set of checks (DESIGN.md §7).

Each check returns ok, warn, fail or skip with evidence, a one-line verdict and a
remedy. The daemon runs the API checks at start and when the API fails; doctor
runs everything.
"""

from spegeld.doctor._api import ApiTarget, check_api, diagnose_api
from spegeld.doctor._gossip import GossipTarget, merge_peers, ping_peer
from spegeld.doctor._model import CheckResult, Report, Status
from spegeld.doctor._node import NodeTarget, check_node
from spegeld.doctor._run import GROUPS, DoctorPlan, daemon_status, run_doctor, saved_members

__all__ = [
    "GROUPS",
    "ApiTarget",
    "CheckResult",
    "DoctorPlan",
    "GossipTarget",
    "NodeTarget",
    "Report",
    "Status",
    "check_api",
    "check_node",
    "daemon_status",
    "diagnose_api",
    "merge_peers",
    "ping_peer",
    "run_doctor",
    "saved_members",
]
