"""The Kubernetes API test server is faithful: real kubectl and the real Python client agree.

Every kubectl run and client call goes over TLS to a server started by the test;
each test has a hard deadline.
"""

from __future__ import annotations

import contextlib
import email.utils
import functools
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from .kubeapi import SPEGELD_USER, Account, ApiCore, HttpRequest, KubeAPI, open_kube_api
from .kubeapi._protobuf import ProtobufError
from .kubeapi._protobuf import decode as decode_protobuf

KUBECTL = "/usr/bin/kubectl"
REPO = Path(__file__).resolve().parent.parent
ADMIN_TOKEN = "admin-token-0123456789"
SPEGELD_TOKEN = "spegeld-token-0123456789"
LEASES = "/apis/coordination.k8s.io/v1/namespaces/spegeld/leases"
SSAR = "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"
RENEW = "2026-11-27T06:30:00.123456Z"


def _accounts() -> list[Account]:
    return [Account.admin(ADMIN_TOKEN), Account.lease_holder(SPEGELD_TOKEN)]


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[KubeAPI]:
    async with open_kube_api(tmp_path, accounts=_accounts()) as server:
        yield server
    assert server.core.internal_errors == []


def _lease(name: str = "demo", **spec: Any) -> dict[str, Any]:
    body = {"holderIdentity": "node-a", "leaseDurationSeconds": 15, "renewTime": RENEW}
    body.update(spec)
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": name},
        "spec": body,
    }


def _client(api: KubeAPI, token: str | None = ADMIN_TOKEN) -> httpx.AsyncClient:
    context = ssl.create_default_context(cadata=api.ca_pem.decode())
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(base_url=api.url, verify=context, headers=headers)


