"""Do a kubelet's pull credentials reach a mirror that answers ``401`` with a challenge?

The experiment behind docs/security.md, "Private images and pull credentials", on the real
node path: a private containerd with CRI on (Debian's 1.6 and the built 2.3), its registry
``config_path`` at the hosts dir the real ``spegeld configure containerd`` wrote, a real
Distribution as the image's registry, and ``crictl pull --creds user:secret`` or
``--auth <base64>``: the same ``AuthConfig`` the kubelet sends (username and password, no
``server_address``; kubelet's keyring never sets one).

The mirror is a stand-in, a small recording HTTP server written here: the point is to see
exactly what containerd sends to a mirror, header by header, and spegeld's mirror neither
challenges nor records headers.  It answers every ``/v2/`` request that carries no
``Authorization`` with ``401`` and a ``WWW-Authenticate`` challenge (``Basic`` or ``Bearer``
with a realm on itself), and an authorized one with ``404`` (a miss, as spegeld answers one),
so containerd goes on to the upstream.  Its token endpoint records what it receives, answers
the OAuth2 ``POST`` with ``404`` (as GCR does) so that containerd also shows its ``GET``
form, and answers the ``GET`` with a token.

Found, identically on 1.6.20 and 2.3.7 (CRI on 2.3 through the transfer service): the
credentials given for the upstream reach the mirror, as ``Authorization: Basic`` on every
retried request after a Basic challenge, or as an OAuth2 password grant and a Basic ``GET``
at a Bearer challenge's realm; after the mirror's ``404`` the pull goes on to the upstream.
Why, in containerd's source: docs/security.md.
"""

from __future__ import annotations

import base64
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import h11
import pytest
import trio
from spegeld_harness import PrivateContainerd, UpstreamRegistry, build_image

from tests._components import component_binary, component_dir

from ._support import configure_hosts

pytestmark = [pytest.mark.containerd, pytest.mark.slow]

IMAGE = build_image("example.com/private/app:v1", [4_000], seed=131)
USER, SECRET = "puller", "s3cret-for-upstream"
TOKEN = "mirror-issued-token"
CASE_TIMEOUT = 60.0  # seconds for one pull and its records; a pull here takes under 2 s
CRICTL_TIMEOUT = 45.0  # seconds for crictl itself, inside CASE_TIMEOUT
READ_TIMEOUT = 5.0  # seconds the stand-in waits for one request's head and body
MAX_REQUEST = 64 * 1024  # bytes; containerd's requests here are a few hundred


@dataclass(frozen=True, slots=True)
class Seen:
    """One request the stand-in received."""

    method: str
    target: str
    headers: dict[str, str]
    body: bytes

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    def basic(self) -> tuple[str, str] | None:
        """The ``Basic`` credentials of its ``Authorization`` header, if any."""
        value = self.headers.get("authorization", "")
        if not value.startswith("Basic "):
            return None
        user, _, secret = base64.b64decode(value.removeprefix("Basic ")).decode().partition(":")
        return user, secret


