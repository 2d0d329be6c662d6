"""mirror._private: the decision and its cache (sans-I/O), and the upstream check against a
real Distribution with htpasswd auth (fail closed when refused or unreachable)."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import trio

from spegeld.metrics import MetricsRegistry
from spegeld.mirror._errors import OciError
from spegeld.mirror._private import (
    ACCEPT_TTL,
    REFUSE_TTL,
    Allowed,
    Challenge,
    Check,
    Denied,
    PrivateAccess,
    PrivateGate,
    basic_credentials,
    endpoint_of,
)

from .test_private_registry_cri import SECRET, USER, AuthRegistry

REGISTRY = "registry.example"
IO_TIMEOUT = 20.0  # seconds for one I/O test; each check here takes milliseconds


def basic(user: str, secret: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{secret}".encode())


def test_endpoints() -> None:
    assert endpoint_of("registry.example") == ("registry.example", "https://registry.example")
    assert endpoint_of("https://r.example:8443/") == ("r.example:8443", "https://r.example:8443")
    assert endpoint_of("http://127.0.0.1:5000") == ("127.0.0.1:5000", "http://127.0.0.1:5000")
    assert endpoint_of("docker.io") == ("docker.io", "https://registry-1.docker.io")
    for bad in ("ftp://r.example", "r.example/path", "http://u:p@r.example", "", "http://"):
        with pytest.raises(ValueError, match="not a registry"):
            endpoint_of(bad)


def test_only_basic_credentials_with_user_and_secret_count() -> None:
    assert basic_credentials(basic("u", "p:w")) == ("u", "p:w")
    assert basic_credentials(b"basic " + base64.b64encode(b"u:p")) == ("u", "p")
    for header in (None, b"Bearer abc", b"Basic !!!", basic("", "p"), basic("u", ""),
                   b"Basic " + base64.b64encode(b"nocolon"), b"Basic " + b"A" * 5000):  # fmt: skip
        assert basic_credentials(header) is None, header


def test_verdicts_are_cached_per_credential_and_repository_for_their_time() -> None:
    gate = PrivateGate({REGISTRY: "https://registry.example"})
    assert isinstance(gate.decide(REGISTRY, "a", None, 0.0), Challenge)
    first = gate.decide(REGISTRY, "a", basic("u", "p"), 0.0)
    assert isinstance(first, Check) and first.endpoint == "https://registry.example"
    assert len(first.key[0]) == 32 and "p" not in first.key[1:]  # an HMAC, not the secret
    gate.record(first.key, True, 0.0)
    assert isinstance(gate.decide(REGISTRY, "a", basic("u", "p"), ACCEPT_TTL - 0.1), Allowed)
    assert isinstance(gate.decide(REGISTRY, "a", basic("u", "p"), ACCEPT_TTL), Check)
    # Another secret, another repository: their own checks.
    assert isinstance(gate.decide(REGISTRY, "a", basic("u", "other"), 1.0), Check)
    assert isinstance(gate.decide(REGISTRY, "b", basic("u", "p"), 1.0), Check)
    refused = gate.decide(REGISTRY, "c", basic("u", "p"), 0.0)
    assert isinstance(refused, Check)
    gate.record(refused.key, False, 0.0)
    assert isinstance(gate.decide(REGISTRY, "c", basic("u", "p"), REFUSE_TTL - 0.1), Denied)
    assert isinstance(gate.decide(REGISTRY, "c", basic("u", "p"), REFUSE_TTL), Check)
    assert gate.is_private(REGISTRY) and not gate.is_private("docker.io")
    assert not gate.is_private(None)


def test_the_cache_is_a_bounded_lru() -> None:
    gate = PrivateGate({REGISTRY: "https://registry.example"}, capacity=2)
    keys = {}
    for repo in ("a", "b"):
        check = gate.decide(REGISTRY, repo, basic("u", "p"), 0.0)
        assert isinstance(check, Check)
        keys[repo] = check.key
        gate.record(check.key, True, 0.0)
    assert isinstance(gate.decide(REGISTRY, "a", basic("u", "p"), 1.0), Allowed)  # a: recent
    c = gate.decide(REGISTRY, "c", basic("u", "p"), 1.0)
    assert isinstance(c, Check)
    gate.record(c.key, True, 1.0)
    assert len(gate) == 2
    assert isinstance(gate.decide(REGISTRY, "b", basic("u", "p"), 2.0), Check)  # evicted
    assert isinstance(gate.decide(REGISTRY, "a", basic("u", "p"), 2.0), Allowed)


def test_the_cache_key_is_keyed_per_process() -> None:
    """The HMAC key is drawn at start: two gates never share a credential's fingerprint."""
    one = PrivateGate({REGISTRY: "https://r"}).decide(REGISTRY, "a", basic("u", "p"), 0.0)
    two = PrivateGate({REGISTRY: "https://r"}).decide(REGISTRY, "a", basic("u", "p"), 0.0)
    assert isinstance(one, Check) and isinstance(two, Check) and one.key != two.key


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthRegistry]:
    registry = AuthRegistry(tmp_path_factory.mktemp("private-upstream"))
    registry.auth = True
    try:
        registry.start()
        yield registry
    finally:
        registry.close()


