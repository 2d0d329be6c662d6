"""KubeClient against a real TLS server on loopback (trio + h11, certificates from trustme)."""

from __future__ import annotations

import json
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
import httpx
import pytest
import trio
import trustme

from spegeld.errors import ConfigError, KubeStatusError, KubeUnreachable, LeaseConflict
from spegeld.kube import Credentials, KubeClient, load_kubeconfig
from spegeld.metrics import MetricsRegistry

TOKEN = "t0ken-for-the-test-api-server"
ROTATED = "r0tated-token-for-the-test-api"
DATE = "Wed, 01 Jan 2025 00:00:00 GMT"
LEASES = "/apis/coordination.k8s.io/v1/namespaces/{}/leases"
LEASE = {
    "apiVersion": "coordination.k8s.io/v1",
    "kind": "Lease",
    "metadata": {"name": "coord", "namespace": "spegeld", "resourceVersion": "1"},
    "spec": {"holderIdentity": "node-1", "leaseDurationSeconds": 15},
}


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes


@dataclass
class FakeApi:
    """Canned answers in the shape kube-apiserver gives them; records every request."""

    tokens: set[str] = field(default_factory=lambda: {TOKEN})
    seen: list[Seen] = field(default_factory=list)

    def answer(self, r: Seen) -> tuple[int, bytes, str]:
        def js(code: int, value: Any) -> tuple[int, bytes, str]:
            return code, json.dumps(value).encode(), "application/json"

        auth = r.headers.get("authorization", "")
        if auth.removeprefix("Bearer ") not in self.tokens:
            return js(401, status(401, "Unauthorized", "Unauthorized"))
        ours, spegeld = LEASES.format("spegeld"), LEASES.format("spegeld") + "/"
        match r.method, r.path:
            case "GET", "/version":
                return js(200, {"major": "1", "minor": "32", "gitVersion": "v1.32.0"})
            case "GET", "/readyz":
                return 200, b"ok", "text/plain"
            case "GET", "/apis/coordination.k8s.io/v1/namespaces/spegeld/leases/coord":
                return js(200, LEASE)
            case "GET", path if path.startswith(LEASES.format("kube-system")):
                message = 'leases.coordination.k8s.io "coord" is forbidden: User "x" cannot get'
                return js(403, status(403, "Forbidden", message))
            case "GET", path if path.startswith(LEASES.format("broken")):
                return 500, b"<html>oops\n  upstream failed</html>", "text/html"
            case "GET", path if path.startswith(LEASES.format("huge")):
                return js(200, {"pad": "x" * (2 * 1024 * 1024)})
            case "GET" | "DELETE", path if path.startswith(spegeld):
                name = path.rsplit("/", 1)[1]
                return js(
                    404, status(404, "NotFound", f'leases.coordination.k8s.io "{name}" not found')
                )
            case "DELETE", _:
                return js(200, {"kind": "Status", "status": "Success"})
            case "POST", path if path == ours:
                lease = json.loads(r.body)
                if lease["metadata"]["name"] == "coord":
                    message = 'leases.coordination.k8s.io "coord" already exists'
                    return js(409, status(409, "AlreadyExists", message))
                lease["metadata"]["resourceVersion"] = "7"
                return js(201, lease)
            case "PUT", _:
                lease = json.loads(r.body)
                if lease["metadata"].get("resourceVersion") != "1":
                    message = (
                        'Operation cannot be fulfilled on leases.coordination.k8s.io "coord": '
                        "the object has been modified; please apply your changes to the latest "
                        "version and try again"
                    )
                    return js(409, status(409, "Conflict", message))
                lease["metadata"]["resourceVersion"] = "2"
                return js(200, lease)
            case "POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews":
                review = json.loads(r.body)
                verb = review["spec"]["resourceAttributes"]["verb"]
                allowed = verb in {"get", "create"}
                reason = 'RBAC: allowed by RoleBinding "spegeld"' if allowed else ""
                review["status"] = {"allowed": allowed, "reason": reason}
                return js(201, review)
        return js(404, status(404, "NotFound", "the server could not find the requested resource"))

    async def handle(self, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            for _ in range(100):  # requests per connection, bounded
                request: h11.Request | None = None
                body = b""
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some(65536))
                    elif isinstance(event, h11.Request):
                        request = event
                    elif isinstance(event, h11.Data):
                        body += event.data
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    else:  # ConnectionClosed
                        return
                assert request is not None
                target = urlsplit(request.target.decode())
                headers = {k.decode(): v.decode() for k, v in request.headers}
                seen = Seen(
                    request.method.decode(), target.path, parse_qs(target.query), headers, body
                )
                self.seen.append(seen)
                code, payload, content_type = self.answer(seen)
                response_headers = [
                    ("Content-Type", content_type),
                    ("Content-Length", str(len(payload))),
                    ("Date", DATE),
                ]
                await stream.send_all(
                    conn.send(h11.Response(status_code=code, headers=response_headers))
                )
                await stream.send_all(conn.send(h11.Data(data=payload)))
                await stream.send_all(conn.send(h11.EndOfMessage()))
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            return  # a client that failed its handshake or hung up: the test looks at the client
        finally:
            with trio.move_on_after(1):
                with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await stream.aclose()


