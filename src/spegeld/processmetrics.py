"""The standard ``process_*`` metrics (and ``python_info``), read from /proc at scrape time.

Names, types and units are those of the Go and Python Prometheus clients, so dashboards
and alerts written for any exporter work unchanged:

    export_process_metrics(registry)

Nothing is read on the request path: every value is computed when ``/metrics`` renders.
A file /proc no longer offers (a hardened or non-Linux host) reads as NaN, never an error.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import resource
from collections.abc import Callable
from pathlib import Path

from spegeld.metrics import MetricsRegistry

__all__ = ["export_process_metrics", "read_stat", "with_process_metrics"]

logger = logging.getLogger(__name__)

PROC_SELF = Path("/proc/self")
# /proc/self/stat fields (proc(5), counted from 1) as indexes into the fields after
# the ``(comm)`` one, which may itself hold spaces and parentheses: field n is [n - 3].
_STARTTIME, _VSIZE, _RSS = 22 - 3, 23 - 3, 24 - 3


def read_stat(proc: Path = PROC_SELF) -> list[str]:
    """The fields of ``proc/stat`` after the command name (field 3, the state, first)."""
    text = (proc / "stat").read_text()
    return text.rpartition(")")[2].split()


def _boot_time() -> float:
    """Seconds since the epoch at boot: ``btime`` of /proc/stat."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    raise OSError("/proc/stat has no btime line")


def _or_nan(read: Callable[[], float]) -> Callable[[], float]:
    def value() -> float:
        try:
            return read()
        except (OSError, ValueError, IndexError):
            return math.nan

    return value


def with_process_metrics(registry: MetricsRegistry) -> MetricsRegistry:
    """``registry``, with this process's metrics registered on it."""
    export_process_metrics(registry)
    return registry


def export_process_metrics(registry: MetricsRegistry) -> None:
    """Register this process's metrics on ``registry``."""
    proc = PROC_SELF
    page_size = os.sysconf("SC_PAGE_SIZE")
    ticks = os.sysconf("SC_CLK_TCK")
    try:
        started = _boot_time() + int(read_stat(proc)[_STARTTIME]) / ticks
    except (OSError, ValueError, IndexError) as exc:
        logger.warning("no process start time for the metrics (%s)", exc)
        started = math.nan

    def cpu_seconds() -> float:
        times = os.times()  # this process's own, as utime + stime of /proc/self/stat
        return times.user + times.system

    registry.counter(
        "process_cpu_seconds_total", "Total user and system CPU time spent in seconds."
    ).set_function(_or_nan(cpu_seconds))
    registry.gauge("process_virtual_memory_bytes", "Virtual memory size in bytes.").set_function(
        _or_nan(lambda: float(read_stat(proc)[_VSIZE]))
    )
    registry.gauge("process_resident_memory_bytes", "Resident memory size in bytes.").set_function(
        _or_nan(lambda: float(int(read_stat(proc)[_RSS]) * page_size))
    )
    registry.gauge(
        "process_start_time_seconds", "Start time of the process since unix epoch in seconds."
    ).set(started)
    registry.gauge("process_open_fds", "Number of open file descriptors.").set_function(
        _or_nan(lambda: float(len(os.listdir(proc / "fd"))))
    )
    registry.gauge("process_max_fds", "Maximum number of open file descriptors.").set_function(
        _or_nan(lambda: float(resource.getrlimit(resource.RLIMIT_NOFILE)[0]))
    )
    major, minor, patchlevel = platform.python_version_tuple()
    registry.gauge(
        "python_info",
        "Python platform information.",
        ("implementation", "major", "minor", "patchlevel", "version"),
    ).labels(
        implementation=platform.python_implementation(),
        major=major,
        minor=minor,
        patchlevel=patchlevel,
        version=platform.python_version(),
    ).set(1)