async def kubectl(
    api: KubeAPI, tmp_path: Path, token: str, *args: str
) -> subprocess.CompletedProcess[bytes]:
    """kubectl with its own kubeconfig and HOME, so ~/.kube is never read or written."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    config = api.write_kubeconfig(tmp_path / f"kubeconfig-{token[:8]}", token)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "KUBECONFIG": str(config)}
    return await trio.run_process(
        [KUBECTL, "--kubeconfig", str(config), "--request-timeout=10s", *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env=env,
    )


# --- kubectl -------------------------------------------------------------------------


async def test_kubectl_lease_lifecycle(api: KubeAPI, tmp_path: Path) -> None:
    with trio.fail_after(30):
        version = await kubectl(api, tmp_path, ADMIN_TOKEN, "version")
        assert version.returncode == 0, version.stderr
        assert b"Server Version: v1.32.0" in version.stdout

        empty = await kubectl(api, tmp_path, ADMIN_TOKEN, "get", "lease", "-n", "spegeld")
        assert empty.returncode == 0
        assert b"No resources found in spegeld namespace." in empty.stderr

        manifest = tmp_path / "lease.yaml"
        manifest.write_text(
            "apiVersion: coordination.k8s.io/v1\nkind: Lease\nmetadata:\n  name: demo\n  namespace: spegeld\n"
            f"spec:\n  holderIdentity: node-a\n  leaseDurationSeconds: 15\n  renewTime: '{RENEW}'\n"
        )
        created = await kubectl(api, tmp_path, ADMIN_TOKEN, "create", "-f", str(manifest))
        assert created.returncode == 0, created.stderr
        assert created.stdout.strip() == b"lease.coordination.k8s.io/demo created"
        # kubectl asked the server to reject unknown fields itself.
        assert any(r.method == "POST" and r.code == 201 for r in api.requests)

        shown = await kubectl(
            api, tmp_path, ADMIN_TOKEN, "get", "lease", "demo", "-n", "spegeld", "-o", "json"
        )
        assert shown.returncode == 0, shown.stderr
        lease = json.loads(shown.stdout)
        stored = api.leases[("spegeld", "demo")]
        assert lease["metadata"]["resourceVersion"] == stored["metadata"]["resourceVersion"]
        assert lease["metadata"]["uid"] == stored["metadata"]["uid"]
        assert lease["spec"] == {
            "holderIdentity": "node-a",
            "leaseDurationSeconds": 15,
            "renewTime": RENEW,
        }

        table = await kubectl(api, tmp_path, ADMIN_TOKEN, "get", "lease", "-n", "spegeld")
        assert table.stdout.split(b"\n")[0].split() == [b"NAME", b"HOLDER", b"AGE"]
        assert table.stdout.split(b"\n")[1].split()[:2] == [b"demo", b"node-a"]

        again = await kubectl(api, tmp_path, ADMIN_TOKEN, "create", "-f", str(manifest))
        assert again.returncode == 1
        assert b'Error from server (AlreadyExists): error when creating "' in again.stderr
        assert b'leases.coordination.k8s.io "demo" already exists' in again.stderr

        deleted = await kubectl(
            api, tmp_path, ADMIN_TOKEN, "delete", "lease", "demo", "-n", "spegeld"
        )
        assert deleted.returncode == 0, deleted.stderr
        assert deleted.stdout.strip() == b'lease.coordination.k8s.io "demo" deleted'
        assert api.leases == {}

        gone = await kubectl(api, tmp_path, ADMIN_TOKEN, "get", "lease", "demo", "-n", "spegeld")
        assert gone.returncode == 1
        assert (
            gone.stderr.strip()
            == b'Error from server (NotFound): leases.coordination.k8s.io "demo" not found'
        )


async def test_kubectl_can_i_follows_the_grant_table(api: KubeAPI, tmp_path: Path) -> None:
    with trio.fail_after(30):

        async def can_i(*args: str) -> bytes:
            result = await kubectl(api, tmp_path, SPEGELD_TOKEN, "auth", "can-i", *args)
            assert result.returncode == (0 if result.stdout.strip() == b"yes" else 1), result.stderr
            return result.stdout.strip()

        assert await can_i("update", "leases", "-n", "spegeld") == b"yes"
        assert await can_i("get", "leases.coordination.k8s.io", "-n", "spegeld") == b"yes"
        assert await can_i("delete", "leases", "-n", "spegeld") == b"no"
        assert await can_i("update", "leases", "-n", "default") == b"no"
        api.grant(SPEGELD_TOKEN, "leases", "spegeld", "delete")
        assert await can_i("delete", "leases", "-n", "spegeld") == b"yes"
        api.deny(SPEGELD_TOKEN, "leases", "spegeld", "update")
        assert await can_i("update", "leases", "-n", "spegeld") == b"no"


async def test_kubectl_unauthorized_and_forbidden(api: KubeAPI, tmp_path: Path) -> None:
    with trio.fail_after(30):
        listed = await kubectl(api, tmp_path, SPEGELD_TOKEN, "get", "lease", "-n", "spegeld")
        assert listed.returncode == 1
        assert listed.stderr.strip().endswith(
            b'Error from server (Forbidden): leases.coordination.k8s.io is forbidden: User "'
            + SPEGELD_USER.encode()
            + b'" cannot list resource "leases" in API group "coordination.k8s.io" in the namespace "spegeld"'
        )
        deleted = await kubectl(
            api, tmp_path, SPEGELD_TOKEN, "delete", "lease", "x", "-n", "spegeld"
        )
        assert deleted.returncode == 1
        assert (
            b'Error from server (Forbidden): leases.coordination.k8s.io "x" is forbidden: User '
            b'"system:serviceaccount:spegeld:spegeld" cannot delete resource "leases" in API group '
            b'"coordination.k8s.io" in the namespace "spegeld"'
        ) in deleted.stderr

        api.revoke(SPEGELD_TOKEN)
        revoked = await kubectl(api, tmp_path, SPEGELD_TOKEN, "get", "lease", "x", "-n", "spegeld")
        assert revoked.returncode == 1
        assert b"error: You must be logged in to the server (Unauthorized)" in revoked.stderr
        assert api.requests[-1].code == 401


@pytest.mark.parametrize(
    ("cert", "message"),
    [
        ("other-ca", b"x509: certificate signed by unknown authority"),
        ("expired", b"x509: certificate has expired"),
    ],
)
async def test_kubectl_rejects_bad_server_certificates(
    tmp_path: Path, cert: Any, message: bytes
) -> None:
    with trio.fail_after(20):
        async with open_kube_api(accounts=_accounts(), cert=cert) as api:
            result = await kubectl(api, tmp_path, ADMIN_TOKEN, "get", "lease", "-n", "spegeld")
            assert result.returncode == 1
            assert message in result.stderr
            assert api.requests == []  # nothing got past the TLS handshake


# --- the official Python client --------------------------------------------------------


def _python_client_session(url: str, ca_file: str, token: str) -> dict[str, Any]:
    """Runs in a worker thread: the kubernetes client is synchronous."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    config = client.Configuration()
    config.host = url
    config.ssl_ca_cert = ca_file
    config.api_key = {"authorization": token}
    config.api_key_prefix = {"authorization": "Bearer"}
    seen: dict[str, Any] = {}
    with client.ApiClient(config) as api_client:
        leases = client.CoordinationV1Api(api_client)
        body = client.V1Lease(
            metadata=client.V1ObjectMeta(name="leader"),
            spec=client.V1LeaseSpec(holder_identity="node-a", lease_duration_seconds=15),
        )
        created = leases.create_namespaced_lease("spegeld", body)
        seen["created_rv"] = created.metadata.resource_version
        first = leases.read_namespaced_lease("leader", "spegeld")
        seen["read_holder"] = first.spec.holder_identity
        first.spec.holder_identity = "node-b"
        replaced = leases.replace_namespaced_lease("leader", "spegeld", first)
        seen["replaced_rv"] = replaced.metadata.resource_version
        first.spec.holder_identity = "node-c"  # still carries the old resourceVersion
        try:
            leases.replace_namespaced_lease("leader", "spegeld", first)
        except ApiException as exc:
            seen["stale"] = (exc.status, json.loads(exc.body))
        try:
            leases.read_namespaced_lease("nope", "spegeld")
        except ApiException as exc:
            seen["missing"] = (exc.status, json.loads(exc.body))
        # The generated client declares `object` for delete: the Status arrives as a dict.
        seen["deleted"] = leases.delete_namespaced_lease("leader", "spegeld")["status"]
        review = client.AuthorizationV1Api(api_client).create_self_subject_access_review(
            client.V1SelfSubjectAccessReview(
                spec=client.V1SelfSubjectAccessReviewSpec(
                    resource_attributes=client.V1ResourceAttributes(
                        namespace="spegeld",
                        verb="update",
                        group="coordination.k8s.io",
                        resource="leases",
                    )
                )
            )
        )
        seen["can_update"] = review.status.allowed
        review.spec.resource_attributes.verb = "list"
        seen["can_list"] = (
            client.AuthorizationV1Api(api_client)
            .create_self_subject_access_review(review)
            .status.allowed
        )
    return seen


