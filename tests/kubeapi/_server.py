"""The trio shell: TLS, HTTP/1.1 keep-alive via h11, files for other processes.

``open_kube_api`` is what in-process tests use; ``__main__`` runs the very same
``serve`` inside a subprocess (for network-namespace tests and benchmarks).
"""

from __future__ import annotations

import base64
import datetime as dt
import email.utils
import functools
import json
import os
import re
import secrets
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal, TextIO

import h11
import trio
import trustme
import yaml

from ._accounts import Account
from ._core import MAX_BODY, ApiCore, HttpRequest, HttpResponse, RequestRecord

DEFAULT_NAMESPACES = frozenset({"default", "kube-system", "spegeld"})
CertKind = Literal["valid", "other-ca", "expired"]
READ_SIZE = 65536
SERVER_NAMES = (
    "localhost",
    "127.0.0.1",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
)


def issue_server_cert(ca: trustme.CA, host: str, kind: CertKind = "valid") -> trustme.LeafCert:
    """A serving certificate; ``other-ca`` and ``expired`` ones make clients fail TLS."""
    names = list(dict.fromkeys([host, *SERVER_NAMES]))
    if kind == "other-ca":
        return trustme.CA().issue_cert(*names)
    if kind == "expired":
        now = dt.datetime.now(dt.UTC)
        return ca.issue_cert(
            *names, not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(days=1)
        )
    return ca.issue_cert(*names)


def _ssl_context(cert: trustme.LeafCert) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    context.set_alpn_protocols(["http/1.1"])  # clients that offer h2 fall back to HTTP/1.1
    return context


class KubeAPI:
    """Control handle of a running test API server."""

    def __init__(self, core: ApiCore, ca: trustme.CA, url: str) -> None:
        self.core = core
        self.ca = ca
        self.url = url
        self.ca_pem: bytes = ca.cert_pem.bytes()

    def __repr__(self) -> str:
        return f"KubeAPI(url={self.url!r})"

    @property
    def clock_offset(self) -> float:
        return self.core.clock_offset

    @clock_offset.setter
    def clock_offset(self, seconds: float) -> None:
        self.core.clock_offset = float(seconds)

    @property
    def requests(self) -> list[RequestRecord]:
        return self.core.requests

    @property
    def leases(self) -> dict[tuple[str, str], dict[str, Any]]:
        """A deep copy of the stored leases, keyed by (namespace, name)."""
        return {key: self.core.store.get(*key) for key in self.core.store.leases}

    @property
    def namespaces(self) -> set[str]:
        return self.core.store.namespaces

    def account(self, token: str) -> Account:
        return self.core.accounts[token]

    def add_account(self, account: Account) -> None:
        self.core.accounts[account.token] = account

    def revoke(self, token: str) -> None:
        self.core.accounts.pop(token, None)

    def grant(self, token: str, resource: str, namespace: str, *verbs: str) -> None:
        self.core.accounts[token].grant(resource, namespace, verbs)

    def deny(self, token: str, resource: str, namespace: str, *verbs: str) -> None:
        self.core.accounts[token].deny(resource, namespace, verbs)

    def set_ready(self, ready: bool) -> None:
        self.core.ready = ready

    def write_ca(self, path: Path) -> Path:
        path.write_bytes(self.ca_pem)
        return path

    def write_kubeconfig(
        self, path: Path, token: str, *, namespace: str = "spegeld", server: str | None = None
    ) -> Path:
        """A kubeconfig for one token (mode 0600: it holds a secret)."""
        user = self.core.accounts[token].user if token in self.core.accounts else "revoked"
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "kubeapi-test",
                    "cluster": {
                        "server": server or self.url,
                        "certificate-authority-data": base64.b64encode(self.ca_pem).decode(),
                    },
                }
            ],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [
                {
                    "name": "kubeapi-test",
                    "context": {"cluster": "kubeapi-test", "user": user, "namespace": namespace},
                }
            ],
            "current-context": "kubeapi-test",
        }
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            yaml.safe_dump(config, out, sort_keys=False)
        return path

    def write_state(self, state_dir: Path) -> None:
        """``ca.pem``, ``accounts.json`` and ``kubeconfig-<user>`` for other processes."""
        self.write_ca(state_dir / "ca.pem")
        accounts = [a.to_json() for a in self.core.accounts.values()]
        fd = os.open(state_dir / "accounts.json", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump({"url": self.url, "accounts": accounts}, out, indent=2)
        for account in self.core.accounts.values():
            self.write_kubeconfig(
                state_dir / f"kubeconfig-{_file_safe(account.user)}", account.token
            )


def _file_safe(user: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", user)


def default_accounts() -> list[Account]:
    """A spegeld ServiceAccount (leases get/create/update in "spegeld") and an admin."""
    return [
        Account.lease_holder(secrets.token_urlsafe(24)),
        Account.admin(secrets.token_urlsafe(24)),
    ]


async def _read_request(stream: trio.abc.Stream, conn: h11.Connection) -> HttpRequest | None:
    head: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(READ_SIZE)))
        elif isinstance(event, h11.Request):
            head = event
        elif isinstance(event, h11.Data):
            if len(body) <= MAX_BODY:
                body += event.data
        elif isinstance(event, h11.EndOfMessage) and head is not None:
            headers = {k.decode().lower(): v.decode("latin-1") for k, v in head.headers}
            return HttpRequest(
                head.method.decode(), head.target.decode("latin-1"), headers, bytes(body)
            )
        elif isinstance(event, h11.ConnectionClosed):
            return None