Handler = Callable[[trio.abc.Stream], Awaitable[None]]


@asynccontextmanager
async def serving(
    handler: Handler, context: ssl.SSLContext | None, host: str = "127.0.0.1"
) -> AsyncIterator[int]:
    """Serve ``handler`` on a free port of ``host`` (TLS when ``context`` is given)."""
    async with trio.open_nursery() as nursery:
        if context is None:
            listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host=host))
            sock = listeners[0].socket
        else:
            serve = partial(trio.serve_ssl_over_tcp, handler, 0, context, host=host)
            listeners = await nursery.start(serve)
            sock = listeners[0].transport_listener.socket
        try:
            yield sock.getsockname()[1]
        finally:
            nursery.cancel_scope.cancel()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost", "::1").configure_cert(context)
    return context


def creds(port: int, ca: trustme.CA | None, host: str = "127.0.0.1", **changes: Any) -> Credentials:
    bracketed = f"[{host}]" if ":" in host else host
    changes.setdefault("token", TOKEN)
    return Credentials(
        server=f"https://{bracketed}:{port}",
        source="test",
        ca_pem=ca.cert_pem.bytes() if ca is not None else None,
        **changes,
    )


def causes(exc: BaseException) -> list[BaseException]:
    found: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(found) < 20:
        found.append(current)
        following = current.__cause__ or current.__context__
        if following is None and isinstance(current, BaseExceptionGroup):
            following = current.exceptions[0]  # trio's happy-eyeballs connect errors
        current = following
    return found


def counts(metrics: MetricsRegistry) -> dict[tuple[str, str], float]:
    result: dict[tuple[str, str], float] = {}
    for line in metrics.render().splitlines():
        if line.startswith("spegeld_kube_requests_total{"):
            labels, value = line.split("} ")
            verb = labels.split('verb="')[1].split('"')[0]
            code = labels.split('code="')[1].split('"')[0]
            result[verb, code] = float(value)
    return result