async def test_python_client_round_trip(api: KubeAPI, tmp_path: Path) -> None:
    ca_file = str(api.write_ca(tmp_path / "ca.pem"))
    api.grant(SPEGELD_TOKEN, "leases", "spegeld", "delete")
    with trio.fail_after(20):
        seen = await trio.to_thread.run_sync(
            _python_client_session, api.url, ca_file, SPEGELD_TOKEN
        )
    assert seen["read_holder"] == "node-a"
    assert int(seen["replaced_rv"]) > int(seen["created_rv"])
    status, body = seen["stale"]
    assert status == 409
    assert body["reason"] == "Conflict"
    assert body["message"] == (
        'Operation cannot be fulfilled on leases.coordination.k8s.io "leader": the object has been '
        "modified; please apply your changes to the latest version and try again"
    )
    assert seen["missing"] == (
        404,
        {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": 'leases.coordination.k8s.io "nope" not found',
            "reason": "NotFound",
            "details": {"name": "nope", "group": "coordination.k8s.io", "kind": "leases"},
            "code": 404,
        },
    )
    assert seen["deleted"] == "Success"
    assert (seen["can_update"], seen["can_list"]) == (True, False)
    assert api.leases == {}


# --- strictness, over raw HTTP ---------------------------------------------------------


@pytest.mark.parametrize(
    ("mutate", "code", "fragment"),
    [
        (
            lambda b: b["spec"].update(renewTime="2026-11-27T06:30:00Z"),
            400,
            'cannot parse "Z" as ".000000"',
        ),
        (
            lambda b: b["spec"].update(renewTime="2026-11-27T06:30:00.123Z"),
            400,
            'cannot parse ".123Z" as ".000000"',
        ),
        (
            lambda b: b["spec"].update(acquireTime="2026-11-27 06:30:00.123456Z"),
            400,
            'cannot parse " 06:30',
        ),
        (
            lambda b: b.update(kind="Pod"),
            400,
            'no kind "Pod" is registered for version "coordination.k8s.io/v1"',
        ),
        (
            lambda b: b.update(apiVersion="v1"),
            400,
            "the API version in the data (v1) does not match",
        ),
        (
            lambda b: b["spec"].update(leaseDurationSeconds="15"),
            400,
            "cannot unmarshal string into Go struct field",
        ),
        (lambda b: b["spec"].update(leaseDurationSeconds=15.5), 400, "cannot unmarshal number"),
        (lambda b: b["spec"].update(leaseDurationSeconds=2**31), 400, "is not a 'int32'"),
        (
            lambda b: b["spec"].update(holder="x"),
            400,
            'strict decoding error: unknown field "spec.holder"',
        ),
        (
            lambda b: b["spec"].update(leaseDurationSeconds=0),
            422,
            "spec.leaseDurationSeconds: Invalid value: 0: must be greater than 0",
        ),
        (
            lambda b: b["metadata"].update(name="Bad_Name"),
            422,
            'metadata.name: Invalid value: "Bad_Name": a lowercase RFC 1123 subdomain',
        ),
        (
            lambda b: b.update(metadata={}),
            422,
            "metadata.name: Required value: name or generateName is required",
        ),
    ],
)
async def test_bad_lease_bodies_are_rejected(
    api: KubeAPI, mutate: Any, code: int, fragment: str
) -> None:
    body = _lease()
    mutate(body)
    with trio.fail_after(10):
        async with _client(api) as http:
            response = await http.post(LEASES, json=body)
    status = response.json()
    assert (response.status_code, response.headers["content-type"]) == (code, "application/json")
    assert status["kind"] == "Status" and status["status"] == "Failure" and status["code"] == code
    assert status["reason"] == {400: "BadRequest", 422: "Invalid"}[code]
    assert fragment in status["message"]
    assert api.leases == {}


