"""--private-registry on the real node path: CRI pulls with and without the upstream's credentials.

A private containerd with CRI on (Debian's 1.6 and the built 2.3), its hosts dir written by
the real ``spegeld configure containerd`` to point at a real ``spegeld run`` with
``--private-registry <upstream>``, and a real Distribution upstream with htpasswd auth (a
bcrypt line made with the standard library's ``crypt``, Blowfish method: no ``bcrypt`` in
the venv, and Python 3.11 still ships ``crypt``).

The image is already in containerd (imported, so spegeld holds and serves it), and its
upstream refuses anything but the right credentials. So a ``crictl pull`` that succeeds with
wrong or no credentials could only have been served by the mirror: those must fail. With
the right credentials the mirror serves the tag (the upstream sees only spegeld's one check,
never containerd's resolve). A public registry's image, on the same node, is served with no
credentials at all.
"""

from __future__ import annotations

import base64
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import trio
from spegeld_harness import PrivateContainerd, SpegeldProcess, UpstreamRegistry, build_image

from tests._components import component_binary, component_dir

from ._support import configure_hosts, wait_until

pytestmark = [pytest.mark.containerd, pytest.mark.slow]

USER, SECRET = "puller", "right-s3cret"
REPO, PUBLIC_REPO, TAG = "private/app", "public/app", "v1"
OTHER_REPO = "private/other"  # a second private repository, for the binding
PUBLIC_HOST = "127.0.0.1:9"  # discard port: nothing answers, only the mirror can serve it
CASE_TIMEOUT = 60.0  # seconds for one case; a pull here takes under 2 s
SETUP_TIMEOUT = 30.0  # seconds for spegeld to index the imported images


