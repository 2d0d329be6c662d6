"""The API-server checks: one sequence for the preflight, the runtime diagnosis and doctor.

Each step runs only if the one before it passed, because a later step's failure
would only repeat the earlier cause: DNS, then TCP, then TLS, then HTTP (health,
clock, credentials, RBAC, namespace).
"""

from __future__ import annotations

import email.utils
import enum
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

from spegeld.errors import KubeStatusError, KubeUnreachable, LeaseConflict, SpegeldError
from spegeld.kube import Credentials, KubeClient, jwt_claims, jwt_expiry, ssl_context
from spegeld.netaddr import join_host_port

from . import _remedies as remedy
from ._model import CheckResult, Status, first_failure, skipped
from ._net import Connect, is_ip, nameservers, resolve, route_to, tcp_connect
from ._tls import TlsResult, check_tls

SKEW_WARN = 30.0  # seconds; NTP-synced clocks agree within milliseconds
SKEW_FAIL = 300.0  # the usual tolerance of token and certificate checks
# kube-apiserver's /readyz runs its etcd and etcd-readiness checks one after the other,
# each waiting up to 2 s (--etcd-healthcheck-timeout, --etcd-readycheck-timeout): with etcd
# stopped it answered 500 after 4.02 s (v1.36.3). The full report waits this long, +50 %
# for a loaded control plane, for the server's own answer naming the failing checks...
READYZ_WAIT = 6.0
READYZ_WAIT_TIMEOUTS = 3  # ...but never more than 3 timeouts: doctor cuts a group at 6
MAX_FAILED_SHOWN = 8  # /readyz lists ~50 checks; a few failed ones say enough
_FAILED_CHECK = re.compile(r"^\[-\]([\w./:-]+) failed", re.MULTILINE)  # "[-]etcd failed: …"


class ApiStep(enum.Enum):
    """The API checks, in the order they run: a failure skips every later one."""

    DNS = ("api.dns", "API server name")
    TCP = ("api.tcp", "API server TCP")
    TLS = ("api.tls", "API server TLS")
    HEALTH = ("api.health", "API server health")
    CLOCK = ("api.clock", "Clock vs API server")
    AUTH = ("api.auth", "API credentials")
    RBAC = ("api.rbac", "Lease permissions")
    NAMESPACE = ("api.namespace", "Lease namespace")

    @property
    def check(self) -> str:
        return self.value[0]

    @property
    def title(self) -> str:
        return self.value[1]


@dataclass(frozen=True, slots=True)
class ApiTarget:
    creds: Credentials | None
    namespace: str = "spegeld"
    lease: str = "spegeld-coordinator"
    # Real endpoints behind a service VIP, tried when the VIP drops packets: their
    # answer tells a policy (drops both) from kube-proxy/service trouble (VIP only).
    endpoints: tuple[tuple[str, int], ...] = ()


def _result(
    step: ApiStep,
    status: Status,
    verdict: str,
    evidence: tuple[str, ...] = (),
    fix: str = "",
    seconds: float = 0.0,
) -> CheckResult:
    return CheckResult(step.check, step.title, status, verdict, evidence, fix, round(seconds, 4))


def _skip_from(step: ApiStep, because: str) -> list[CheckResult]:
    steps = list(ApiStep)
    return [skipped(s.check, s.title, because) for s in steps[steps.index(step) :]]


