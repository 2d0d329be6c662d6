"""--private-registry against a registry that uses Bearer tokens (``auth: token``).

The upstream is the real Distribution (Debian's 2.8.2) with ``auth: token`` (realm, service,
issuer, rootcertbundle); the images go in before auth is switched on. The token server is a
stand-in, tests/_tokenserver.py, because the real one (cesanta/docker_auth) cannot be built
here (the Go module proxy answers ``403`` for it); it signs tokens the way Distribution 2.8
verifies them, and the registry is what checks them: a token it did not accept would show
as a refused pull. User ``puller`` may pull ``private/app`` and not ``private/other``: its
token for ``private/other`` carries no access, and the registry answers ``401``.

Two layers: :class:`PrivateAccess` itself (the check spegeld makes, and its cache), and a
real ``spegeld run --private-registry`` over a containerd 1.6 with CRI holding both images,
asked by HTTP and by ``crictl pull --creds``.
"""

from __future__ import annotations

import base64
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import trio
from spegeld_harness import (
    BuiltImage,
    PrivateContainerd,
    SpegeldProcess,
    UpstreamRegistry,
    build_image,
)

from spegeld.metrics import MetricsRegistry
from spegeld.mirror._errors import OciError
from spegeld.mirror._private import CHECK_DEADLINE, PrivateAccess
from tests._components import component_binary, component_dir

from ._support import configure_hosts
from ._tokenserver import TokenIssuer, TokenServer

pytestmark = [pytest.mark.containerd, pytest.mark.slow]

USER, SECRET = "puller", "bearer-s3cret"
APP, OTHER, TAG = "private/app", "private/other", "v1"
IO_TIMEOUT = 20.0  # seconds for one PrivateAccess case; a check here takes milliseconds
CASE_TIMEOUT = 60.0  # seconds for one daemon case; a pull here takes under 2 s
SETUP_TIMEOUT = 30.0  # seconds for spegeld to index the imported images
HANG_DEADLINE = 1.0  # seconds: PrivateAccess's check deadline in the hanging-realm case


class TokenRegistry(UpstreamRegistry):
    """Distribution with ``auth: token`` once :attr:`token` is set (pushes go in before).
    The harness's own requests (readiness, log sync: ``GET /v2/``, which needs no access)
    carry a token the issuer mints with an ``x5c`` header, so both ways of naming the
    signing key are exercised against the real registry (the token server uses ``kid``)."""

    token: TokenServer | None = None

    def _write_config(self) -> None:
        super()._write_config()
        if self.token is not None:
            bundle = self.token.issuer.write_bundle(self.base_dir / "token-root.pem")
            with self.config_path.open("a") as config:
                config.write(
                    "auth:\n  token:\n"
                    f'    realm: "{self.token.realm}"\n'
                    f'    service: "{self.token.issuer.service}"\n'
                    f'    issuer: "{self.token.issuer.issuer}"\n'
                    f'    rootcertbundle: "{bundle}"\n'
                )

    def request(self, method, path, *, headers=None, body=None, timeout=None):  # type: ignore[no-untyped-def]
        extra = {}
        if self.token is not None:
            bearer = self.token.issuer.mint("harness", [], header="x5c")
            extra = {"Authorization": f"Bearer {bearer}"}
        return super().request(
            method, path, headers={**(headers or {}), **extra}, body=body, timeout=timeout
        )


@dataclass(frozen=True, slots=True)
class Upstream:
    registry: TokenRegistry
    tokens: TokenServer
    app: BuiltImage
    other: BuiltImage


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    base = tmp_path_factory.mktemp("bearer-upstream")
    tokens = TokenServer(TokenIssuer(), {USER: (SECRET, [APP])}).start()
    registry = TokenRegistry(base / "registry")
    try:
        registry.start()
        app = build_image(registry.reference(APP, TAG), [4_000], seed=81, workdir=base)
        other = build_image(registry.reference(OTHER, TAG), [5_000], seed=82, workdir=base)
        registry.push(app, APP, TAG)
        registry.push(other, OTHER, TAG)
        registry.token = tokens
        registry.restart()
        yield Upstream(registry, tokens, app, other)
    finally:
        registry.close()
        tokens.stop()


