"""Spegel's http_* metrics, the per-registry advertised gauges and the process metrics,
from a real MirrorServer on loopback sockets (in-process: the exposition is read back
with the strict parser of tests/test_metrics.py)."""

from __future__ import annotations

import math
import os
import resource
import time

import trio
from spegeld_harness import build_image

from spegeld.metrics import MetricsRegistry
from spegeld.mirror._http import HttpServer, Limits, Request, Response
from spegeld.mirror._metrics import (
    RESPONSE_SIZE_BUCKETS,
    AdvertisedCounts,
    HttpMetrics,
    registry_of,
)
from spegeld.oci import Digest, parse_reference
from spegeld.processmetrics import export_process_metrics, read_stat
from spegeld.routing import StaticRouter

from ._support import image_in_memory, memory_blobs
from .test_metrics import Family, parse
from .test_peer_listener import get, node

IMAGE = build_image("example.com/team/app:v1", [300_000], seed=177)
OTHER_IMAGE = build_image("ghcr.io/org/tool:2", [10_000], seed=178)
LAYER = IMAGE.platforms[0].layers[0]
BLOB = f"/v2/team/app/blobs/{LAYER}?ns=example.com".encode()
MISSING = b"/v2/team/app/blobs/sha256:" + b"0" * 64 + b"?ns=example.com"
TIMEOUT = 10
SPEGEL_LABELS = ["handler", "method", "code"]


def families(text: str) -> dict[str, Family]:
    return {family.name: family for family in parse(text)}


def samples(family: Family, suffix: str = "") -> dict[tuple[tuple[str, str], ...], float]:
    """``{sorted labels without le: value}`` of the samples named ``family.name + suffix``."""
    return {
        tuple(sorted((k, v) for k, v in labels.items() if k != "le")): float(value)
        for name, labels, value in family.samples
        if name == family.name + suffix and ("le" not in labels or labels["le"] == "+Inf")
    }


def key(handler: str, method: str, code: str) -> tuple[tuple[str, str], ...]:
    return (("code", code), ("handler", handler), ("method", method))


async def test_http_series_have_spegels_names_labels_and_buckets() -> None:
    with trio.fail_after(TIMEOUT):
        async with node(image_in_memory(IMAGE), StaticRouter([]), None) as a:
            for _ in range(3):
                assert (await get(a.mirror, BLOB))[0].status == 200
            assert (await get(a.mirror, BLOB, method=b"HEAD"))[0].status == 200
            assert (await get(a.mirror, MISSING))[0].status == 404
            assert (await get(a.mirror, b"/healthz"))[0].status == 200
            assert (await get(a.mirror, b"/no/such/path?x=1"))[0].status == 404
            assert (await get(a.mirror, BLOB, method=b"BREW"))[0].status in (404, 405)
            found = families(a.metrics.render())
    duration = found["http_request_duration_seconds"]
    size = found["http_response_size_bytes"]
    inflight = found["http_requests_inflight"]
    assert (duration.type, size.type, inflight.type) == ("histogram", "histogram", "gauge")
    for family in (duration, size):
        for name, labels, _ in family.samples:
            expected = SPEGEL_LABELS + (["le"] if name.endswith("_bucket") else [])
            assert sorted(labels) == sorted(expected), (name, labels)
    counts = samples(duration, "_count")
    layer = len(IMAGE.read_blob(LAYER))
    assert counts[key("/v2/*", "GET", "200")] == 3
    assert counts[key("/v2/*", "HEAD", "200")] == 1
    assert counts[key("/v2/*", "GET", "404")] == 1
    assert counts[key("/healthz", "GET", "200")] == 1
    assert counts[key("other", "GET", "404")] == 1  # the path is the client's: bounded
    assert sum(v for k, v in counts.items() if ("method", "OTHER") in k) == 1
    sums = samples(size, "_sum")
    assert sums[key("/v2/*", "GET", "200")] == 3 * layer
    assert sums[key("/v2/*", "HEAD", "200")] == 0  # a HEAD sends no body
    # Spegel's buckets: 1 KiB times powers of 5, to ~2 GB, then +Inf.
    bounds = [float(labels["le"]) for name, labels, _ in size.samples if "le" in labels]
    assert bounds[: len(RESPONSE_SIZE_BUCKETS) + 1] == [*RESPONSE_SIZE_BUCKETS, math.inf]
    assert RESPONSE_SIZE_BUCKETS[0] == 1024 and RESPONSE_SIZE_BUCKETS[-1] == 1024 * 5**9
    # Every handler's in-flight series exists from the start, at 0 once all is answered.
    assert {labels["handler"] for _, labels, _ in inflight.samples} >= {"/v2/*", "/healthz"}
    assert all(float(value) == 0 for _, _, value in inflight.samples)


async def test_inflight_counts_requests_until_their_body_is_sent() -> None:
    registry = MetricsRegistry()
    release = trio.Event()
    entered = trio.Event()

    # A stand-in handler: it holds its answer until the test has read the gauge.
    async def handler(request: Request) -> Response:
        entered.set()
        await release.wait()
        return Response(200)

    server = HttpServer(handler, Limits(), accounting=HttpMetrics(registry))
    with trio.fail_after(TIMEOUT):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        host, port = listeners[0].socket.getsockname()[:2]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.serve, listeners)
            nursery.start_soon(get, f"{host}:{port}", b"/v2/")
            await entered.wait()
            gauge = families(registry.render())["http_requests_inflight"]
            assert samples(gauge)[(("handler", "/v2/*"),)] == 1
            release.set()
            while samples(families(registry.render())["http_requests_inflight"])[
                (("handler", "/v2/*"),)
            ]:
                await trio.sleep(0.01)
            server.shutdown()
    counts = samples(families(registry.render())["http_request_duration_seconds"], "_count")
    assert counts == {key("/v2/*", "GET", "200"): 1}