async def check_api(
    target: ApiTarget,
    timeout: float,
    *,
    wall: Callable[[], float] = time.time,
    readyz_wait: float | None = None,
) -> list[CheckResult]:
    """Every API check; ``readyz_wait`` bounds /readyz (default: up to READYZ_WAIT)."""
    if readyz_wait is None:
        readyz_wait = max(timeout, min(READYZ_WAIT, READYZ_WAIT_TIMEOUTS * timeout))
    creds = target.creds
    if creds is None:
        return [
            skipped(
                "api",
                "Kubernetes API",
                "no --kubeconfig and not in a cluster: election is off, images are still shared",
            )
        ]
    host, port = creds.host, creds.port
    results: list[CheckResult] = []
    started = trio.current_time()
    addresses = await resolve(host, port, timeout)
    if isinstance(addresses, str):
        servers = nameservers()
        results.append(
            _result(
                ApiStep.DNS,
                Status.FAIL,
                f"DNS failure: {host} does not resolve",
                (f"resolver said: {addresses}", f"nameservers: {', '.join(servers) or 'none'}"),
                remedy.dns(host, servers),
                trio.current_time() - started,
            )
        )
        return results + _skip_from(ApiStep.TCP, "the name does not resolve")
    verdict = "an IP address" if is_ip(host) else f"{host} resolves to {', '.join(addresses)}"
    results.append(_result(ApiStep.DNS, Status.OK, verdict, (f"server {creds.server}",)))

    ip = addresses[0]
    connected = await tcp_connect(ip, port, timeout)
    where = join_host_port(ip, port)  # [v6]:port
    if connected.outcome is Connect.DROPPED:
        evidence: tuple[str, ...] = (f"{where}: SYN sent, {connected.detail}",)
    else:
        evidence = (f"{where}: {connected.detail} after {connected.seconds * 1000:.0f} ms",)
    if connected.outcome is not Connect.OK:
        results.append(
            await _connect_failure(target, ip, port, connected.outcome, evidence, timeout)
        )
        return results + _skip_from(ApiStep.TLS, "no TCP connection")
    results.append(
        _result(ApiStep.TCP, Status.OK, "connected", evidence, seconds=connected.seconds)
    )

    if creds.server.startswith("https://"):
        tls = await check_tls(ip, port, ssl_context(creds), creds.tls_server_name or host, timeout)
        results.append(_tls_result(tls, creds.insecure_skip_tls_verify, wall()))
        if not tls.ok and not creds.insecure_skip_tls_verify:
            return results + _skip_from(ApiStep.HEALTH, "no TLS session")
    else:
        results.append(
            _result(ApiStep.TLS, Status.WARN, "plain HTTP: traffic and token are unprotected")
        )
    try:
        results += await _http_checks(target, creds, timeout, wall, readyz_wait)
    except SpegeldError as exc:  # e.g. the token file vanished: a finding, not a crash
        unusable = _result(ApiStep.AUTH, Status.FAIL, f"the credentials cannot be used: {exc}")
        skips = _skip_from(ApiStep.HEALTH, "no usable credentials")
        results += [unusable if r.check == unusable.check else r for r in skips]
    return results


async def diagnose_api(target: ApiTarget, timeout: float) -> CheckResult:
    """The first failing (or warning) check; an ok result when everything passed.

    /readyz gets ``timeout`` alone: the elector bounds a whole diagnosis."""
    results = await check_api(target, timeout, readyz_wait=timeout)
    # A TLS warning is the kubeconfig's http:// or insecure-skip-tls-verify, which the
    # credential loader already logged once at start, with its fix: not news at runtime.
    news = [r for r in results if not (r.check == ApiStep.TLS.check and r.status is Status.WARN)]
    found = first_failure(news)
    if found is not None:
        return found
    return CheckResult("api", "Kubernetes API", Status.OK, "reachable, credentials and RBAC ok")


async def _connect_failure(
    target: ApiTarget,
    ip: str,
    port: int,
    outcome: Connect,
    evidence: tuple[str, ...],
    timeout: float,
) -> CheckResult:
    assert target.creds is not None
    if outcome is Connect.REFUSED:
        return _result(
            ApiStep.TCP,
            Status.FAIL,
            "connection refused: nothing listening, or a REJECT rule",
            evidence,
            remedy.refused(ip, port),
        )
    if outcome is Connect.DROPPED:
        extra = list(evidence)
        for endpoint_ip, endpoint_port in target.endpoints:
            other = await tcp_connect(endpoint_ip, endpoint_port, timeout)
            extra.append(f"endpoint {endpoint_ip}:{endpoint_port}: {other.outcome.value}")
            if other.outcome is Connect.OK:
                extra.append(
                    "the endpoint answers but the address in use does not: suspect the "
                    "service VIP (kube-proxy, Cilium's socket LB), not a policy"
                )
        return _result(
            ApiStep.TCP,
            Status.FAIL,
            "packets dropped: SYN unanswered (NetworkPolicy, CiliumNetworkPolicy or host "
            "firewall); this is Go's 'dial tcp …: i/o timeout'",
            tuple(extra),
            remedy.dropped(ip, port, target.namespace),
        )
    if outcome is Connect.UNREACHABLE:
        route = await route_to(ip)
        # Routed here, yet unreachable: the ICMP answer came from the path or the far end.
        where = (
            "an ICMP unreachable came back from the network"
            if route.routed
            else f"this node's kernel has no usable route to {ip}"
        )
        return _result(
            ApiStep.TCP,
            Status.FAIL,
            f"no route: {where}",
            (*evidence, f"route: {route.text}"),
            remedy.unreachable(ip, port, route.routed, route.text),
        )
    return _result(ApiStep.TCP, Status.FAIL, "connection failed", evidence)


