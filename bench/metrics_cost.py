"""What the http_* request accounting costs per request, and whether prometheus_client
would cost less than spegeld's own registry (spegeld/metrics.py).

    .venv/bin/python bench/metrics_cost.py                 # 5 rounds of 2000 GETs per variant
    .venv/bin/python bench/metrics_cost.py --rounds 3 --gets 1000

prometheus_client is not a dependency of spegeld: install it beside the bench, e.g.
``pip install --target /tmp/promclient prometheus-client`` and run with
``PYTHONPATH=/tmp/promclient``; without it the prom columns are skipped.

Three real ``HttpServer`` instances in this process (trio, h11, sendfile), one per variant:

* **none**: no accounting (the request path before the http_* metrics: only the
  ``accounting is not None`` test differs);
* **hand**: ``HttpMetrics`` on spegeld's ``MetricsRegistry`` (what ships);
* **prom**: the same accounting (same labels, buckets and child cache) on
  prometheus_client's ``Histogram``/``Gauge`` in a per-instance ``CollectorRegistry``.

Each answers a blob GET (``FileBody``, sent with sendfile) of ``--size`` bytes. A client
in another process sends ``--gets`` keep-alive GETs to one server at a time; the server's
CPU time (``time.process_time`` of this process, the client being elsewhere) per request
is the figure, the variants interleaved in rotating order each round, medians reported,
with the ratio to **none** beside each. Then, in-process: one ``begin``+``end`` call pair
and one scrape (the exposition after requests over 10 handler/method/code series).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import timeit
from pathlib import Path
from typing import Any, cast

import trio

from spegeld.metrics import MetricsRegistry
from spegeld.mirror._http import FileBody, HttpServer, Limits, Request, Response
from spegeld.mirror._labels import HANDLERS, handler_label, method_label
from spegeld.mirror._metrics import RESPONSE_SIZE_BUCKETS, HttpMetrics

try:
    import prometheus_client  # type: ignore[import-not-found, unused-ignore]
except ImportError:  # optional: see the docstring
    prometheus_client = None

TARGET = "/v2/team/app/blobs/sha256:" + "ab" * 32 + "?ns=docker.io"
CLIENT = r"""
import http.client, sys, time
host, port, n, target = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
conn = http.client.HTTPConnection(host, port, timeout=30)
start = time.perf_counter()
for _ in range(n):
    conn.request("GET", target)
    response = conn.getresponse()
    response.read()
    assert response.status == 200, response.status
print(time.perf_counter() - start)
"""


class PromHttpMetrics:
    """HttpMetrics' accounting on prometheus_client: same labels, buckets and cache."""

    def __init__(self) -> None:
        assert prometheus_client is not None
        self.registry = prometheus_client.CollectorRegistry()
        labels = ["handler", "method", "code"]
        self.duration = prometheus_client.Histogram(
            "http_request_duration_seconds", "The latency of the HTTP requests.", labels,
            registry=self.registry,
        )  # fmt: skip
        self.size = prometheus_client.Histogram(
            "http_response_size_bytes", "The size of the HTTP responses.", labels,
            buckets=RESPONSE_SIZE_BUCKETS, registry=self.registry,
        )  # fmt: skip
        inflight = prometheus_client.Gauge(
            "http_requests_inflight", "The number of inflight requests.", ["handler"],
            registry=self.registry,
        )  # fmt: skip
        self._inflight = {handler: inflight.labels(handler) for handler in HANDLERS}
        self._series: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def begin(self, request: Request) -> tuple[str, str, float]:
        handler = handler_label(request.target)
        self._inflight[handler].inc()
        return handler, method_label(request.method), time.perf_counter()

    def end(self, token: object, status: int, size: int) -> None:
        handler, method, started = cast(tuple[str, str, float], token)
        key = (handler, method, status)
        series = self._series.get(key)
        if series is None:
            labels = (handler, method, str(status))
            series = self._series[key] = (
                self.duration.labels(*labels),
                self.size.labels(*labels),
            )
        series[0].observe(time.perf_counter() - started)
        series[1].observe(size)
        self._inflight[handler].dec()

    def render(self) -> bytes:
        assert prometheus_client is not None
        return bytes(prometheus_client.generate_latest(self.registry))


