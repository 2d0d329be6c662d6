"""deploy/grafana-dashboard.json against real daemons: every PromQL query in it parses
(promql-parser, the Rust port of Prometheus's own parser), and every metric it names is
exported by ``/metrics`` of a running ``spegeld run``.

The daemons: two nodes (private containerd + ``spegeld run`` on loopback) electing a
coordinator through the real kube-apiserver (tests/kubeapi/_electing.py), so the election
and Kubernetes series exist too. Before scraping they serve what a dashboard shows: an
image imported on node 0, its blobs fetched through node 1's mirror (proxied from node 0's
peer listener), local GETs and HEADs, a miss, an unsigned peer request (401) and a garbage
gossip datagram. The same scrape shows the http_* series with Spegel's label names, and
passes the strict exposition parser of tests/test_metrics.py.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser
import pytest
from spegeld_harness import build_image

from tests._support import wait_for
from tests.kubeapi._electing import ElectingCluster
from tests.test_metrics import parse

pytestmark = [pytest.mark.containerd, pytest.mark.slow, pytest.mark.kubeapiserver]

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana-dashboard.json"
HOSTS = ["127.0.0.41", "127.0.0.42"]
IMAGE = build_image("example.com/team/app:v1", [200_000, 50_000], seed=191)
# Grafana's variables, as Grafana substitutes them before the query reaches Prometheus.
VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1h",
    "$instance": ".*",
    "${instance}": ".*",
}
LABEL_VALUES = re.compile(r"label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*,")


def _queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """``(panel title, expr)`` of every target, rows' nested panels included."""
    found: list[tuple[str, str]] = []
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []):
                found.append((inner["title"], target["expr"]))
    return found


def _substituted(expr: str) -> str:
    for name in sorted(VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, VARIABLES[name])
    assert "$" not in expr, f"an unknown Grafana variable in {expr!r}"
    return expr


def _metric_names(node: Any) -> set[str]:
    """The metric names the selectors of a parsed expression name (promql-parser's AST)."""
    if isinstance(node, promql_parser.VectorSelector):
        assert node.name, "a selector without a metric name matches every series"
        return {node.name}
    if isinstance(node, promql_parser.MatrixSelector):
        return _metric_names(node.vector_selector)
    if isinstance(node, promql_parser.BinaryExpr):
        return _metric_names(node.lhs) | _metric_names(node.rhs)
    if isinstance(node, promql_parser.AggregateExpr):
        return _metric_names(node.expr) | (_metric_names(node.param) if node.param else set())
    if isinstance(node, promql_parser.Call):
        return set().union(*(_metric_names(arg) for arg in node.args))
    if isinstance(node, promql_parser.ParenExpr | promql_parser.UnaryExpr):
        return _metric_names(node.expr)
    if isinstance(node, promql_parser.SubqueryExpr):
        return _metric_names(node.expr)
    assert isinstance(node, promql_parser.NumberLiteral | promql_parser.StringLiteral), node
    return set()


def dashboard_metrics() -> dict[str, list[str]]:
    """Every metric name the dashboard queries → the panels that query it."""
    dashboard = json.loads(DASHBOARD.read_text())
    names: dict[str, list[str]] = {}
    for title, expr in _queries(dashboard):
        parsed = promql_parser.parse(_substituted(expr))
        for name in _metric_names(parsed):
            names.setdefault(name, []).append(title)
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            text = query["query"] if isinstance(query, dict) else query
            for name in LABEL_VALUES.findall(text):
                names.setdefault(name, []).append(f"${variable['name']}")
    return names


def test_every_query_parses_and_the_dashboard_covers_each_area() -> None:
    names = dashboard_metrics()
    assert len(_queries(json.loads(DASHBOARD.read_text()))) >= 30
    for required in (
        "http_request_duration_seconds_bucket",
        "http_response_size_bytes_bucket",
        "http_requests_inflight",
        "spegel_mirror_requests_total",
        "spegeld_bytes_served_total",  # peer / local / inflight sources
        "spegeld_gossip_dropped_total",
        "spegeld_coordinator",
        "spegeld_peer_auth_failures_total",
        "spegel_advertised_content_digests",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
    ):
        assert required in names, required