def basic(user: str, secret: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{secret}".encode())


def sample(metrics: MetricsRegistry, name: str) -> float:
    for line in metrics.render().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


async def authorize(
    access: PrivateAccess, up: Upstream, repository: str, header: bytes | None
) -> int:
    """200 if served, else the OciError's status."""
    try:
        await access.authorize(up.registry.address, repository, f"manifests/{TAG}", header)
    except OciError as exc:
        return exc.status
    return 200


def new_access(
    up: Upstream, deadline: float = CHECK_DEADLINE
) -> tuple[PrivateAccess, MetricsRegistry]:
    metrics = MetricsRegistry()
    access = PrivateAccess({up.registry.address: up.registry.url}, metrics, deadline=deadline)
    return access, metrics


async def test_the_registry_takes_the_stand_ins_tokens(upstream: Upstream) -> None:
    """The ground truth under the rest: the real registry answers a manifest HEAD with 401
    and a Bearer challenge naming the realm, and with 200 to a token from the realm for a
    repository the user may pull, 401 ``insufficient_scope`` for one it may not, and 401
    ``invalid_token`` for a token that grants it but is signed by a key not in the bundle."""
    url = f"{upstream.registry.url}/v2/{APP}/manifests/{TAG}"
    accept = {"accept": "application/vnd.oci.image.manifest.v1+json"}
    with trio.fail_after(IO_TIMEOUT):
        async with httpx.AsyncClient(trust_env=False) as http:
            challenged = await http.head(url, headers=accept)
            assert challenged.status_code == 401
            challenge = challenged.headers["www-authenticate"]
            assert challenge.startswith(f'Bearer realm="{upstream.tokens.realm}"'), challenge
            for repository, status in ((APP, 200), (OTHER, 401)):
                got = await http.get(
                    upstream.tokens.realm,
                    params={"service": upstream.tokens.issuer.service,
                            "scope": f"repository:{repository}:pull"},
                    auth=(USER, SECRET),
                )  # fmt: skip
                assert got.status_code == 200, got
                bearer = {**accept, "authorization": f"Bearer {got.json()['token']}"}
                url = f"{upstream.registry.url}/v2/{repository}/manifests/{TAG}"
                answer = await http.head(url, headers=bearer)
                assert answer.status_code == status, (repository, answer.headers)
            assert "insufficient_scope" in answer.headers["www-authenticate"]
            forged = TokenIssuer().mint(USER, [APP])
            url = f"{upstream.registry.url}/v2/{APP}/manifests/{TAG}"
            answer = await http.head(url, headers={**accept, "authorization": f"Bearer {forged}"})
            assert answer.status_code == 401
            assert "invalid_token" in answer.headers["www-authenticate"]


async def test_checks_follow_the_bearer_challenge(upstream: Upstream) -> None:
    """Right credentials for private/app: served after one upstream check (one token
    request), then from the cache. The same credentials for private/other: refused (404),
    the token carries no access for it. Wrong credentials: refused, the realm said 401.
    None: the challenge, and nothing asked upstream."""
    access, metrics = new_access(upstream)
    before = len(upstream.tokens.seen)
    try:
        with trio.fail_after(IO_TIMEOUT):
            assert await authorize(access, upstream, APP, None) == 401
            assert len(upstream.tokens.seen) == before
            results: list[int] = []

            async def one() -> None:
                results.append(await authorize(access, upstream, APP, basic(USER, SECRET)))

            async with trio.open_nursery() as nursery:
                for _ in range(10):
                    nursery.start_soon(one)
            assert results == [200] * 10, results
            assert await authorize(access, upstream, APP, basic(USER, SECRET)) == 200
            asked = upstream.tokens.seen[before:]
            assert [(r.method, r.user, r.scopes, r.status, r.granted) for r in asked] == [
                ("GET", USER, (f"repository:{APP}:pull",), 200, (APP,))
            ]
            assert sample(metrics, 'spegeld_private_checks_total{result="accepted"}') == 1

            assert await authorize(access, upstream, OTHER, basic(USER, SECRET)) == 404
            assert upstream.tokens.seen[-1].granted == ()
            assert await authorize(access, upstream, APP, basic(USER, "wrong")) == 404
            assert upstream.tokens.seen[-1].status == 401
            assert await authorize(access, upstream, APP, basic("nobody", SECRET)) == 404
            assert sample(metrics, 'spegeld_private_checks_total{result="refused"}') == 3
            assert sample(metrics, 'spegeld_private_requests_total{decision="served"}') == 11
    finally:
        await access.aclose()


async def test_an_unreachable_token_server_fails_closed(upstream: Upstream) -> None:
    """The registry answers, its realm does not: refused (404), and the refusal is cached.
    Then a realm that accepts connections and never answers: refused at the check's
    deadline, not later."""
    access, metrics = new_access(upstream)
    hanging = socket.socket()
    await trio.to_thread.run_sync(upstream.tokens.stop)
    try:
        with trio.fail_after(IO_TIMEOUT):
            assert await authorize(access, upstream, APP, basic(USER, SECRET)) == 404
            assert await authorize(access, upstream, APP, basic(USER, SECRET)) == 404
            assert sample(metrics, 'spegeld_private_checks_total{result="refused"}') == 1
            # The realm's port listens (the kernel completes the handshake) but no one reads.
            hanging.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            hanging.bind(("127.0.0.1", upstream.tokens.port))
            hanging.listen(8)
            slow, _ = new_access(upstream, deadline=HANG_DEADLINE)
            try:
                start = trio.current_time()
                assert await authorize(slow, upstream, APP, basic(USER, SECRET)) == 404
                took = trio.current_time() - start
            finally:
                await slow.aclose()
            assert HANG_DEADLINE - 0.05 <= took < HANG_DEADLINE + 1.0, took
    finally:
        hanging.close()
        await access.aclose()
        await trio.to_thread.run_sync(upstream.tokens.start)


@dataclass(frozen=True, slots=True)
class Node:
    containerd: PrivateContainerd
    spegeld: SpegeldProcess


@pytest.fixture(
    scope="module",
    params=[
        pytest.param("1.6", id="1.6"),
        pytest.param("2.3", id="2.3", marks=pytest.mark.containerd2),
    ],
)
def node(
    request: pytest.FixtureRequest, upstream: Upstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Node]:
    base = tmp_path_factory.mktemp(f"bearer-node-{request.param}")
    bin_dir = None if request.param == "1.6" else component_dir("containerd")
    containerd = PrivateContainerd(base / "containerd", bin_dir=bin_dir, cri=True)
    spegeld: SpegeldProcess | None = None
    try:
        containerd.start()
        for i, image in enumerate((upstream.app, upstream.other)):
            containerd.import_image(image.write_oci_archive(base / f"image-{i}.tar"))
        spegeld = SpegeldProcess(
            base / "spegeld", containerd, extra_args=["--private-registry", upstream.registry.url]
        )
        spegeld.start()
        configure_hosts(containerd.hosts_dir, spegeld.url, upstream.registry.url)
        yield Node(containerd, spegeld)
    finally:
        if spegeld is not None:
            spegeld.close()
        containerd.close()


async def mirror_head(node: Node, path: str, header: bytes | None = None) -> int:
    headers = None if header is None else {"Authorization": header.decode()}
    status: int = (await trio.to_thread.run_sync(
        lambda: node.spegeld.get(path, method="HEAD", headers=headers)
    ))[0]  # fmt: skip
    return status


async def wait_until_served(node: Node, target: str) -> None:
    seen: list[int] = []
    for _ in range(int(SETUP_TIMEOUT / 0.2)):
        seen.append(await mirror_head(node, target, basic(USER, SECRET)))
        if seen[-1] == 200:
            return
        await trio.sleep(0.2)
    raise AssertionError(f"the mirror never served {target}: {seen[-5:]}")


async def test_the_daemon_serves_only_what_the_token_grants(upstream: Upstream, node: Node) -> None:
    """A real ``spegeld run --private-registry`` on the mirror listener, both images on the
    node: private/app's manifest 200 with puller's credentials, private/other's 404 (its
    token grants nothing there), no credentials 401 with the Basic challenge."""
    ns = upstream.registry.address
    app = f"/v2/{APP}/manifests/{TAG}?ns={ns}"
    other = f"/v2/{OTHER}/manifests/{TAG}?ns={ns}"
    with trio.fail_after(SETUP_TIMEOUT + IO_TIMEOUT):
        await wait_until_served(node, app)
        assert await mirror_head(node, other, basic(USER, SECRET)) == 404
        assert await mirror_head(node, app) == 401
        assert await mirror_head(node, app, basic(USER, "wrong")) == 404
        granted = [r for r in upstream.tokens.seen if r.user == USER and r.status == 200]
        assert {r.granted for r in granted} >= {(APP,), ()}, granted


def crictl(node: Node, *args: str) -> list[str]:
    endpoint = f"unix://{node.containerd.cri_socket}"
    config = node.containerd.base_dir / "crictl.yaml"
    config.write_text(f"runtime-endpoint: {endpoint}\nimage-endpoint: {endpoint}\n")
    return [str(component_binary("crictl")), "--config", str(config), "--timeout", "40s", *args]


async def pull(up: Upstream, node: Node, repository: str) -> tuple[int, str, list[str]]:
    """``crictl pull --creds puller:…``: exit code, stderr, and what the upstream saw from
    containerd (spegeld's own checks, by user agent, left out)."""
    start = up.registry.log_position()
    result = await trio.run_process(
        crictl(node, "pull", "--creds", f"{USER}:{SECRET}", up.registry.reference(repository, TAG)),
        capture_stdout=True, capture_stderr=True, check=False,
    )  # fmt: skip
    seen = await trio.to_thread.run_sync(up.registry.requests, start)
    upstream = [f"{r.method} {r.path} {r.status}" for r in seen if "httpx" not in r.user_agent]
    return result.returncode, result.stderr.decode(), upstream


async def test_crictl_pulls_a_granted_image_from_the_mirror(upstream: Upstream, node: Node) -> None:
    """``crictl pull --creds`` of private/app succeeds with none of containerd's requests
    reaching the upstream: the mirror resolved and served it after its Bearer check. The
    same credentials for private/other fail although the image is on the node: the mirror
    refused, and the upstream (asked next) answered the token containerd got from the
    realm with 401."""
    served = 'spegeld_private_requests_total{decision="served"}'
    with trio.fail_after(2 * CASE_TIMEOUT):
        await wait_until_served(node, f"/v2/{APP}/manifests/{TAG}?ns={upstream.registry.address}")
        before = node.spegeld.metric(served)
        code, stderr, seen = await pull(upstream, node, APP)
        assert code == 0, (stderr, seen)
        assert seen == [], seen
        assert node.spegeld.metric(served) > before
        tokens = len(upstream.tokens.seen)
        code, stderr, seen = await pull(upstream, node, OTHER)
        assert code != 0, (stderr, seen)
        assert f"HEAD /v2/{OTHER}/manifests/{TAG} 401" in seen, seen
        assert not any(" 200" in line for line in seen), seen
        # containerd's own token requests (its OAuth2 form among them) were granted nothing.
        asked = upstream.tokens.seen[tokens:]
        assert any(r.method == "POST" and r.user == USER for r in asked), asked
        assert all(r.granted == () for r in asked), asked


async def test_the_token_server_refuses_bad_requests(upstream: Upstream) -> None:
    """The stand-in itself: no credentials, a wrong secret or another service get 401; the
    OAuth2 password form gets the same grants as the Basic GET."""
    realm, service = upstream.tokens.realm, upstream.tokens.issuer.service
    scope = f"repository:{APP}:pull repository:{OTHER}:pull"
    with trio.fail_after(IO_TIMEOUT):
        async with httpx.AsyncClient(trust_env=False) as http:
            anonymous = await http.get(realm, params={"service": service, "scope": scope})
            assert anonymous.status_code == 401
            wrong = await http.get(realm, params={"service": service}, auth=(USER, "wrong"))
            assert wrong.status_code == 401
            elsewhere = await http.get(realm, params={"service": "other"}, auth=(USER, SECRET))
            assert elsewhere.status_code == 401
            form = {"grant_type": "password", "username": USER, "password": SECRET,
                    "service": service, "scope": scope, "client_id": "test"}  # fmt: skip
            assert (await http.post(realm, data=form)).status_code == 200
    assert upstream.tokens.seen[-1].granted == (APP,)