def htpasswd_line(user: str, secret: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # crypt: removed in 3.13
        import crypt

        return f"{user}:{crypt.crypt(secret, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))}\n"


class AuthRegistry(UpstreamRegistry):
    """Distribution with ``auth: htpasswd`` once :attr:`auth` is set (pushes go in before).
    The harness's own requests (readiness, log sync) carry the right credentials."""

    auth = False

    def _write_config(self) -> None:
        super()._write_config()
        if self.auth:
            htpasswd = self.base_dir / "htpasswd"
            htpasswd.write_text(htpasswd_line(USER, SECRET))
            with self.config_path.open("a") as config:
                config.write(f'auth:\n  htpasswd:\n    realm: "upstream"\n    path: "{htpasswd}"\n')

    def request(self, method, path, *, headers=None, body=None, timeout=None):  # type: ignore[no-untyped-def]
        basic = base64.b64encode(f"{USER}:{SECRET}".encode()).decode()
        return super().request(
            method, path, headers={**(headers or {}), "Authorization": f"Basic {basic}"},
            body=body, timeout=timeout,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Node:
    containerd: PrivateContainerd
    upstream: AuthRegistry
    spegeld: SpegeldProcess
    other_layer: str  # a layer only private/other's image holds


@pytest.fixture(
    scope="module",
    params=[
        pytest.param("1.6", id="1.6"),
        pytest.param("2.3", id="2.3", marks=pytest.mark.containerd2),
    ],
)
def node(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Node]:
    base = tmp_path_factory.mktemp(f"private-{request.param}")
    bin_dir = None if request.param == "1.6" else component_dir("containerd")
    containerd = PrivateContainerd(base / "containerd", bin_dir=bin_dir, cri=True)
    upstream = AuthRegistry(base / "upstream")
    spegeld: SpegeldProcess | None = None
    try:
        containerd.start()
        upstream.start()
        private = build_image(upstream.reference(REPO, TAG), [4_000], seed=71, workdir=base)
        public = build_image(f"{PUBLIC_HOST}/{PUBLIC_REPO}:{TAG}", [3_000], seed=72, workdir=base)
        other = build_image(upstream.reference(OTHER_REPO, TAG), [5_000], seed=73, workdir=base)
        upstream.push(private, REPO, TAG)
        upstream.push(other, OTHER_REPO, TAG)
        upstream.auth = True
        upstream.restart()
        for i, image in enumerate((private, public, other)):
            containerd.import_image(image.write_oci_archive(base / f"image-{i}.tar"))
        spegeld = SpegeldProcess(
            base / "spegeld", containerd, extra_args=["--private-registry", upstream.url]
        )
        spegeld.start()
        configure_hosts(containerd.hosts_dir, spegeld.url, f"{upstream.url},http://{PUBLIC_HOST}")
        yield Node(containerd, upstream, spegeld, str(other.platforms[0].layers[0]))
    finally:
        if spegeld is not None:
            spegeld.close()
        containerd.close()
        upstream.close()


def crictl(node: Node, *args: str) -> list[str]:
    endpoint = f"unix://{node.containerd.cri_socket}"
    config = node.containerd.base_dir / "crictl.yaml"
    config.write_text(f"runtime-endpoint: {endpoint}\nimage-endpoint: {endpoint}\n")
    return [str(component_binary("crictl")), "--config", str(config), "--timeout", "40s", *args]


def basic(user: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode()}


async def mirror_status(node: Node, path: str, headers: dict[str, str] | None = None) -> int:
    status: int = (await trio.to_thread.run_sync(
        lambda: node.spegeld.get(path, method="HEAD", headers=headers)
    ))[0]  # fmt: skip
    return status


async def pull(node: Node, *creds: str) -> tuple[int, str, list[str]]:
    """crictl pull of the private image: exit code, stderr, and what the upstream served
    to containerd (spegeld's own checks, by user agent, left out)."""
    ref = node.upstream.reference(REPO, TAG)
    start = node.upstream.log_position()
    result = await trio.run_process(
        crictl(node, "pull", *creds, ref), capture_stdout=True, capture_stderr=True, check=False
    )
    seen = await trio.to_thread.run_sync(node.upstream.requests, start)
    upstream = [f"{r.method} {r.path} {r.status}" for r in seen if "httpx" not in r.user_agent]
    return result.returncode, result.stderr.decode(), upstream


async def test_the_mirror_listener_challenges_and_checks(node: Node) -> None:
    """Straight HTTP against the mirror: 401 + Basic challenge without credentials, 404 with
    wrong ones, 200 with the right ones (once spegeld has indexed the image)."""
    target = f"/v2/{REPO}/manifests/{TAG}?ns={node.upstream.address}"
    with trio.fail_after(SETUP_TIMEOUT):
        await wait_until_served(node, target)
        assert await mirror_status(node, target) == 401
        assert await mirror_status(node, target, basic(USER, "wrong")) == 404
        assert node.spegeld.metric('spegeld_private_checks_total{result="refused"}') >= 1
        assert node.spegeld.metric('spegeld_private_checks_total{result="accepted"}') >= 1
        # The peer listener does not challenge: peers are nodes (here unkeyed, insecure mode,
        # so it does not check signatures either), and they never hold a pull's credentials.
        async with httpx.AsyncClient(trust_env=False) as http:
            peer = await http.head(f"http://{node.spegeld.peer_address}{target}")
        assert peer.status_code == 200, peer


async def wait_until_served(node: Node, target: str) -> None:
    seen: list[int] = []

    async def poll() -> None:
        seen.append(await mirror_status(node, target, basic(USER, SECRET)))

    for _ in range(int(SETUP_TIMEOUT / 0.2)):
        await poll()
        if seen[-1] == 200:
            return
        await trio.sleep(0.2)
    raise AssertionError(f"the mirror never served {target}: {seen[-5:]}")


async def test_right_credentials_are_served_by_the_mirror(node: Node) -> None:
    with trio.fail_after(CASE_TIMEOUT):
        await wait_until_served(node, f"/v2/{REPO}/manifests/{TAG}?ns={node.upstream.address}")
        served = node.spegeld.metric('spegeld_private_requests_total{decision="served"}')
        code, stderr, upstream = await pull(node, "--creds", f"{USER}:{SECRET}")
        assert code == 0, (stderr, upstream)
        # containerd resolved the tag at the mirror: the upstream saw none of its requests.
        assert upstream == [], upstream
        assert node.spegeld.metric('spegeld_private_requests_total{decision="served"}') > served


@pytest.mark.parametrize("creds", [["--creds", f"{USER}:wrong"], []], ids=["wrong", "none"])
async def test_wrong_or_no_credentials_are_not_served(node: Node, creds: list[str]) -> None:
    """The image is on the node; the pull still fails: the mirror did not serve it, and the
    upstream (where containerd went next) refused."""
    with trio.fail_after(CASE_TIMEOUT):
        code, stderr, upstream = await pull(node, *creds)
        assert code != 0, (stderr, upstream)
        assert f"HEAD /v2/{REPO}/manifests/{TAG} 401" in upstream, upstream
        assert not any(" 200" in line for line in upstream), upstream


async def test_a_public_registry_is_unaffected(node: Node) -> None:
    """No credentials, no challenge: the public image is served by the mirror (its upstream
    is a port nothing listens on)."""
    target = f"/v2/{PUBLIC_REPO}/manifests/{TAG}?ns={PUBLIC_HOST}"
    with trio.fail_after(CASE_TIMEOUT):
        await wait_until(lambda: node.spegeld.get(target, method="HEAD")[0] == 200, 20, target)
        result = await trio.run_process(
            crictl(node, "pull", f"{PUBLIC_HOST}/{PUBLIC_REPO}:{TAG}"),
            capture_stdout=True, capture_stderr=True, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr.decode()


async def test_a_private_digest_is_served_only_under_a_repository_that_holds_it(
    node: Node,
) -> None:
    """The repository binding: credentials accepted for private/app (and cached for it)
    do not fetch private/other's layer under private/app's name; nor does naming another
    registry in ``ns``, on either listener. Without the binding the second request was a
    200: the verdict for (credentials, private/app) is cached after the manifest's check."""
    registry = node.upstream.address
    under_other = f"/v2/{OTHER_REPO}/blobs/{node.other_layer}?ns={registry}"
    under_app = f"/v2/{REPO}/blobs/{node.other_layer}?ns={registry}"
    under_public = f"/v2/{PUBLIC_REPO}/blobs/{node.other_layer}?ns={PUBLIC_HOST}"
    creds = basic(USER, SECRET)
    with trio.fail_after(CASE_TIMEOUT):
        await wait_until_served(node, f"/v2/{REPO}/manifests/{TAG}?ns={registry}")
        await wait_until_served(node, under_other)
        unbound = node.spegeld.metric('spegeld_private_requests_total{decision="unbound"}')
        assert await mirror_status(node, under_app, creds) == 404
        assert await mirror_status(node, under_public) == 404
        async with httpx.AsyncClient(trust_env=False) as http:
            peer = f"http://{node.spegeld.peer_address}"
            assert (await http.head(peer + under_app)).status_code == 404
            assert (await http.head(peer + under_other)).status_code == 200
        after = node.spegeld.metric('spegeld_private_requests_total{decision="unbound"}')
        assert after == unbound + 3