async def test_unparseable_json_and_media_types(api: KubeAPI) -> None:
    with trio.fail_after(10):
        async with _client(api) as http:
            bad = await http.post(
                LEASES, content=b'{"kind": "Lease",', headers={"Content-Type": "application/json"}
            )
            assert bad.status_code == 400
            assert bad.json()["message"].startswith("couldn't get version/kind; json parse error: ")
            yaml_body = await http.post(
                LEASES, content=b"kind: Lease", headers={"Content-Type": "application/yaml"}
            )
            assert yaml_body.status_code == 415
            warned = await http.post(LEASES + "?fieldValidation=Warn", json=_lease(extra=1))
            assert warned.status_code == 201
            assert warned.headers["warning"] == '299 - "unknown field \\"spec.extra\\""'
            assert "extra" not in warned.json()["spec"]


async def test_create_update_delete_semantics(api: KubeAPI) -> None:
    with trio.fail_after(10):
        async with _client(api) as http:
            dry = await http.post(LEASES + "?dryRun=All", json=_lease())
            assert dry.status_code == 201 and dry.json()["metadata"]["uid"]
            assert api.leases == {}

            created = (
                await http.post(LEASES, json=_lease(renewTime="2026-11-27T07:30:00.123456+01:00"))
            ).json()
            meta = created["metadata"]
            assert (meta["namespace"], meta["name"]) == ("spegeld", "demo")
            assert created["spec"]["renewTime"] == RENEW  # re-encoded in UTC
            assert set(meta) == {"name", "namespace", "uid", "resourceVersion", "creationTimestamp"}

            missing_rv = _lease(holderIdentity="node-b")
            no_rv = await http.put(f"{LEASES}/demo", json=missing_rv)
            assert no_rv.status_code == 422
            assert no_rv.json()["message"] == (
                'leases.coordination.k8s.io "demo" is invalid: metadata.resourceVersion: '
                "Invalid value: 0x0: must be specified for an update"
            )

            update = _lease(holderIdentity="node-b")
            update["metadata"]["resourceVersion"] = meta["resourceVersion"]
            same = dict(created)
            noop = await http.put(f"{LEASES}/demo", json=same)
            assert noop.json()["metadata"]["resourceVersion"] == meta["resourceVersion"]

            dry_put = await http.put(f"{LEASES}/demo?dryRun=All", json=update)
            assert (
                dry_put.status_code == 200 and dry_put.json()["spec"]["holderIdentity"] == "node-b"
            )
            assert api.leases[("spegeld", "demo")]["spec"]["holderIdentity"] == "node-a"

            updated = await http.put(f"{LEASES}/demo", json=update)
            assert updated.status_code == 200
            new_rv = updated.json()["metadata"]["resourceVersion"]
            assert int(new_rv) > int(meta["resourceVersion"])
            assert updated.json()["metadata"]["uid"] == meta["uid"]

            stale = await http.put(f"{LEASES}/demo", json=update)
            assert stale.status_code == 409 and stale.json()["reason"] == "Conflict"

            renamed = await http.put(f"{LEASES}/other", json=update)
            assert renamed.status_code == 400
            assert (
                renamed.json()["message"]
                == "the name of the object (demo) does not match the name on the URL (other)"
            )

            # Leases allow create on update.
            upsert = await http.put(f"{LEASES}/fresh", json=_lease("fresh"))
            assert upsert.status_code == 201
            assert int(upsert.json()["metadata"]["resourceVersion"]) > int(new_rv)

            precondition = {
                "kind": "DeleteOptions",
                "apiVersion": "v1",
                "preconditions": {"resourceVersion": "1"},
            }
            refused = await http.request("DELETE", f"{LEASES}/demo", json=precondition)
            assert refused.status_code == 409
            assert (
                "Precondition failed: ResourceVersion in precondition: 1"
                in refused.json()["message"]
            )
            removed = await http.delete(f"{LEASES}/demo")
            assert removed.status_code == 200 and removed.json()["status"] == "Success"
            again = await http.delete(f"{LEASES}/demo")
            assert again.status_code == 404
            assert set(api.leases) == {("spegeld", "fresh")}