def _tls_result(tls: TlsResult, insecure: bool, now: float) -> CheckResult:
    evidence = tls.certificate.evidence() if tls.certificate else ()
    if insecure:
        # The context does not verify (CERT_NONE), so a handshake proves nothing either way.
        detail = "the certificate is not checked" if tls.ok else tls.detail
        return _result(
            ApiStep.TLS,
            Status.WARN,
            f"verification is OFF (insecure-skip-tls-verify): {detail}",
            evidence,
        )
    if tls.ok:
        return _result(ApiStep.TLS, Status.OK, "certificate verified", evidence)
    verdicts = {
        "unknown-ca": (
            "TLS: the server's certificate is not signed by the CA in the kubeconfig",
            "Put the cluster's CA in certificate-authority-data (on a node: "
            "/etc/kubernetes/pki/ca.crt; in a pod: the ServiceAccount's ca.crt).",
        ),
        "name-mismatch": (
            "TLS: the certificate does not name the server address in use",
            "Use a server address listed in the certificate's names, or set tls-server-name.",
        ),
        "expired": (
            "TLS: the certificate has expired (or this clock is ahead)",
            "Renew the API server certificate, or fix this node's clock.",
        ),
        "not-yet-valid": (
            "TLS: the certificate is not valid yet: this clock is behind",
            remedy.clock(),
        ),
    }
    verdict, fix = verdicts.get(tls.kind, (f"TLS handshake failed: {tls.detail}", ""))
    if tls.certificate is not None:
        local = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(now))
        evidence = (*evidence, f"local clock: {local} UTC", f"OpenSSL: {tls.detail}")
    return _result(ApiStep.TLS, Status.FAIL, verdict, evidence, fix)


async def _readyz(client: KubeClient, creds: Credentials, wait: float) -> tuple[int, str]:
    if wait <= client.timeout:
        return await client.readyz()
    async with KubeClient(creds, timeout=wait) as patient:
        return await patient.readyz()


def _health_result(code: int, body: str, version: dict[str, object], took: float) -> CheckResult:
    shown = f"version {version.get('gitVersion', '?')}"
    if code == 200:
        return _result(
            ApiStep.HEALTH, Status.OK, "ready", (f"/readyz: 200 {body[:80]!r}", shown), seconds=took
        )
    if code in (401, 403):  # about our credentials, not the server: API credentials says more
        return _result(
            ApiStep.HEALTH,
            Status.SKIP,
            f"readiness unknown: /readyz answered {code} to these credentials",
            (f"/readyz: {code} {body[:80]!r}", shown),
            seconds=took,
        )
    failing = _FAILED_CHECK.findall(body)
    named = f", failing: {', '.join(failing)}" if failing else ""
    # The server's own words for each failed check, else the start of whatever it said.
    said = [ln for ln in body.splitlines() if ln.startswith("[-]")] or [repr(body[:80])]
    return _result(
        ApiStep.HEALTH,
        Status.FAIL,
        f"API server unhealthy: /readyz answered {code}{named}",
        (*(f"/readyz: {code} {line}" for line in said[:MAX_FAILED_SHOWN]), shown),
        remedy.unhealthy(failing),
        took,
    )


async def _http_checks(
    target: ApiTarget,
    creds: Credentials,
    timeout: float,
    wall: Callable[[], float],
    readyz_wait: float,
) -> list[CheckResult]:
    results: list[CheckResult] = []
    async with KubeClient(creds, timeout=timeout) as client:
        asked = trio.current_time()
        try:
            code, body = await _readyz(client, creds, readyz_wait)
            took = trio.current_time() - asked
            sent = wall()
            version = await client.version()
            date = client.last_date
        except KubeUnreachable as exc:
            # TCP and TLS worked just before: a server that then says nothing is stuck.
            results.append(
                _result(
                    ApiStep.HEALTH,
                    Status.FAIL,
                    f"no HTTP answer: {exc}",
                    fix=remedy.silent(readyz_wait),
                )
            )
            return results + _skip_from(ApiStep.CLOCK, "no HTTP answer")
        except KubeStatusError as exc:
            code, body, version, date, sent = exc.code, exc.message, {}, None, wall()
            took = trio.current_time() - asked
        results.append(_health_result(code, body, version, took))
        results.append(_clock_result(date, sent))
        if code >= 500:
            # A server that is not ready (etcd down, say) cannot answer the Lease checks
            # either: their timeouts would only repeat its /readyz.
            return results + _skip_from(ApiStep.AUTH, "the API server is not ready")
        results += await _auth_checks(client, target, creds)
    return results


def _clock_result(date: str | None, local: float) -> CheckResult:
    if not date:
        return _result(ApiStep.CLOCK, Status.SKIP, "the API server sent no Date header")
    try:
        server = email.utils.parsedate_to_datetime(date).timestamp()
    except (TypeError, ValueError):
        return _result(ApiStep.CLOCK, Status.SKIP, f"unreadable Date header {date[:40]!r}")
    skew = local - server
    evidence = (f"server Date: {date}", f"local clock is {skew:+.0f} s from the server's")
    if abs(skew) >= SKEW_FAIL:
        return _result(
            ApiStep.CLOCK, Status.FAIL, f"clock skew of {abs(skew):.0f} s", evidence, remedy.clock()
        )
    if abs(skew) >= SKEW_WARN:
        return _result(
            ApiStep.CLOCK, Status.WARN, f"clock skew of {abs(skew):.0f} s", evidence, remedy.clock()
        )
    return _result(
        ApiStep.CLOCK,
        Status.OK,
        "in step (within a few seconds; Date has 1 s resolution)",
        evidence,
    )


