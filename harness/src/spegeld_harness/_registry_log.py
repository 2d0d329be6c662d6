"""The registry's request log: Distribution's access-log lines as :class:`RegistryRequest`.

Distribution writes two lines per request into ``registry.log``:

* a logrus line on stderr, ``time="…" level=info msg="response completed" …
  http.request.method=GET http.request.uri=/v2/… http.response.status=200
  http.response.written=N …`` (``level=error msg="response completed with error"`` for 4xx/5xx);
  requests that match no route (``GET /nonexistent``) get none;
* an access-log line on stdout in Apache combined format (gorilla/handlers), for *every*
  request, written when the handler returns::

      127.0.0.1 - - [27/Nov/2026:03:26:22 +0000] "GET /v2/a/blobs/sha256:… HTTP/1.1" 200 300 "" "ua"

  The size is the number of response-body bytes the handler wrote: the blob size for a full
  blob GET, the range length for a 206, the bytes written before a client hung up.  For a
  HEAD it is the body length the handler *would* have sent (Go drops it), so only GETs
  count as bytes served.

:meth:`UpstreamRegistry.requests` parses the access-log lines.  A request's line appears just
*after* the client has read the whole response, so by default the parser first sends a marker
request (``GET /v2/?spegeld-sync=N``, filtered out of the results) and waits until its line is
in the log: anything that completed before the call is then reliably in the results.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

__all__ = ["SYNC_PATH", "RegistryRequest", "parse_access_log"]

# The marker request's path; its lines are left out of the results.
SYNC_PATH: Final = "/v2/?spegeld-sync="

_BLOB_PATH_RE: Final = re.compile(r"^/v2/.+/blobs/[a-z0-9]+:[0-9a-f]+$")
# gorilla/handlers combined log format: remote ident user [time] "method uri proto" status size
# "referer" "user agent".  Quoted fields escape '"' and '\' with a backslash.
_ACCESS_RE: Final = re.compile(
    r'^(?P<remote>\S+) \S+ \S+ \[(?P<time>[^\]]*)\] "(?P<method>[A-Z]+) (?P<uri>\S+) '
    r'(?P<proto>[^"]*)" (?P<status>\d{3}) (?P<size>\d+|-)'
    r'(?: "(?P<referer>(?:[^"\\]|\\.)*)" "(?P<agent>(?:[^"\\]|\\.)*)")?$'
)


@dataclass(frozen=True)
class RegistryRequest:
    """One access-log line of the registry."""

    method: str
    uri: str  # as sent: path plus query string
    status: int
    size: int  # response-body bytes the handler wrote (see the module docstring)
    remote: str
    user_agent: str

    @property
    def path(self) -> str:
        return self.uri.partition("?")[0]

    @property
    def is_blob_get(self) -> bool:
        return self.method == "GET" and bool(_BLOB_PATH_RE.match(self.path))

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


def parse_access_log(text: str) -> list[RegistryRequest]:
    """The access-log lines in ``text`` (other lines are skipped), oldest first."""
    out: list[RegistryRequest] = []
    for line in text.splitlines():
        m = _ACCESS_RE.match(line)
        if m is None:
            continue
        size = m["size"]
        out.append(
            RegistryRequest(
                method=m["method"],
                uri=m["uri"],
                status=int(m["status"]),
                size=0 if size == "-" else int(size),
                remote=m["remote"],
                user_agent=re.sub(r"\\(.)", r"\1", m["agent"] or ""),
            )
        )
    return out