async def test_missing_namespace(api: KubeAPI) -> None:
    other = "/apis/coordination.k8s.io/v1/namespaces/nowhere/leases"
    with trio.fail_after(10):
        async with _client(api) as http:
            created = await http.post(other, json=_lease())
            got = await http.get(other + "/demo")
            listed = await http.get(other)
    assert created.status_code == 404
    assert created.json()["message"] == 'namespaces "nowhere" not found'
    assert created.json()["details"] == {"name": "nowhere", "kind": "namespaces"}
    assert got.status_code == 404
    assert got.json()["details"] == {
        "name": "demo",
        "group": "coordination.k8s.io",
        "kind": "leases",
    }
    assert listed.status_code == 200 and listed.json()["items"] == []


async def test_concurrent_updates_from_one_version(api: KubeAPI) -> None:
    codes: list[int] = []
    with trio.fail_after(10):
        async with _client(api) as http:
            created = (await http.post(LEASES, json=_lease())).json()

            async def renew(holder: str) -> None:
                body = _lease(holderIdentity=holder)
                body["metadata"]["resourceVersion"] = created["metadata"]["resourceVersion"]
                codes.append((await http.put(f"{LEASES}/demo", json=body)).status_code)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(renew, "node-b")
                nursery.start_soon(renew, "node-c")
    assert sorted(codes) == [200, 409]


