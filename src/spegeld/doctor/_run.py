"""Run every check group at once, each within a bounded time, into one Report."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import trio

from spegeld.errors import RemoteProtocolError
from spegeld.gossip import load_members
from spegeld.status import NodeStatus

from ._api import ApiTarget, check_api
from ._gossip import GossipTarget, key_check, peer_checks
from ._model import CheckResult, Report, Status
from ._node import NodeTarget, check_node

# The API sequence is at most DNS, TCP, two TLS handshakes and a few requests, each
# bounded by the timeout; a group still running after this many timeouts is cut.
GROUP_BUDGET = 6
GROUPS = frozenset({"api", "node", "gossip"})

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DoctorPlan:
    api: ApiTarget
    node: NodeTarget
    gossip: GossipTarget
    timeout: float
    groups: frozenset[str] = GROUPS


async def run_doctor(plan: DoctorPlan) -> Report:
    groups: dict[str, list[CheckResult]] = {}

    async def gossip_group() -> list[CheckResult]:
        return [key_check(plan.gossip), *await peer_checks(plan.gossip, plan.timeout)]

    runners: dict[str, Callable[[], Awaitable[list[CheckResult]]]] = {
        "api": lambda: check_api(plan.api, plan.timeout),
        "node": lambda: check_node(plan.node, plan.timeout),
        "gossip": gossip_group,
    }
    async with trio.open_nursery() as nursery:
        for name, runner in runners.items():
            if name in plan.groups:
                nursery.start_soon(_bounded, name, runner, plan.timeout * GROUP_BUDGET, groups)
    return Report(tuple(r for name in runners if name in groups for r in groups[name]))


async def _bounded(
    name: str,
    runner: Callable[[], Awaitable[list[CheckResult]]],
    budget: float,
    groups: dict[str, list[CheckResult]],
) -> None:
    with trio.move_on_after(budget):
        groups[name] = await runner()
        return
    groups[name] = [
        CheckResult(name, name, Status.FAIL, f"the {name} checks did not finish in {budget:.0f} s")
    ]


async def daemon_status(registry: tuple[str, int], timeout: float) -> NodeStatus | None:
    """The running daemon's /status, or None when it does not answer with one.

    The doctor only borrows the daemon's peers and key fingerprint; a daemon that is down
    or answers something else leaves the checks to the flags (``registry.port`` says why).
    """
    host, port = registry
    host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    url = f"http://[{host}]:{port}/status" if ":" in host else f"http://{host}:{port}/status"
    try:
        async with httpx.AsyncClient(timeout=timeout, trust_env=False) as http:
            response = await http.get(url)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    try:
        return NodeStatus.decode(response.content)
    except RemoteProtocolError as exc:
        logger.warning("doctor: %s answered no spegeld status: %s", url, exc)
        return None


def saved_members(state_dir: Path) -> list[tuple[str, int]]:
    return load_members(state_dir)
