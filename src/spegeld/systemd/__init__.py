"""systemd integration: sd_notify and the watchdog, socket activation, credentials, journald.

Pure Python and trio-native (no libsystemd): each piece reads its environment variables
and is a no-op when they are unset, so the same daemon runs under systemd, on Talos and in
a terminal.
"""

from spegeld.systemd._activation import LISTEN_FDS_START, InheritedSocket, listen_fds
from spegeld.systemd._environment import (
    ABSENT_CREDENTIAL,
    KUBECONFIG_CREDENTIAL,
    PriorityPrefix,
    credential_path,
    log_format,
    priority,
    stderr_is_journal,
)
from spegeld.systemd._notify import MAX_STATUS_CHARS, Notifier, serve_watchdog, watchdog_interval

__all__ = [
    "ABSENT_CREDENTIAL",
    "KUBECONFIG_CREDENTIAL",
    "LISTEN_FDS_START",
    "MAX_STATUS_CHARS",
    "InheritedSocket",
    "Notifier",
    "PriorityPrefix",
    "credential_path",
    "listen_fds",
    "log_format",
    "priority",
    "serve_watchdog",
    "stderr_is_journal",
    "watchdog_interval",
]
