"""The registry's HTTP surface, served for real on loopback and read with httpx."""

from __future__ import annotations

import hashlib
import json

import httpx
import pytest
import trio
from spegeld_harness import build_image

from spegeld.routing import MemoryCluster, NodeId, StaticRouter
from spegeld.store import MemoryStore

from ._support import image_in_memory, serving_registry

IMAGE = build_image("example.com/team/app:v1", [300_000, 1000], seed=41)
LAYER = IMAGE.platforms[0].layers[0]
LAYER_BYTES = IMAGE.read_blob(LAYER)
MANIFEST = IMAGE.platforms[0].manifest
NOBODY = MemoryCluster().router(NodeId("self"), "127.0.0.1:1")


async def test_manifest_by_tag_and_digest_with_real_headers() -> None:
    with trio.fail_after(10):
        async with serving_registry(image_in_memory(IMAGE), NOBODY) as (_, url):
            async with httpx.AsyncClient(base_url=url) as client:
                by_tag = await client.get("/v2/team/app/manifests/v1?ns=example.com")
                assert by_tag.status_code == 200
                assert by_tag.headers["content-type"] == IMAGE.media_type
                assert by_tag.headers["docker-content-digest"] == IMAGE.digest
                assert by_tag.content == IMAGE.read_blob(IMAGE.digest)
                head = await client.head(f"/v2/team/app/manifests/{MANIFEST}")
                assert head.status_code == 200
                assert head.headers["content-length"] == str(IMAGE.blobs[MANIFEST].size)
                assert head.content == b""


async def test_blob_get_head_and_ranges() -> None:
    with trio.fail_after(10):
        async with serving_registry(image_in_memory(IMAGE), NOBODY) as (_, url):
            async with httpx.AsyncClient(base_url=url) as client:
                path = f"/v2/team/app/blobs/{LAYER}?ns=example.com"
                whole = await client.get(path)
                assert whole.status_code == 200
                assert whole.headers["accept-ranges"] == "bytes"
                assert whole.headers["docker-content-digest"] == LAYER
                assert hashlib.sha256(whole.content).hexdigest() == LAYER.removeprefix("sha256:")
                part = await client.get(path, headers={"range": "bytes=100-199"})
                assert part.status_code == 206
                assert part.headers["content-range"] == f"bytes 100-199/{len(LAYER_BYTES)}"
                assert part.content == LAYER_BYTES[100:200]
                suffix = await client.get(path, headers={"range": "bytes=-10"})
                assert suffix.content == LAYER_BYTES[-10:]
                for bad in ("bytes=999999999-", "bytes=5-2", "lines=1-2", "bytes=1-2,4-5"):
                    refused = await client.get(path, headers={"range": bad})
                    assert refused.status_code == 416, bad
                    assert refused.headers["content-range"] == f"bytes */{len(LAYER_BYTES)}"
                head = await client.head(path)
                assert head.headers["content-length"] == str(len(LAYER_BYTES))


async def test_errors_are_oci_json_and_writes_are_refused() -> None:
    with trio.fail_after(10):
        async with serving_registry(image_in_memory(IMAGE), NOBODY) as (_, url):
            async with httpx.AsyncClient(base_url=url) as client:
                missing = await client.get("/v2/team/app/blobs/sha256:" + "a" * 64)
                assert missing.status_code == 404
                assert missing.json()["errors"][0]["code"] == "BLOB_UNKNOWN"
                no_ns = await client.get("/v2/team/app/manifests/v1")
                assert no_ns.status_code == 404
                assert no_ns.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
                bad_digest = await client.get("/v2/team/app/blobs/sha256:xyz")
                assert bad_digest.json()["errors"][0]["code"] == "DIGEST_INVALID"
                bad_name = await client.get("/v2/Team/App/manifests/v1?ns=example.com")
                assert bad_name.json()["errors"][0]["code"] == "NAME_INVALID"
                for method in ("POST", "PUT", "PATCH", "DELETE"):
                    refused = await client.request(method, "/v2/team/app/blobs/uploads/")
                    assert refused.status_code == 405, method
                    assert refused.json()["errors"][0]["code"] == "UNSUPPORTED"