@dataclass(slots=True)
class RecordingMirror:
    """The stand-in mirror (see the module docstring); ``challenge`` is ``basic``/``bearer``."""

    challenge: str
    port: int = 0
    seen: list[Seen] = field(default_factory=list)

    @property
    def v2(self) -> list[Seen]:
        return [s for s in self.seen if s.path.startswith("/v2/")]

    @property
    def token(self) -> list[Seen]:
        return [s for s in self.seen if s.path == "/token"]

    def _answer(self, request: Seen) -> tuple[int, list[tuple[str, str]], bytes]:
        if request.path == "/token":
            if request.method == "POST":
                return 404, [], b"no OAuth2 here"
            body = json.dumps({"token": TOKEN, "expires_in": 300}).encode()
            return 200, [("Content-Type", "application/json")], body
        if "authorization" not in request.headers:
            if self.challenge == "basic":
                value = 'Basic realm="spegeld-test"'
            else:
                repo = request.path.removeprefix("/v2/").rsplit("/", 2)[0]
                value = (f'Bearer realm="http://127.0.0.1:{self.port}/token",'
                         f'service="spegeld-test",scope="repository:{repo}:pull"')  # fmt: skip
            error = {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]}
            headers = [("WWW-Authenticate", value), ("Content-Type", "application/json")]
            return 401, headers, json.dumps(error).encode()
        error = {"errors": [{"code": "MANIFEST_UNKNOWN", "message": "not on this node"}]}
        return 404, [("Content-Type", "application/json")], json.dumps(error).encode()

    async def _serve(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST)
        head: h11.Request | None = None
        body = b""
        with trio.move_on_after(READ_TIMEOUT):
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(MAX_REQUEST))
                elif isinstance(event, h11.Request):
                    head = event
                elif isinstance(event, h11.Data):
                    body += bytes(event.data)
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    break
        if head is None:
            await stream.aclose()
            return
        request = Seen(
            head.method.decode(),
            head.target.decode(),
            {k.decode().lower(): v.decode() for k, v in head.headers},
            body,
        )
        self.seen.append(request)
        status, headers, payload = self._answer(request)
        headers = [*headers, ("Content-Length", str(len(payload))), ("Connection", "close")]
        data = conn.send(h11.Response(status_code=status, headers=headers)) or b""
        if request.method != "HEAD":
            data += conn.send(h11.Data(data=payload)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        await stream.send_all(data)
        await stream.aclose()

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started(self.port)
            await trio.serve_listeners(self._serve, listeners, handler_nursery=nursery)


@dataclass(frozen=True, slots=True)
class Node:
    containerd: PrivateContainerd
    upstream: UpstreamRegistry
    version: str


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
    """One CRI containerd and one upstream per version, shared by every case (each case pulls
    its own repository, so each starts with a fresh manifest resolution)."""
    base = tmp_path_factory.mktemp(f"cri-creds-{request.param}")
    bin_dir = None if request.param == "1.6" else component_dir("containerd")
    containerd = PrivateContainerd(base / "containerd", bin_dir=bin_dir, cri=True)
    upstream = UpstreamRegistry(base / "upstream")
    try:
        containerd.start()
        upstream.start()
        yield Node(containerd, upstream, containerd.version)
    finally:
        containerd.close()
        upstream.close()


def crictl_argv(node: PrivateContainerd, *args: str) -> list[str]:
    endpoint = f"unix://{node.cri_socket}"
    config = node.base_dir / "crictl.yaml"  # crictl warns when it finds none
    config.write_text(f"runtime-endpoint: {endpoint}\nimage-endpoint: {endpoint}\n")
    return [str(component_binary("crictl")), "--config", str(config), "--timeout", "40s", *args]


CREDENTIAL_FORMS = {
    "creds": ["--creds", f"{USER}:{SECRET}"],
    "auth": ["--auth", base64.b64encode(f"{USER}:{SECRET}".encode()).decode()],
    "none": [],
}


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one pull showed, in the terms of the findings table in docs/security.md."""

    mirror_basic: set[tuple[str, str]]  # Basic credentials on the mirror's /v2/ requests
    mirror_bearer: set[str]  # Bearer tokens on them
    token_post: list[dict[str, list[str]]]  # the OAuth2 forms the token endpoint received
    token_get_basic: list[tuple[str, str] | None]  # the token GETs' Basic credentials
    upstream_paths: list[str]  # what the upstream served afterwards (the fallback)
    mirror_log: list[str]  # each /v2/ request: method, object kind, authorization scheme


async def pull_through(node: Node, tmp_path: Path, challenge: str, form: str) -> Outcome:
    """Push a fresh image (its own repository and layer, so every pull fetches blobs), pull
    it with crictl through a stand-in mirror that challenges, and collect what arrived."""
    repository = f"private/{challenge}-{form}"
    seed = zlib.crc32(repository.encode())
    image = await trio.to_thread.run_sync(
        lambda: build_image(f"example.com/{repository}:v1", [4_000], seed=seed, workdir=tmp_path)
    )
    ref = await trio.to_thread.run_sync(node.upstream.push, image, repository, "v1")
    mirror = RecordingMirror(challenge)
    with trio.fail_after(CASE_TIMEOUT):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(mirror.run)
            await trio.to_thread.run_sync(
                configure_hosts, node.containerd.hosts_dir, f"http://127.0.0.1:{port}",
                node.upstream.url,
            )  # fmt: skip
            start = node.upstream.log_position()
            with trio.fail_after(CRICTL_TIMEOUT):
                result = await trio.run_process(
                    crictl_argv(node.containerd, "pull", *CREDENTIAL_FORMS[form], ref),
                    capture_stdout=True, capture_stderr=True, check=False,
                )  # fmt: skip
            nursery.cancel_scope.cancel()
        upstream_seen = await trio.to_thread.run_sync(node.upstream.requests, start)
    assert result.returncode == 0, (result.stderr.decode(), node.containerd.log_tail())
    v2 = mirror.v2
    assert v2, "containerd never asked the mirror"
    return Outcome(
        mirror_basic={b for s in v2 if (b := s.basic()) is not None},
        mirror_bearer={
            s.headers["authorization"].removeprefix("Bearer ")
            for s in v2
            if s.headers.get("authorization", "").startswith("Bearer ")
        },
        token_post=[parse_qs(s.body.decode()) for s in mirror.token if s.method == "POST"],
        token_get_basic=[s.basic() for s in mirror.token if s.method == "GET"],
        upstream_paths=[f"{r.method} {r.path}" for r in upstream_seen if r.status == 200],
        mirror_log=[
            f"{s.method} {s.path.split('/')[-2]} {s.headers.get('authorization', '-').split()[0]}"
            for s in v2
        ],
    )


@pytest.mark.parametrize("form", list(CREDENTIAL_FORMS))
@pytest.mark.parametrize("challenge", ["basic", "bearer"])
async def test_what_a_challenging_mirror_receives(
    node: Node, tmp_path: Path, challenge: str, form: str
) -> None:
    outcome = await pull_through(node, tmp_path, challenge, form)
    repository = f"private/{challenge}-{form}"
    creds = {(USER, SECRET)} if form != "none" else set()
    # The pull went on to the upstream after the mirror's 404 (or unanswered challenge).
    assert f"HEAD /v2/{repository}/manifests/v1" in outcome.upstream_paths, outcome
    assert sum("/blobs/" in p for p in outcome.upstream_paths) == 2, outcome  # config, layer
    # The mirror is asked first for every object (resolve, manifest, each blob); a challenge
    # answered with credentials or a token is retried there once, then the 404 sends
    # containerd on.  With Basic and none to give, containerd goes on at once.
    answered = "-" if challenge == "basic" and not creds else challenge.capitalize()
    assert outcome.mirror_log == (
        ["HEAD manifests -", "GET manifests -", "GET blobs -", "GET blobs -"]
        if answered == "-"
        else ["HEAD manifests -", f"HEAD manifests {answered}", "GET manifests -",
              f"GET manifests {answered}", f"GET blobs {answered}", f"GET blobs {answered}"]
    ), outcome  # fmt: skip
    if challenge == "basic":
        # The credentials given for the upstream host, as they are, to the mirror's host.
        assert outcome.mirror_basic == creds, outcome
        assert not outcome.mirror_bearer and not outcome.token_post, outcome
        assert not outcome.token_get_basic, outcome
    else:
        scope = f"repository:{repository}:pull"
        if creds:
            # An OAuth2 password grant to the mirror's realm first, then (after its 404) a
            # GET with the same credentials as Basic; one round for the resolve, one for
            # the fetch (each has its own authorizer).
            assert outcome.token_post, outcome
            for post in outcome.token_post:
                assert post["username"] == [USER] and post["password"] == [SECRET], post
                assert post["grant_type"] == ["password"] and post["scope"] == [scope], post
            assert len(outcome.token_get_basic) == len(outcome.token_post), outcome
            assert set(outcome.token_get_basic) == {(USER, SECRET)}, outcome
        else:
            assert not outcome.token_post and outcome.token_get_basic, outcome
            assert set(outcome.token_get_basic) == {None}, outcome
        # Either way the mirror then sees the token its own realm issued, never the secret.
        assert outcome.mirror_bearer == {TOKEN} and not outcome.mirror_basic, outcome