async def test_authentication_and_authorization(api: KubeAPI) -> None:
    with trio.fail_after(10):
        async with (
            _client(api, token=None) as anonymous,
            _client(api, "wrong") as wrong,
            _client(api, SPEGELD_TOKEN) as sa,
        ):
            assert (await anonymous.get("/version")).status_code == 200
            missing = await anonymous.get(LEASES + "/demo")
            assert missing.status_code == 401
            assert missing.json() == {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": "Unauthorized",
                "reason": "Unauthorized",
                "code": 401,
            }
            assert (await wrong.get("/version")).status_code == 401
            assert (await sa.post(LEASES, json=_lease())).status_code == 201
            denied = await sa.delete(LEASES + "/demo")
            assert denied.status_code == 403
            assert denied.json()["details"] == {
                "name": "demo",
                "group": "coordination.k8s.io",
                "kind": "leases",
            }
            # Creating through PUT also needs "create".
            api.deny(SPEGELD_TOKEN, "leases", "spegeld", "create")
            upsert = await sa.put(LEASES + "/fresh", json=_lease("fresh"))
            assert upsert.status_code == 403
            assert "cannot create resource" in upsert.json()["message"]
            review = {
                "apiVersion": "authorization.k8s.io/v1",
                "kind": "SelfSubjectAccessReview",
                "spec": {
                    "resourceAttributes": {
                        "namespace": "spegeld",
                        "verb": "create",
                        "group": "coordination.k8s.io",
                        "resource": "leases",
                    }
                },
            }
            answer = await sa.post(SSAR, json=review)
            assert answer.status_code == 201 and answer.json()["status"] == {"allowed": False}
            empty = await sa.post(SSAR, json={"kind": "SelfSubjectAccessReview", "spec": {}})
            assert empty.status_code == 422
            api.revoke(SPEGELD_TOKEN)
            assert (await sa.get(LEASES + "/demo")).status_code == 401
    assert [r.user for r in api.requests][:2] == ["", ""]


async def test_health_clock_and_unknown_paths(api: KubeAPI) -> None:
    with trio.fail_after(10):
        async with _client(api) as http:
            ready = await http.get("/readyz")
            assert (ready.status_code, ready.text) == (200, "ok")
            api.set_ready(False)
            unready = await http.get("/readyz")
            assert unready.status_code == 500 and "readyz check failed" in unready.text
            assert (await http.get("/livez")).status_code == 200
            api.set_ready(True)

            skew = email.utils.parsedate_to_datetime(
                (await http.get("/version")).headers["date"]
            ).timestamp()
            assert abs(skew - time.time()) < 5
            api.clock_offset = 600
            skewed = email.utils.parsedate_to_datetime(
                (await http.get("/version")).headers["date"]
            ).timestamp()
            assert 595 < skewed - time.time() < 605
            created = (await http.post(LEASES, json=_lease())).json()["metadata"][
                "creationTimestamp"
            ]
            assert (
                created[:15] == time.strftime("%Y-%m-%dT%H:%M", time.gmtime(time.time() + 600))[:15]
            )

            page = await http.get("/nothing/here")
            assert (page.status_code, page.text) == (404, "404 page not found\n")
            resource = await http.get("/apis/coordination.k8s.io/v1/namespaces/spegeld/widgets")
            assert resource.status_code == 404
            assert resource.json()["message"] == "the server could not find the requested resource"
            patch = await http.patch(LEASES + "/demo", json={})
            assert patch.status_code == 405 and patch.json()["kind"] == "Status"
    info = (await _fresh_version(api)).json()
    assert (info["major"], info["minor"], info["gitVersion"]) == ("1", "32", "v1.32.0")
    assert sum(1 for r in api.requests if r.path == "/version") == 3


async def _fresh_version(api: KubeAPI) -> httpx.Response:
    with trio.fail_after(10):
        async with _client(api) as http:
            return await http.get("/version")


async def test_keep_alive_serves_many_requests_on_one_connection(api: KubeAPI) -> None:
    with trio.fail_after(10):
        async with _client(api) as http:
            for _ in range(20):
                assert (await http.get(LEASES)).status_code == 200
            # httpx pools one connection per origin: all 20 went over it.
            pool = http._transport._pool  # type: ignore[attr-defined]
            assert len(pool.connections) == 1


# --- the subprocess variant -----------------------------------------------------------