def _subject(token: str | None) -> tuple[str, str, str | None]:
    sub = str(jwt_claims(token).get("sub", "")) if token else ""
    parts = sub.split(":")
    if len(parts) == 4 and parts[:2] == ["system", "serviceaccount"]:
        return "ServiceAccount", parts[3], parts[2]
    return "User", sub or "YOUR-USER", None


def _token_evidence(token: str | None, now: float) -> tuple[str, ...]:
    if not token:
        return ("no bearer token (client certificate or none)",)
    expiry = jwt_expiry(token)
    if expiry is None:
        return ("token: not a JWT, or without an expiry",)
    left = expiry.timestamp() - now
    when = expiry.strftime("%Y-%m-%d %H:%M:%S UTC")
    if left < 0:
        return (f"token expired {-left / 60:.0f} min ago ({when})",)
    return (f"token valid until {when}",)


async def _auth_checks(
    client: KubeClient, target: ApiTarget, creds: Credentials
) -> list[CheckResult]:
    results: list[CheckResult] = []
    token = creds.bearer_token()
    try:
        await client.get_lease(target.namespace, target.lease)
    except KubeStatusError as exc:
        if exc.code == 401:
            results.append(
                _result(
                    ApiStep.AUTH,
                    Status.FAIL,
                    "401: credentials rejected or expired",
                    (*_token_evidence(token, time.time()), f"from {creds.source}"),
                    remedy.unauthorized(creds.source),
                )
            )
            return results + _skip_from(ApiStep.RBAC, "not authenticated")
        if exc.code != 403:
            results.append(_result(ApiStep.AUTH, Status.FAIL, f"reading the Lease failed: {exc}"))
            return results + _skip_from(ApiStep.RBAC, "the Lease cannot be read")
    except KubeUnreachable as exc:
        results.append(_result(ApiStep.AUTH, Status.FAIL, f"no HTTP answer: {exc}"))
        return results + _skip_from(ApiStep.RBAC, "no HTTP answer")
    results.append(
        _result(
            ApiStep.AUTH,
            Status.OK,
            "accepted",
            (*_token_evidence(token, time.time()), creds.source),
        )
    )

    denied: list[str] = []
    reasons: list[str] = []
    try:
        for verb in remedy.LEASE_VERBS:
            allowed, reason = await client.access_review(
                target.namespace, verb, "coordination.k8s.io", "leases"
            )
            reasons.append(f"{verb}: {'allowed' if allowed else 'denied'}")
            if not allowed:
                denied.append(verb)
                if reason:
                    reasons.append(f"reason: {reason}")
    except (KubeStatusError, KubeUnreachable) as exc:
        results.append(_result(ApiStep.RBAC, Status.FAIL, f"SelfSubjectAccessReview failed: {exc}"))
        return results + _skip_from(ApiStep.NAMESPACE, "permissions unknown")
    if denied:
        results.append(
            _result(
                ApiStep.RBAC,
                Status.FAIL,
                f"403: RBAC forbids {', '.join(denied)} on leases in {target.namespace}",
                tuple(reasons),
                remedy.forbidden(target.namespace, _subject(token)),
            )
        )
        return results + _skip_from(ApiStep.NAMESPACE, "the Lease cannot be created")
    results.append(
        _result(ApiStep.RBAC, Status.OK, "get, create and update allowed", tuple(reasons))
    )
    results.append(await _namespace_check(client, target))
    return results


async def _namespace_check(client: KubeClient, target: ApiTarget) -> CheckResult:
    probe = {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": target.lease, "namespace": target.namespace},
        "spec": {},
    }
    try:
        await client.create_lease(target.namespace, probe, dry_run=True)
    except LeaseConflict:
        return _result(
            ApiStep.NAMESPACE, Status.OK, f"{target.namespace} exists; the Lease exists too"
        )
    except KubeStatusError as exc:
        if exc.code == 404:
            return _result(
                ApiStep.NAMESPACE,
                Status.FAIL,
                f"namespace {target.namespace} is missing",
                (str(exc),),
                remedy.missing_namespace(target.namespace),
            )
        return _result(ApiStep.NAMESPACE, Status.FAIL, f"a dry-run create failed: {exc}")
    except KubeUnreachable as exc:
        return _result(ApiStep.NAMESPACE, Status.FAIL, f"no HTTP answer: {exc}")
    return _result(
        ApiStep.NAMESPACE, Status.OK, f"{target.namespace} exists (dry-run create accepted)"
    )
