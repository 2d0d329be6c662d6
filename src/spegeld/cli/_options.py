"""Options shared by several commands, each with its SPEGELD_* environment twin."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from spegeld import config

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
                default=config.DEFAULT_CONTENT_PATH,
                show_default=True,
                help="containerd's content store directory, read directly when readable.",
            ),
        ]
    ):
        func = decorator(func)
    return func


def containerd_config(
    containerd_sock: Path, containerd_namespace: str, containerd_content_path: Path
) -> config.ContainerdConfig:
    return config.ContainerdConfig(
        socket=containerd_sock,
        namespace=containerd_namespace,
        content_path=containerd_content_path,
    )


def json_option(func: F) -> F:
    return option("--json", "as_json", is_flag=True, help="Print JSON for machines.")(func)