def _variants() -> dict[str, Any]:
    hand_registry = MetricsRegistry()
    variants: dict[str, Any] = {
        "none": (None, lambda: b""),
        "hand": (HttpMetrics(hand_registry), lambda: hand_registry.render().encode()),
    }
    if prometheus_client is not None:
        prom = PromHttpMetrics()
        variants["prom"] = (prom, prom.render)
    return variants


async def _measure(args: argparse.Namespace, blob: Path) -> dict[str, list[float]]:
    async def handler(request: Request) -> Response:
        return Response(200, [(b"content-type", b"application/octet-stream")],
                        FileBody(blob, 0, args.size))  # fmt: skip

    variants = _variants()
    ports: dict[str, int] = {}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    wall: dict[str, list[float]] = {name: [] for name in variants}
    async with trio.open_nursery() as nursery:
        servers = []
        for name, (accounting, _) in variants.items():
            server = HttpServer(handler, Limits(), accounting=accounting)
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            ports[name] = listeners[0].socket.getsockname()[1]
            await nursery.start(server.serve, listeners)
            servers.append(server)
        names = list(variants)
        for round_ in range(args.rounds):
            order = names[round_ % len(names) :] + names[: round_ % len(names)]
            for name in order:
                argv = [sys.executable, "-c", CLIENT, "127.0.0.1", str(ports[name]),
                        str(args.gets), TARGET]  # fmt: skip
                before = time.process_time()
                with trio.fail_after(600):
                    done = await trio.run_process(argv, capture_stdout=True)
                cpu[name].append((time.process_time() - before) / args.gets)
                wall[name].append(float(done.stdout) / args.gets)
        for server in servers:
            server.shutdown()
    _print_table("server CPU per GET", cpu)
    _print_table("client wall time per GET (keep-alive)", wall)
    _scrapes(variants)
    return cpu


def _print_table(title: str, figures: dict[str, list[float]]) -> None:
    base = statistics.median(figures["none"])
    print(f"\n{title} (median of {len(figures['none'])} rounds; ratio to none)")
    for name, values in figures.items():
        median = statistics.median(values)
        spread = f"{min(values) * 1e6:.1f}-{max(values) * 1e6:.1f}"
        print(f"  {name:5s} {median * 1e6:8.1f} us  ({spread})  x{median / base:.3f}"
              f"  +{(median - base) * 1e6:.1f} us")  # fmt: skip


def _scrapes(variants: dict[str, Any]) -> None:
    print("\nin-process (median of 5 timeit runs)")
    request = Request(b"GET", TARGET.encode(), {}, "mirror")
    per_call: dict[str, float] = {}
    for name, (accounting, render) in variants.items():
        if accounting is None:
            continue
        for status in (200, 206, 404, 500):  # series enough for a realistic exposition
            for method in (b"GET", b"HEAD"):
                accounting.end(accounting.begin(Request(method, b"/v2/x", {}, "")), status, 1)

        def call(a: Any = accounting) -> None:
            a.end(a.begin(request), 200, 4096)

        n = 20000
        per_call[name] = statistics.median(timeit.repeat(call, number=n, repeat=5)) / n
        scrape = statistics.median(timeit.repeat(render, number=50, repeat=5)) / 50
        print(f"  {name:5s} begin+end {per_call[name] * 1e6:6.2f} us"
              f"   scrape {scrape * 1e3:6.2f} ms ({len(render())} bytes)")  # fmt: skip
    if "prom" in per_call:
        print(f"  prom/hand begin+end: x{per_call['prom'] / per_call['hand']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--gets", type=int, default=2000)
    parser.add_argument("--size", type=int, default=4096, help="blob bytes per GET")
    args = parser.parse_args()
    if prometheus_client is None:
        print("prometheus_client not importable: the prom variant is skipped")
    else:
        print(f"prometheus_client {prometheus_client.__name__} from "
              f"{os.path.dirname(prometheus_client.__file__ or '')}")  # fmt: skip
    print(f"{args.rounds} rounds x {args.gets} keep-alive GETs of {args.size} bytes per variant")
    with tempfile.TemporaryDirectory() as tmp:
        blob = Path(tmp) / "blob"
        blob.write_bytes(os.urandom(args.size))
        trio.run(_measure, args, blob)


if __name__ == "__main__":
    main()