async def test_service_endpoints() -> None:
    with trio.fail_after(10):
        async with serving_registry(image_in_memory(IMAGE), NOBODY) as (_, url):
            async with httpx.AsyncClient(base_url=url) as client:
                assert (await client.get("/healthz")).status_code == 200
                assert (await client.get("/readyz")).status_code == 200
                base = await client.get("/v2/")
                assert base.headers["docker-distribution-api-version"] == "registry/2.0"
                await client.get("/v2/team/app/manifests/v1?ns=example.com")
                await client.get("/v2/team/app/manifests/v9?ns=example.com")
                metrics = (await client.get("/metrics")).text
                hit = 'spegel_mirror_requests_total{registry="example.com",cache="hit",source="external"} 1'
                miss = 'spegel_mirror_requests_total{registry="example.com",cache="miss",source="external"} 1'
                assert hit in metrics and miss in metrics
                assert json.loads((await client.get("/status")).text) == {"node": "test"}


async def test_mirrored_registries_allowlist() -> None:
    with trio.fail_after(10):
        store = image_in_memory(IMAGE)
        async with serving_registry(store, NOBODY, mirrored_registries=frozenset({"ghcr.io"})) as (
            _,
            url,
        ):
            async with httpx.AsyncClient(base_url=url) as client:
                refused = await client.get("/v2/team/app/manifests/v1?ns=example.com")
                assert refused.status_code == 404


async def test_no_tag_resolution_when_disabled() -> None:
    with trio.fail_after(10):
        async with serving_registry(image_in_memory(IMAGE), NOBODY, resolve_tags=False) as (_, url):
            async with httpx.AsyncClient(base_url=url) as client:
                assert (
                    await client.get("/v2/team/app/manifests/v1?ns=example.com")
                ).status_code == 404
                by_digest = await client.get(f"/v2/team/app/manifests/{IMAGE.digest}")
                assert by_digest.status_code == 200


async def test_a_miss_with_no_holder_is_a_fast_404() -> None:
    with trio.fail_after(10):
        async with serving_registry(MemoryStore(), NOBODY) as (_, url):
            async with httpx.AsyncClient(base_url=url) as client:
                await client.get("/v2/")  # warm the connection
                start = trio.current_time()
                response = await client.get("/v2/team/app/blobs/sha256:" + "b" * 64)
                assert response.status_code == 404
                assert trio.current_time() - start < 0.05


async def test_header_limit_and_keep_alive() -> None:
    with trio.fail_after(10):
        async with serving_registry(MemoryStore(), StaticRouter([])) as (_, url):
            async with httpx.AsyncClient(base_url=url) as client:
                huge = await client.get("/v2/", headers={"x-big": "a" * 40_000})
                assert huge.status_code == 431
                for _ in range(3):
                    assert (await client.get("/healthz")).status_code == 200


async def _raw_status(url: str, request: bytes) -> bytes:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(request)
        reply = b""
        while b"\r\n" not in reply:
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            reply += chunk
    return reply.split(b"\r\n", 1)[0]


async def test_a_head_over_the_limit_is_refused_however_it_arrives() -> None:
    # h11 checks its limit only on an incomplete head: a 20 KB head arriving in one
    # piece completed in the read that crossed the 16 KiB limit, and was served.
    def head(filler: int, version: bytes = b"1.1") -> bytes:
        return (
            b"GET /v2/ HTTP/" + version + b"\r\nHost: x\r\nX-Fill: " + b"a" * filler + b"\r\n\r\n"
        )

    with trio.fail_after(10):
        async with serving_registry(MemoryStore(), StaticRouter([])) as (_, url):
            assert b" 200 " in await _raw_status(url, head(15_000))
            assert b" 431 " in await _raw_status(url, head(20_000))
            assert b" 431 " in await _raw_status(url, head(31_000))
            assert b" 505 " in await _raw_status(url, head(10, b"7.3"))
            assert b" 200 " in await _raw_status(url, head(10, b"1.0"))


@pytest.mark.parametrize("limit", [2])
async def test_idle_connections_are_closed(limit: int) -> None:
    from spegeld.mirror import Limits

    with trio.fail_after(10):
        async with serving_registry(
            MemoryStore(),
            StaticRouter([]),
            limits=Limits(idle_timeout=0.2, loopback_connections=limit),
        ) as (_, url):
            host, port = url.removeprefix("http://").split(":")
            stream = await trio.open_tcp_stream(host, int(port))
            await trio.sleep(0.5)
            assert await stream.receive_some(100) == b"", "the idle connection was closed"
            await stream.aclose()