async def test_api_calls_and_status_errors(
    ca: trustme.CA, server_context: ssl.SSLContext, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    api = FakeApi()
    metrics = MetricsRegistry()
    with trio.fail_after(10):
        async with (
            serving(api.handle, server_context) as port,
            KubeClient(creds(port, ca), metrics=metrics, user_agent="spegeld/test") as kube,
        ):
            assert kube.last_date is None
            assert await kube.version() == {"major": "1", "minor": "32", "gitVersion": "v1.32.0"}
            assert kube.last_date == DATE
            assert await kube.readyz() == (200, "ok")

            assert await kube.get_lease("spegeld", "coord") == LEASE
            assert await kube.get_lease("spegeld", "missing") is None

            with pytest.raises(LeaseConflict) as conflict:
                await kube.create_lease("spegeld", LEASE)
            assert (conflict.value.code, conflict.value.reason) == (409, "AlreadyExists")
            assert conflict.value.message == 'leases.coordination.k8s.io "coord" already exists'
            new = {**LEASE, "metadata": {"name": "other", "namespace": "spegeld"}}
            created = await kube.create_lease("spegeld", new, dry_run=True)
            assert created["metadata"]["resourceVersion"] == "7"
            assert api.seen[-1].query == {"dryRun": ["All"]}
            assert json.loads(api.seen[-1].body) == new

            stale = {**LEASE, "metadata": {**LEASE["metadata"], "resourceVersion": "0"}}
            with pytest.raises(LeaseConflict) as conflict:
                await kube.update_lease("spegeld", "coord", stale)
            assert conflict.value.reason == "Conflict"
            assert "the object has been modified" in str(conflict.value)
            updated = await kube.update_lease("spegeld", "coord", LEASE)
            assert updated["metadata"]["resourceVersion"] == "2"
            assert api.seen[-1].method == "PUT"
            assert api.seen[-1].path == LEASES.format("spegeld") + "/coord"

            assert await kube.delete_lease("other", "coord") is True
            assert await kube.delete_lease("spegeld", "gone") is False

            with pytest.raises(KubeStatusError) as forbidden:
                await kube.get_lease("kube-system", "coord")
            assert type(forbidden.value) is KubeStatusError
            assert (forbidden.value.code, forbidden.value.reason) == (403, "Forbidden")
            assert "cannot get" in forbidden.value.message
            with pytest.raises(KubeStatusError) as broken:  # not a Status body: still one line
                await kube.get_lease("broken", "coord")
            assert (broken.value.code, broken.value.reason) == (500, "Internal Server Error")
            assert broken.value.message == "<html>oops upstream failed</html>"
            with pytest.raises(KubeStatusError, match="ResponseTooLarge"):
                await kube.get_lease("huge", "coord")

            assert await kube.access_review("spegeld", "get", "coordination.k8s.io", "leases") == (
                True,
                'RBAC: allowed by RoleBinding "spegeld"',
            )
            assert await kube.access_review(
                "spegeld", "update", "coordination.k8s.io", "leases"
            ) == (
                False,
                "",
            )
            review = json.loads(api.seen[-1].body)
            assert review["kind"] == "SelfSubjectAccessReview"
            assert review["spec"]["resourceAttributes"] == {
                "namespace": "spegeld",
                "verb": "update",
                "group": "coordination.k8s.io",
                "resource": "leases",
            }

            with pytest.raises(ConfigError, match="not a valid Kubernetes name"):
                await kube.get_lease("../../api", "coord")
            with pytest.raises(ValueError, match="verb label"):
                await kube.request("GET", "/version", verb="GET /version")

    assert {r.headers["user-agent"] for r in api.seen} == {"spegeld/test"}
    assert {r.headers["authorization"] for r in api.seen} == {f"Bearer {TOKEN}"}
    assert all(r.headers["accept"] == "application/json" for r in api.seen)
    assert counts(metrics) == {
        ("version", "200"): 1,
        ("readyz", "200"): 1,
        ("get", "200"): 2,  # the lease, and the oversized answer
        ("get", "404"): 1,
        ("get", "403"): 1,
        ("get", "500"): 1,
        ("create", "409"): 1,
        ("create", "201"): 1,
        ("update", "409"): 1,
        ("update", "200"): 1,
        ("delete", "200"): 1,
        ("delete", "404"): 1,
        ("review", "201"): 2,
    }
    assert TOKEN not in caplog.text


async def test_token_file_rotation_and_401(
    tmp_path: Path, ca: trustme.CA, server_context: ssl.SSLContext, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    api = FakeApi(tokens={TOKEN, ROTATED})
    with trio.fail_after(10):
        async with serving(api.handle, server_context) as port:
            rotating = creds(port, ca, token=None, token_file=token_file)
            async with KubeClient(rotating) as kube:
                await kube.version()
                token_file.write_text(ROTATED + "\n")
                await kube.version()
                token_file.unlink()  # mid-swap or gone: keep the last token, say so once
                await kube.version()
                await kube.version()
                assert caplog.text.count(f"cannot read token file {token_file}") == 1
                token_file.write_text("expired-token")
                with pytest.raises(KubeStatusError) as unauthorized:
                    await kube.version()
            assert (unauthorized.value.code, unauthorized.value.reason) == (401, "Unauthorized")
            async with KubeClient(
                creds(port, ca, token=None, token_file=tmp_path / "nope")
            ) as kube:
                with pytest.raises(ConfigError, match="cannot read token file"):
                    await kube.version()  # never read: nothing to fall back on
    assert [r.headers["authorization"] for r in api.seen] == [
        f"Bearer {TOKEN}",
        f"Bearer {ROTATED}",
        f"Bearer {ROTATED}",
        f"Bearer {ROTATED}",
        "Bearer expired-token",
    ]
    assert TOKEN not in caplog.text and ROTATED not in caplog.text
    assert "expired-token" not in str(unauthorized.value) + caplog.text


async def test_kubeconfig_end_to_end(
    tmp_path: Path, ca: trustme.CA, server_context: ssl.SSLContext
) -> None:
    (tmp_path / "ca.crt").write_bytes(ca.cert_pem.bytes())
    api = FakeApi()
    with trio.fail_after(10):
        async with serving(api.handle, server_context) as port:
            path = tmp_path / "kubeconfig"
            path.write_text(
                "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
                f"clusters:\n- name: k\n  cluster:\n    server: https://localhost:{port}/\n"
                "    certificate-authority: ca.crt\n"
                f"users:\n- name: u\n  user:\n    token: {TOKEN}\n"
                "contexts:\n- name: c\n  context:\n    cluster: k\n    user: u\n"
            )
            path.chmod(0o600)
            async with KubeClient(load_kubeconfig(path)) as kube:
                assert await kube.readyz() == (200, "ok")
    assert api.seen[0].path == "/readyz"


async def test_wrong_ca_fails_verification(server_context: ssl.SSLContext) -> None:
    metrics = MetricsRegistry()
    with trio.fail_after(10):
        async with serving(FakeApi().handle, server_context) as port:
            async with KubeClient(creds(port, trustme.CA()), metrics=metrics) as kube:
                with pytest.raises(KubeUnreachable) as info:
                    await kube.version()
    chain = causes(info.value)
    assert any(isinstance(e, ssl.SSLCertVerificationError) for e in chain), chain
    assert isinstance(info.value.__cause__, httpx.ConnectError)
    assert "CERTIFICATE_VERIFY_FAILED" in str(info.value)
    assert "\n" not in str(info.value)
    assert counts(metrics) == {("version", "error"): 1}


async def test_system_store_does_not_trust_the_test_ca(server_context: ssl.SSLContext) -> None:
    with trio.fail_after(10):
        async with serving(FakeApi().handle, server_context) as port:
            async with KubeClient(creds(port, None)) as kube:
                with pytest.raises(KubeUnreachable) as info:
                    await kube.version()
    assert any(isinstance(e, ssl.SSLCertVerificationError) for e in causes(info.value))


async def test_insecure_skip_tls_verify(server_context: ssl.SSLContext) -> None:
    with trio.fail_after(10):
        async with serving(FakeApi().handle, server_context) as port:
            async with KubeClient(creds(port, None, insecure_skip_tls_verify=True)) as kube:
                assert (await kube.version())["gitVersion"] == "v1.32.0"


async def test_tls_server_name(ca: trustme.CA) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("kubernetes.default.svc").configure_cert(context)  # no IP SAN at all
    with trio.fail_after(10):
        async with serving(FakeApi().handle, context) as port:
            named = creds(port, ca, tls_server_name="kubernetes.default.svc")
            async with KubeClient(named) as kube:
                assert (await kube.version())["minor"] == "32"
            async with KubeClient(creds(port, ca)) as kube:
                with pytest.raises(KubeUnreachable) as info:
                    await kube.version()
    verify = [e for e in causes(info.value) if isinstance(e, ssl.SSLCertVerificationError)]
    assert verify and "IP address mismatch" in str(verify[0])


async def test_client_certificate_auth(ca: trustme.CA) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    ca.configure_trust(context)
    context.verify_mode = ssl.CERT_REQUIRED
    client = ca.issue_cert("node-1.spegeld.test", common_name="system:node:node-1")
    api = FakeApi(tokens={""})  # certificate only: no Authorization header
    with trio.fail_after(10):
        async with serving(api.handle, context) as port:
            with_cert = creds(
                port,
                ca,
                token=None,
                client_cert_pem=client.cert_chain_pems[0].bytes(),
                client_key_pem=client.private_key_pem.bytes(),
            )
            async with KubeClient(with_cert) as kube:
                assert (await kube.version())["major"] == "1"
            async with KubeClient(creds(port, ca, token=None)) as kube:
                with pytest.raises(KubeUnreachable):  # the server refuses the handshake
                    await kube.version()
    assert len(api.seen) == 1
    assert "authorization" not in api.seen[0].headers


async def test_ipv6_server(ca: trustme.CA, server_context: ssl.SSLContext) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    api = FakeApi()
    with trio.fail_after(10):
        async with serving(api.handle, server_context, host="::1") as port:
            ipv6 = creds(port, ca, host="::1")
            assert ipv6.server == f"https://[::1]:{port}" and ipv6.host == "::1"
            async with KubeClient(ipv6) as kube:
                assert await kube.readyz() == (200, "ok")
    assert api.seen[0].headers["host"] == f"[::1]:{port}"


async def test_connection_refused(ca: trustme.CA) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    metrics = MetricsRegistry()
    with trio.fail_after(5):
        async with KubeClient(creds(port, ca), metrics=metrics) as kube:
            with pytest.raises(KubeUnreachable) as info:
                await kube.get_lease("spegeld", "coord")
    assert isinstance(info.value.__cause__, httpx.ConnectError)
    assert any(isinstance(e, ConnectionRefusedError) for e in causes(info.value))
    assert str(info.value).startswith(f"GET https://127.0.0.1:{port}/apis/coordination.k8s.io/")
    assert str(info.value).endswith("Connection refused")
    assert counts(metrics) == {("get", "error"): 1}


async def test_silent_server_times_out_in_bounded_time(ca: trustme.CA) -> None:
    async def silent(stream: trio.abc.Stream) -> None:
        await trio.sleep(30)  # accept, then never speak: the TLS handshake hangs

    with trio.fail_after(5):
        async with serving(silent, None) as port:
            async with KubeClient(creds(port, ca), timeout=0.3) as kube:
                start = trio.current_time()
                with pytest.raises(KubeUnreachable) as info:
                    await kube.version()
                elapsed = trio.current_time() - start
    assert isinstance(info.value.__cause__, httpx.ConnectTimeout)
    assert "ConnectTimeout" in str(info.value)
    assert 0.25 <= elapsed < 1.5


async def test_trickling_server_hits_the_overall_deadline(ca: trustme.CA) -> None:
    async def trickle(stream: trio.abc.Stream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        for _ in range(100):  # each byte inside the read timeout, the whole far beyond it
            await stream.send_all(b"x")
            await trio.sleep(0.1)

    with trio.fail_after(5):
        async with serving(trickle, None) as port:
            plain = Credentials(server=f"http://127.0.0.1:{port}", source="test")
            async with KubeClient(plain, timeout=0.3) as kube:
                start = trio.current_time()
                with pytest.raises(KubeUnreachable) as info:
                    await kube.version()
                elapsed = trio.current_time() - start
    assert isinstance(info.value.__cause__, trio.TooSlowError)
    assert str(info.value).endswith("no complete answer in time")
    assert 0.55 <= elapsed < 1.5


async def test_one_registry_shared_by_two_clients(
    ca: trustme.CA, server_context: ssl.SSLContext
) -> None:
    metrics = MetricsRegistry()
    with trio.fail_after(10):
        async with serving(FakeApi().handle, server_context) as port:
            async with KubeClient(creds(port, ca), metrics=metrics) as one:
                await one.version()
            async with KubeClient(creds(port, ca), metrics=metrics) as two:
                await two.version()
                await two.readyz()
    assert counts(metrics) == {("version", "200"): 2, ("readyz", "200"): 1}
    assert metrics.render().count("# TYPE spegeld_kube_requests_total counter") == 1


async def test_use_outside_async_with_is_a_bug(ca: trustme.CA) -> None:
    kube = KubeClient(creds(1, ca))
    with pytest.raises(RuntimeError, match="outside `async with`"):
        await kube.version()