def test_an_expression_naming_no_metric_is_refused_by_the_walk() -> None:
    with pytest.raises(AssertionError, match="without a metric name"):
        _metric_names(promql_parser.parse('{__name__=~"http_.*"}'))
    with pytest.raises(Exception):  # noqa: B017 - the parser's own error type
        promql_parser.parse("sum(rate(http_requests_inflight[1m])")


class Cluster(ElectingCluster):
    def __init__(self, base: Path) -> None:
        super().__init__(base, HOSTS)


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """The /metrics text of both nodes once they have served a little of everything."""
    base = tmp_path_factory.mktemp("dashboard")
    cluster = Cluster(base)
    try:
        cluster.start()
        holder, edge = (node.spegeld for node in cluster.nodes)
        archive = base / "image.tar"
        IMAGE.write_oci_archive(archive)
        cluster.nodes[0].containerd.import_image(archive)
        layer = IMAGE.platforms[0].layers[0]
        blob = f"/v2/team/app/blobs/{layer}?ns=example.com"
        manifest = "/v2/team/app/manifests/v1?ns=example.com"
        by_digest = f"/v2/team/app/manifests/{IMAGE.digest}?ns=example.com"
        # The tag is indexed once containerd's image event is (a layer may be served before).
        wait_for(lambda: holder.get(manifest)[0] == 200, 15, "node 0 serving its image by tag")
        wait_for(lambda: edge.get(blob)[0] == 200, 15, "node 1 proxying node 0's layer")
        for path, method in ((by_digest, "GET"), (by_digest, "HEAD"), (blob, "HEAD")):
            for node in (holder, edge):
                assert node.get(path, method=method)[0] == 200, (path, method)
        missing = "/v2/team/app/blobs/sha256:" + "0" * 64 + "?ns=example.com"
        assert edge.get(missing)[0] == 404
        with socket.create_connection((holder.host, holder.peer_port), timeout=5) as sock:
            sock.sendall(f"GET {blob} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            assert sock.recv(64).startswith(b"HTTP/1.1 401")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.sendto(b"not a gossip datagram", (holder.host, holder.gossip_port))
        wait_for(
            lambda: b"spegeld_gossip_dropped_total{" in holder.get("/metrics")[2],
            10,
            "the garbage datagram counted",
        )
        wait_for(lambda: len(cluster.leaders()) == 1, 30, "a coordinator")
        yield [node.get("/metrics")[2].decode() for node in (holder, edge)]
    finally:
        cluster.close()


def test_every_dashboard_metric_is_exported_by_a_running_daemon(scraped: list[str]) -> None:
    exported: set[str] = set()
    for text in scraped:
        for family in parse(text):  # strict: the exposition stays valid
            exported |= {name for name, _, _ in family.samples}
    missing = {name: panels for name, panels in dashboard_metrics().items() if name not in exported}
    assert not missing, f"the dashboard queries metrics no daemon exports: {missing}"


def test_metrics_has_spegels_http_series_and_labels(scraped: list[str]) -> None:
    holder = {family.name: family for family in parse(scraped[0])}
    for name in ("http_request_duration_seconds", "http_response_size_bytes"):
        family = holder[name]
        assert family.type == "histogram"
        label_sets = {tuple(sorted(labels)) for _, labels, _ in family.samples}
        assert label_sets == {
            ("code", "handler", "method"),
            ("code", "handler", "le", "method"),
        }, name
        series = {(labels["handler"], labels["method"], labels["code"])
                  for _, labels, _ in family.samples}  # fmt: skip
        # containerd's (and the peer's) pulls: GETs and HEADs of /v2/*, the probes' /readyz.
        assert {("/v2/*", "GET", "200"), ("/v2/*", "HEAD", "200")} <= series, name
        assert ("/readyz", "GET", "200") in series, name
    inflight = holder["http_requests_inflight"]
    assert inflight.type == "gauge"
    assert {tuple(labels) for _, labels, _ in inflight.samples} == {("handler",)}
    edge = {family.name: family for family in parse(scraped[1])}
    served = {
        labels["source"]: float(v) for _, labels, v in edge["spegeld_bytes_served_total"].samples
    }
    assert served["peer"] > 0  # node 1's GETs came from node 0
    tags = {
        labels["registry"]: float(v)
        for _, labels, v in holder["spegel_advertised_image_tags"].samples
    }
    assert tags == {"example.com": 1}
    content = holder["spegel_advertised_content_digests"].samples
    assert {labels["registry"]: float(v) for _, labels, v in content}["example.com"] >= 4
