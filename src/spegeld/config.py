"""Configuration as frozen dataclasses, plus the TOML file that feeds click's defaults.

Precedence, highest first: command-line flag, ``SPEGELD_<NAME>`` environment
variable, the ``--config`` TOML file, the built-in default.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spegeld.errors import ConfigError

DEFAULT_CONTAINERD_SOCK = Path("/run/containerd/containerd.sock")
DEFAULT_CONTAINERD_NAMESPACE = "k8s.io"
DEFAULT_CONTENT_PATH = Path("/var/lib/containerd/io.containerd.content.v1.content")
DEFAULT_RESYNC_INTERVAL = 300.0  # seconds; events carry changes, the resync only repairs misses


@dataclass(frozen=True, slots=True)
class ContainerdConfig:
    socket: Path = DEFAULT_CONTAINERD_SOCK
    namespace: str = DEFAULT_CONTAINERD_NAMESPACE
    content_path: Path = DEFAULT_CONTENT_PATH
    resync_interval: float = DEFAULT_RESYNC_INTERVAL


def envvar(option_name: str) -> str:
    """``--containerd-sock`` → ``SPEGELD_CONTAINERD_SOCK``."""
    return "SPEGELD_" + option_name.lstrip("-").replace("-", "_").upper()


def load_toml(path: Path, known_keys: frozenset[str]) -> dict[str, Any]:
    """Read a config file into option defaults keyed by parameter name.

    Keys may be spelled as flags (``containerd-sock``) or as identifiers
    (``containerd_sock``). Unknown keys are an error, so typos do not pass silently.
    """
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in known_keys:
            raise ConfigError(f"config file {path}: unknown key {key!r}")
        values[name] = value
    return values
