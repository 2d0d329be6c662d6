"""``spegeld doctor``: every check of DESIGN.md §7, as a table or as JSON.

Exit codes: 0 when everything is ok or warn, 1 when a check failed, 2 for usage errors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from spegeld import config
from spegeld.cli._options import (
    containerd_config,
    containerd_options,
    gossip_options,
    json_option,
    kube_options,
    lease_settings,
    mirror_addr_option,
    option,
    state_dir_option,
)

if TYPE_CHECKING:
    from spegeld.status import NodeStatus

DEFAULT_CONTAINERD_CONFIG = Path("/etc/containerd/config.toml")


@click.command()
@containerd_options
@option("--containerd-config", "containerd_config_file",
        type=click.Path(path_type=Path, readable=False),
        default=DEFAULT_CONTAINERD_CONFIG, show_default=True,
        help="containerd's config.toml (for config_path and discard_unpacked_layers).")  # fmt: skip
@option("--hosts-dir", type=click.Path(path_type=Path, readable=False), default=None,
        help="containerd's registry hosts directory.  "
        "[default: config_path from config.toml]")  # fmt: skip
@mirror_addr_option
@gossip_options
@kube_options
@option("--api-endpoint", "api_endpoints", multiple=True, metavar="IP:PORT",
        help="A real API server endpoint behind the service VIP, tried when the VIP drops "
        "packets (repeatable).")  # fmt: skip
@state_dir_option
@option("--only", default="api,node,gossip", show_default=True, metavar="GROUPS",
        help="Comma-separated check groups to run: api, node, gossip.")  # fmt: skip
@option("--timeout", type=click.FloatRange(min=0.1, max=120), default=3.0, show_default=True,
        help="Seconds each check may take; the whole run ends within about 6x this.")  # fmt: skip
@json_option
def doctor(
    containerd_sock: Path,
    containerd_namespace: str,
    containerd_content_path: Path,
    containerd_config_file: Path,
    hosts_dir: Path | None,
    registry_addr: str,
    gossip_addr: str,
    peers: tuple[str, ...],
    cluster_key_file: Path | None,
    insecure_gossip: bool,
    kubeconfig: Path | None,
    kube_context: str | None,
    lease_namespace: str,
    lease_name: str,
    api_endpoints: tuple[str, ...],
    state_dir: Path,
    only: str,
    timeout: float,
    as_json: bool,
) -> None:
    """Check the API server, containerd, the mirror, gossip and the key; name what is wrong."""
    import trio

    from spegeld import doctor as checks

    groups = frozenset(g.strip() for g in only.split(",") if g.strip())
    if not groups or not groups <= checks.GROUPS:
        raise click.BadParameter(
            f"choose from {', '.join(sorted(checks.GROUPS))}", param_hint="--only"
        )
    seeds = tuple(config.parse_host_port(peer, "--peer") for peer in peers)
    endpoints = tuple(config.parse_host_port(e, "--api-endpoint") for e in api_endpoints)
    config.parse_host_port(gossip_addr, "--gossip-addr")
    lease = lease_settings(kubeconfig, kube_context, lease_namespace, lease_name)
    creds, creds_problem = _credentials(lease)
    mirror = config.parse_host_port(registry_addr, "--registry-addr")

    async def main() -> checks.Report:
        status = await checks.daemon_status(mirror, min(timeout, 2.0))
        gossip = _gossip_target(cluster_key_file, insecure_gossip, seeds, state_dir, status)
        plan = checks.DoctorPlan(
            api=checks.ApiTarget(creds, lease.namespace, lease.name, endpoints),
            node=checks.NodeTarget(
                containerd_config(containerd_sock, containerd_namespace, containerd_content_path),
                containerd_config_file,
                hosts_dir,
                mirror,
            ),
            gossip=gossip,
            timeout=timeout,
            groups=groups,
        )
        report = await checks.run_doctor(plan)
        if status is not None and status.sharing is not None:
            report = checks.Report((*report.results, _sharing_check(status.sharing)))
        if creds_problem is not None and "api" in groups:
            bad = checks.CheckResult("api.credentials", "Kubernetes credentials",
                                     checks.Status.FAIL, creds_problem)  # fmt: skip
            report = checks.Report((bad, *report.results))
        return report

    report = trio.run(main)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        _render(report)
    raise click.exceptions.Exit(report.exit_code)


def _credentials(lease: config.LeaseSettings) -> tuple[Any, str | None]:
    """The kubeconfig's (or the pod's) credentials; a problem with them is a finding."""
    from spegeld.errors import ConfigError
    from spegeld.kube import discover

    try:
        return discover(lease.kubeconfig, lease.context), None
    except ConfigError as exc:
        return None, str(exc)


def _gossip_target(
    key_file: Path | None,
    insecure: bool,
    seeds: tuple[tuple[str, int], ...],
    state_dir: Path,
    status: NodeStatus | None,
) -> Any:
    from spegeld import doctor as checks
    from spegeld.errors import ConfigError
    from spegeld.gossip import Keyring, load_credential, load_key_file

    keyring, source, problem = None, "", None
    try:
        if key_file is not None:
            keyring, source = load_key_file(key_file)[0], f"file {key_file}"
        elif (credential := load_credential()) is not None:
            keyring, source = credential[0], "systemd credential gossip-key"
        elif insecure:
            keyring, source = Keyring.insecure(), "--insecure-gossip"
        else:
            problem = "no cluster key: pass --cluster-key-file (or --insecure-gossip for labs)"
    except ConfigError as exc:
        problem = str(exc)
    gossip = None if status is None else status.gossip
    running = [
        addr
        for peer in (() if gossip is None else gossip.peers)
        if peer.state in ("alive", "suspect") and (addr := peer.gossip_addr()) is not None
    ]
    return checks.GossipTarget(
        keyring=keyring,
        key_source=source,
        key_problem=problem,
        peers=checks.merge_peers(seeds, running, checks.saved_members(state_dir)),
        daemon_fingerprint=None if gossip is None else gossip.key_fingerprint,
    )


def _sharing_check(sharing: Any) -> Any:
    """The daemon's registry filters and tag quorum; a quorum of 1 trusts any one node."""
    from spegeld import doctor as checks
    from spegeld.cli.status import sharing_line

    ok = sharing.tag_quorum >= 2
    return checks.CheckResult(
        "node.sharing",
        "Sharing: registry filters, tag quorum",
        checks.Status.OK if ok else checks.Status.WARN,
        sharing_line(sharing),
        (),
        "" if ok else "One node can decide a tag for the others: run with --tag-quorum 2.",
    )


_STYLE = {"ok": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}


def _render(report: Any) -> None:
    from rich.console import Console
    from rich.rule import Rule
    from rich.table import Table
    from rich.text import Text

    out = Console(markup=False, highlight=False)  # evidence may hold peer-supplied text
    table = Table(show_lines=True)
    for column in ("check", "status", "verdict and evidence"):
        table.add_column(column, overflow="fold")
    for result in report.results:
        detail = Text(result.verdict)
        for line in result.evidence:
            detail.append("\n" + line, style="dim")
        status = result.status.value
        table.add_row(result.title, Text(status, style=_STYLE[status]), detail)
    out.print(table)
    # Remedies go below the table at full width: they hold YAML and commands to copy.
    for result in report.results:
        if result.remedy and result.status.value in ("fail", "warn"):
            out.print(
                Rule(f"{result.title}: how to fix", align="left", style=_STYLE[result.status.value])
            )
            out.print(Text(result.remedy.rstrip()))
    counts = report.to_json()["summary"]
    out.print(", ".join(f"{n} {s}" for s, n in counts.items() if n) or "no checks ran")