async def test_subprocess_server(tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = tmp_path / "accounts.json"
    config.write_text(
        json.dumps({"namespaces": ["spegeld"], "accounts": [a.to_json() for a in _accounts()]})
    )
    command = [
        sys.executable,
        "-m",
        "tests.kubeapi",
        "--listen",
        "127.0.0.1:0",
        "--state-dir",
        str(state),
    ]
    command += ["--config", str(config), "--clock-offset", "-600"]
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            process = await nursery.start(
                functools.partial(trio.run_process, command, cwd=REPO, check=False)
            )
            try:
                while not (state / "ready").exists():
                    await trio.sleep(0.05)
                url = (state / "ready").read_text().strip()
                kubeconfig = state / f"kubeconfig-{SPEGELD_USER.replace(':', '_')}"
                assert kubeconfig.stat().st_mode & 0o077 == 0
                env = {
                    "PATH": "/usr/bin:/bin",
                    "HOME": str(tmp_path),
                    "KUBECONFIG": str(kubeconfig),
                }
                result = await trio.run_process(
                    [KUBECTL, "auth", "can-i", "update", "leases", "-n", "spegeld"],
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                    env=env,
                )
                assert result.stdout.strip() == b"yes", result.stderr
                context = ssl.create_default_context(cafile=str(state / "ca.pem"))
                async with httpx.AsyncClient(base_url=url, verify=context) as http:
                    date = email.utils.parsedate_to_datetime(
                        (await http.get("/version")).headers["date"]
                    ).timestamp()
                    assert -605 < date - time.time() < -595
                    os.kill(process.pid, signal.SIGUSR1)
                    for _ in range(100):
                        if (await http.get("/readyz")).status_code == 500:
                            break
                        await trio.sleep(0.02)
                    else:
                        raise AssertionError("SIGUSR1 did not make /readyz fail")
                lines = [
                    json.loads(line) for line in (state / "requests.jsonl").read_text().splitlines()
                ]
                assert {"method": "POST", "path": SSAR, "code": 201, "user": SPEGELD_USER} in [
                    {k: v for k, v in line.items() if k != "at"} for line in lines
                ]
            finally:
                process.send_signal(signal.SIGTERM)
    assert process.returncode == 0


# --- hostile input, sans-I/O -----------------------------------------------------------

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=20,
)
_lease_like = st.fixed_dictionaries(
    {},
    optional={
        "apiVersion": st.sampled_from(["coordination.k8s.io/v1", "v1", ""]) | _json_values,
        "kind": st.sampled_from(["Lease", "Pod"]) | _json_values,
        "metadata": st.fixed_dictionaries(
            {},
            optional={
                "name": st.sampled_from(["a", "B", ""]) | _json_values,
                "resourceVersion": _json_values,
            },
        )
        | _json_values,
        "spec": st.dictionaries(
            st.sampled_from(
                ["holderIdentity", "leaseDurationSeconds", "renewTime", "acquireTime", "x"]
            ),
            _json_values,
            max_size=4,
        )
        | _json_values,
    },
)


@settings(max_examples=300, deadline=None)
@given(
    method=st.sampled_from(["POST", "PUT", "DELETE"]),
    body=_lease_like | _json_values,
)
def test_any_body_gets_a_status_answer(method: str, body: Any) -> None:
    core = ApiCore(accounts=_accounts(), namespaces={"spegeld"}, wall_clock=lambda: 1_800_000_000.0)
    target = LEASES if method == "POST" else LEASES + "/a"
    headers = {"authorization": f"Bearer {ADMIN_TOKEN}", "content-type": "application/json"}
    response = core.handle(HttpRequest(method, target, headers, json.dumps(body).encode()))
    assert core.internal_errors == []
    answer = json.loads(response.body)
    if response.status >= 400:
        assert answer["kind"] == "Status" and answer["code"] == response.status
        assert response.status in (400, 404, 409, 422, 500)
    else:
        assert answer["kind"] in ("Lease", "Status")


@given(st.binary(max_size=200).map(lambda b: b"k8s\x00" + b) | st.binary(max_size=200))
def test_protobuf_decoder_only_raises_its_own_error(data: bytes) -> None:
    with contextlib.suppress(ProtobufError):
        decode_protobuf(data)
