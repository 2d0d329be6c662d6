"""Log handlers for the daemon: JSON lines for journald, Talos and shippers; text on a TTY."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime


class JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str, fmt: str | None) -> None:
    """JSON lines unless a person watches a terminal (or ``--log-format text``); under
    journald, each line carries its ``<N>`` priority so journald files it at its level."""
    from spegeld.systemd import PriorityPrefix, log_format, stderr_is_journal

    handler = logging.StreamHandler(sys.stderr)
    formatter: logging.Formatter
    if log_format(fmt) == "json":
        formatter = JsonLines()
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    handler.setFormatter(PriorityPrefix(formatter) if stderr_is_journal() else formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Their debug output is per HTTP/2 frame: far too much even for --log-level debug.
    for chatty in ("hpack", "h2", "grpclib"):
        logging.getLogger(chatty).setLevel(max(root.level, logging.INFO))
    # One line per Lease renewal (httpx) or per socket event (httpcore) is noise; the
    # election logs what matters itself.
    for chatty in ("httpx", "httpcore"):
        logging.getLogger(chatty).setLevel(max(root.level, logging.WARNING))