async def test_advertised_gauges_are_per_registry() -> None:
    store = image_in_memory(IMAGE)
    other = parse_reference(OTHER_IMAGE.name).tag_key()
    assert other is not None
    store.add_image(
        OTHER_IMAGE.name, memory_blobs(OTHER_IMAGE), {other: Digest(OTHER_IMAGE.digest)}
    )
    with trio.fail_after(TIMEOUT):
        async with node(store, StaticRouter([]), None) as a:
            found = families(a.metrics.render())
            store.remove_image(OTHER_IMAGE.name)
            after = families(a.metrics.render())

    def by_registry(family: Family) -> dict[str, float]:
        return {labels["registry"]: float(value) for _, labels, value in family.samples}

    assert by_registry(found["spegel_advertised_image_tags"]) == {"example.com": 1, "ghcr.io": 1}
    assert by_registry(found["spegel_advertised_image_digests"]) == {
        "example.com": 1,
        "ghcr.io": 1,
    }
    content = by_registry(found["spegel_advertised_content_digests"])
    assert content == {
        "example.com": len(memory_blobs(IMAGE)),
        "ghcr.io": len(memory_blobs(OTHER_IMAGE)),
    }
    # An image gone: its registry reads 0, the other is unchanged.
    assert by_registry(after["spegel_advertised_content_digests"]) == {
        "example.com": content["example.com"],
        "ghcr.io": 0,
    }


def test_content_is_counted_over_several_scrapes_within_the_budget() -> None:
    """With no time budget, each scrape counts one digest: a large store never stalls one
    scrape; the gauge shows the last complete count, and a change made during a pass is
    counted by the pass after it."""
    store = image_in_memory(IMAGE)
    registry = MetricsRegistry()
    AdvertisedCounts(registry, store, budget=0)
    digests = len(memory_blobs(IMAGE))

    def content() -> dict[str, float] | None:
        family = families(registry.render()).get("spegel_advertised_content_digests")
        if family is None:
            return None
        return {labels["registry"]: float(value) for _, labels, value in family.samples}

    assert [content() for _ in range(digests - 1)] == [None] * (digests - 1)
    assert content() == {"example.com": digests}
    other = parse_reference(OTHER_IMAGE.name).tag_key()
    assert other is not None
    store.add_image(
        OTHER_IMAGE.name, memory_blobs(OTHER_IMAGE), {other: Digest(OTHER_IMAGE.digest)}
    )
    total = len(set(memory_blobs(IMAGE)) | set(memory_blobs(OTHER_IMAGE)))
    # A pass over both images: meanwhile the last complete count stays.
    assert all(content() == {"example.com": digests} for _ in range(total - 1))
    store.remove_image(OTHER_IMAGE.name)  # one digest before that pass ends
    content()  # it ends, counted partly before the removal; the next pass begins
    final = [content() for _ in range(digests)]
    assert final[-1] == {"example.com": digests, "ghcr.io": 0}
    # The tags were counted at every change, at once.
    tags = families(registry.render())["spegel_advertised_image_tags"]
    assert {labels["registry"]: float(v) for _, labels, v in tags.samples} == {
        "example.com": 1,
        "ghcr.io": 0,
    }


def test_registry_of_names_and_tag_keys() -> None:
    assert registry_of("docker.io/library/nginx:1.27") == "docker.io"
    assert registry_of("localhost:5000/app:v1") == "localhost:5000"
    assert registry_of("nginx:latest") == "unknown"  # containerd's names always have one


def test_process_metrics_read_this_process() -> None:
    registry = MetricsRegistry()
    export_process_metrics(registry)
    found = families(registry.render())
    value = {name: float(family.samples[0][2]) for name, family in found.items()}
    assert found["process_cpu_seconds_total"].type == "counter"
    assert {f.type for n, f in found.items() if n != "process_cpu_seconds_total"} == {"gauge"}
    rss_pages = int(read_stat()[24 - 3])
    page = os.sysconf("SC_PAGE_SIZE")
    # The process keeps allocating between the two reads: within 10 %.
    assert abs(value["process_resident_memory_bytes"] - rss_pages * page) < 0.1 * rss_pages * page
    assert value["process_virtual_memory_bytes"] > value["process_resident_memory_bytes"]
    assert 0 < value["process_open_fds"] <= value["process_max_fds"]
    assert value["process_max_fds"] == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    started = value["process_start_time_seconds"]
    assert time.time() - 3600 < started <= time.time()
    # The kernel's boot-relative start agrees with /proc/self's own creation, to a tick or so.
    assert abs(started - os.stat("/proc/self").st_ctime) < 600
    cpu = value["process_cpu_seconds_total"]
    deadline = time.monotonic() + 5
    while time.process_time() < cpu + 0.05 and time.monotonic() < deadline:
        pass  # burn a little CPU, so the counter must grow
    grown = float(families(registry.render())["process_cpu_seconds_total"].samples[0][2])
    assert grown > cpu
    info = found["python_info"].samples[0][1]
    assert info["implementation"] == "CPython" and info["major"] == "3"