async def _send(
    stream: trio.abc.Stream, conn: h11.Connection, response: HttpResponse, now: float
) -> None:
    headers = [
        ("Content-Type", response.content_type),
        ("Content-Length", str(len(response.body))),
        ("Date", email.utils.formatdate(now, usegmt=True)),
        *response.headers,
    ]
    for event in (
        h11.Response(status_code=response.status, headers=headers),
        h11.Data(data=response.body),
        h11.EndOfMessage(),
    ):
        data = conn.send(event)
        if data:
            await stream.send_all(data)


async def _serve_connection(stream: trio.abc.Stream, core: ApiCore) -> None:
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            request = await _read_request(stream, conn)
            if request is None:
                return
            await _send(stream, conn, core.handle(request), core.now())
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
        return  # a client that fails TLS or speaks bad HTTP just loses its connection
    finally:
        await trio.aclose_forcefully(stream)


async def serve(
    core: ApiCore,
    cert: trustme.LeafCert,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; ``started`` with the bound port once accepting."""
    tcp = await trio.open_tcp_listeners(port, host=host)
    listeners = [trio.SSLListener(t, _ssl_context(cert), https_compatible=True) for t in tcp]
    bound = tcp[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, lambda s: _serve_connection(s, core), listeners)
        task_status.started(bound)


def _append_record(log: TextIO, record: RequestRecord) -> None:
    log.write(json.dumps(asdict(record)) + "\n")  # line-buffered: readers see whole lines


def _host_in_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@asynccontextmanager
async def open_kube_api(
    state_dir: Path | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    accounts: Iterable[Account] | None = None,
    namespaces: Iterable[str] = DEFAULT_NAMESPACES,
    clock_offset: float = 0.0,
    cert: CertKind = "valid",
    field_validation_default: str = "Strict",
    wall_clock: Callable[[], float] = time.time,
) -> AsyncIterator[KubeAPI]:
    """Run a test API server for the block; with ``state_dir``, also write its files.

    ``state_dir`` gets ``ca.pem``, ``accounts.json``, ``kubeconfig-<user>`` and an
    appended ``requests.jsonl`` (one JSON object per handled request).
    """
    core = ApiCore(
        accounts=list(default_accounts() if accounts is None else accounts),
        namespaces=set(namespaces),
        wall_clock=wall_clock,
        field_validation_default=field_validation_default,
    )
    core.clock_offset = clock_offset
    ca = trustme.CA()
    log: TextIO | None = None
    if state_dir is not None:
        log = (state_dir / "requests.jsonl").open("a", encoding="utf-8", buffering=1)
        core.on_request = functools.partial(_append_record, log)
    try:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(serve, core, issue_server_cert(ca, host, cert), host, port)
            core.server_address = f"{_host_in_url(host)}:{bound}"
            api = KubeAPI(core, ca, f"https://{core.server_address}")
            if state_dir is not None:
                api.write_state(state_dir)
            yield api
            nursery.cancel_scope.cancel()
    finally:
        if log is not None:
            log.close()