def sample(metrics: MetricsRegistry, name: str) -> float:
    for line in metrics.render().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


async def authorize(access: PrivateAccess, host: str, header: bytes | None) -> int:
    """200 if served, else the OciError's status."""
    try:
        await access.authorize(host, "private/app", "manifests/v1", header)
    except OciError as exc:
        return exc.status
    return 200


async def test_upstream_checks_against_a_real_htpasswd_registry(upstream: AuthRegistry) -> None:
    """No credentials: the challenge. Wrong ones: the upstream refuses, 404. The right
    ones: served, and ten concurrent requests cost the upstream one check."""
    metrics = MetricsRegistry()
    access = PrivateAccess({upstream.address: upstream.url}, metrics)
    image = await trio.to_thread.run_sync(_push_small_image, upstream)
    try:
        with trio.fail_after(IO_TIMEOUT):
            assert await authorize(access, upstream.address, None) == 401
            assert await authorize(access, upstream.address, basic(USER, "wrong")) == 404
            # Ten concurrent requests with the right credentials: one upstream check.
            results: list[int] = []

            async def one() -> None:
                results.append(await authorize(access, upstream.address, basic(USER, SECRET)))

            async with trio.open_nursery() as nursery:
                for _ in range(10):
                    nursery.start_soon(one)
            assert results == [200] * 10, results
            checked = 'spegeld_private_checks_total{result="accepted"}'
            assert sample(metrics, checked) == 1
            refused = 'spegeld_private_checks_total{result="refused"}'
            assert sample(metrics, refused) == 1
    finally:
        await access.aclose()
    assert image


def _push_small_image(upstream: AuthRegistry) -> str:
    from spegeld_harness import build_image

    from .test_private_registry_cri import REPO, TAG

    upstream.auth = False
    upstream.restart()
    try:
        image = build_image(
            upstream.reference(REPO, TAG), [1_000], seed=9, workdir=upstream.base_dir
        )
        return upstream.push(image, REPO, TAG)
    finally:
        upstream.auth = True
        upstream.restart()


async def test_an_unreachable_upstream_fails_closed(tmp_path: Path) -> None:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # a port nothing listens on: connection refused
    host = f"127.0.0.1:{port}"
    metrics = MetricsRegistry()
    access = PrivateAccess({host: f"http://{host}"}, metrics, deadline=2.0)
    try:
        with trio.fail_after(IO_TIMEOUT):
            assert await authorize(access, host, basic(USER, SECRET)) == 404
            assert await authorize(access, host, basic(USER, SECRET)) == 404  # cached refusal
        assert sample(metrics, 'spegeld_private_checks_total{result="refused"}') == 1
    finally:
        await access.aclose()


async def test_a_redirect_after_auth_counts_as_accepted() -> None:
    """A registry whose storage is S3 or GCS answers an allowed blob HEAD with a redirect to
    the bucket. A stand-in upstream: Distribution's filesystem storage never redirects."""
    right = basic(USER, SECRET)
    seen: list[bytes] = []

    async def upstream(stream: trio.SocketStream) -> None:
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 8192:
            chunk = await stream.receive_some(4096)
            if not chunk:
                return
            head += chunk
        seen.append(head)
        fields = [line.partition(b":") for line in head.split(b"\r\n")[1:]]
        allowed = any(k.strip().lower() == b"authorization" and v.strip() == right
                      for k, _, v in fields)  # fmt: skip
        status = b"307 Temporary Redirect\r\nLocation: http://127.0.0.1:9/bucket" if allowed \
            else b"403 Forbidden"  # fmt: skip
        await stream.send_all(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\n\r\n")
        await stream.aclose()

    with trio.fail_after(IO_TIMEOUT):
        async with trio.open_nursery() as nursery:
            serve = partial(trio.serve_tcp, upstream, 0, host="127.0.0.1")
            (listener,) = await nursery.start(serve)
            host = f"127.0.0.1:{listener.socket.getsockname()[1]}"
            access = PrivateAccess({host: f"http://{host}"}, MetricsRegistry())
            try:
                assert await authorize(access, host, right) == 200
                assert await authorize(access, host, basic(USER, "wrong")) == 404
            finally:
                await access.aclose()
            nursery.cancel_scope.cancel()
    assert len(seen) == 2  # one check each; the redirect was not followed


def config_of(*args: str) -> tuple[tuple[str, str], ...]:
    from spegeld.cli.run import node_config, run

    ctx = run.make_context("run", ["--insecure-gossip", *args])
    return node_config(**ctx.params).private_registries


def test_the_option_flag_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert config_of() == ()
    assert config_of(
        "--private-registry", "registry.example", "--private-registry", "http://10.0.0.5:5000"
    ) == (
        ("registry.example", "https://registry.example"),
        ("10.0.0.5:5000", "http://10.0.0.5:5000"),
    )
    monkeypatch.setenv("SPEGELD_PRIVATE_REGISTRY", "a.example b.example")
    assert [host for host, _ in config_of()] == ["a.example", "b.example"]


def test_a_bad_private_registry_is_a_config_error() -> None:
    from spegeld.errors import ConfigError

    with pytest.raises(ConfigError, match="--private-registry: 'ftp://x' is not a registry"):
        config_of("--private-registry", "ftp://x")
