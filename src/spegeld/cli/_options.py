"""Options shared by several commands, each with its SPEGELD_* environment twin."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from spegeld import config
from spegeld.errors import ConfigError

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")

F = TypeVar("F", bound=Callable[..., Any])


def option(*decls: str, **kwargs: Any) -> Callable[[F], F]:
    long = next(d for d in decls if d.startswith("--")).split("/")[0]
    kwargs.setdefault("envvar", config.envvar(long))
    kwargs.setdefault("show_envvar", True)
    return click.option(*decls, **kwargs)


def containerd_options(func: F) -> F:
    for decorator in reversed(
        [
            option(
                "--containerd-sock",
                type=click.Path(path_type=Path, readable=False),
                default=config.DEFAULT_CONTAINERD_SOCK,
                show_default=True,
                help="containerd's gRPC socket.",
            ),
            option(
                "--containerd-namespace",
                default=config.DEFAULT_CONTAINERD_NAMESPACE,
                show_default=True,
                help="containerd namespace whose images are shared.",
            ),
            option(
                "--containerd-content-path",
                type=click.Path(path_type=Path, readable=False),
                default=None,
                help="containerd's content store directory, read directly (sendfile) when "
                "readable. Set it only to override what containerd reports.  [default: "
                "asked from containerd's introspection API, else "
                f"{config.DEFAULT_CONTENT_PATH}]",
            ),
        ]
    ):
        func = decorator(func)
    return func


def containerd_config(
    containerd_sock: Path, containerd_namespace: str, containerd_content_path: Path | None
) -> config.ContainerdConfig:
    return config.ContainerdConfig(
        socket=containerd_sock,
        namespace=containerd_namespace,
        content_path=containerd_content_path,
    )


def json_option(func: F) -> F:
    return option("--json", "as_json", is_flag=True, help="Print JSON for machines.")(func)


def _stack(func: F, decorators: list[Callable[[F], F]]) -> F:
    for decorator in reversed(decorators):
        func = decorator(func)
    return func


def mirror_addr_option(func: F) -> F:
    """Our mirror's listen address. The flag, its parameter ``registry_addr`` (a config
    file key) and ``SPEGELD_REGISTRY_ADDR`` keep their names: they are a contract."""
    return option(
        "--registry-addr",
        default=config.DEFAULT_MIRROR_ADDR,
        show_default=True,
        help="HOST:PORT the registry mirror containerd uses listens on (keep it loopback).",
    )(func)


def listener_options(func: F) -> F:
    """The peer listener (other nodes) and the optional metrics listener."""
    return _stack(
        func,
        [
            option("--peer-addr", default=config.DEFAULT_PEER_ADDR, show_default=True,
                   help="HOST:PORT other nodes fetch from (node authentication required); "
                   "gossip advertises its port."),
            option("--metrics-addr", default=None,
                   help="HOST:PORT serving only /metrics and /status (e.g. :9090).  "
                   "[default: none; both stay on --registry-addr]"),
        ],
    )  # fmt: skip


def state_dir_option(func: F) -> F:
    return option(
        "--state-dir",
        type=click.Path(path_type=Path),
        default=config.DEFAULT_STATE_DIR,
        show_default=True,
        help="Where the daemon keeps state between runs.",
    )(func)


def gossip_options(func: F) -> F:
    return _stack(
        func,
        [
            option("--gossip-addr", default=config.DEFAULT_GOSSIP_ADDR, show_default=True,
                   help="HOST:PORT gossip listens on (UDP)."),
            option("--peer", "peers", multiple=True, metavar="HOST:PORT",
                   help="A gossip seed (repeatable)."),
            option("--cluster-key-file", type=click.Path(path_type=Path, readable=False),
                   default=None,
                   help="Gossip key file (<id>:<base64 secret> per line; the first signs)."),
            option("--insecure-gossip", is_flag=True,
                   help="Gossip without authentication (labs only)."),
        ],
    )  # fmt: skip


def kube_options(func: F) -> F:
    return _stack(
        func,
        [
            option("--kubeconfig", type=click.Path(path_type=Path, readable=False), default=None,
                   help="kubeconfig for the coordinator Lease.  [default: $KUBECONFIG (first "
                   "file with a current-context), else in-cluster credentials if "
                   "KUBERNETES_SERVICE_HOST is set, else no election]"),
            option("--kube-context", default=None, help="kubeconfig context.  [default: current]"),
            option("--lease-namespace", default=config.DEFAULT_LEASE_NAMESPACE, show_default=True,
                   help="Namespace of the coordinator Lease."),
            option("--lease-name", default=config.DEFAULT_LEASE_NAME, show_default=True,
                   help="Name of the coordinator Lease."),
        ],
    )  # fmt: skip


def lease_settings(
    kubeconfig: Path | None,
    kube_context: str | None,
    lease_namespace: str,
    lease_name: str,
    *,
    enabled: bool = True,
) -> config.LeaseSettings:
    if not _DNS_LABEL.fullmatch(lease_namespace):
        raise ConfigError(f"--lease-namespace {lease_namespace!r} is not a DNS label")
    if len(lease_name) > 253 or not all(_DNS_LABEL.fullmatch(p) for p in lease_name.split(".")):
        raise ConfigError(f"--lease-name {lease_name!r} is not a DNS subdomain name")
    return config.LeaseSettings(
        kubeconfig=kubeconfig,
        context=kube_context,
        namespace=lease_namespace,
        name=lease_name,
        enabled=enabled,
    )
