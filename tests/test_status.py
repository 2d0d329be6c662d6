"""The typed ``/status`` model: what the daemon serves, what ``spegeld status``, doctor and
the STATUS= line read back, and what older or broken daemons send."""

from __future__ import annotations

import json
import random
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import trio
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st
from spegeld_harness import PrivateContainerd, SpegeldProcess, free_port

from spegeld.app._supervision import status_line_of
from spegeld.cli import cli
from spegeld.doctor import daemon_status
from spegeld.election import ElectionStatistics
from spegeld.errors import RemoteProtocolError
from spegeld.gossip import GossipConfig, GossipCore, GossipRouter, Keyring, MemberView
from spegeld.mirror._http import ServerStatistics
from spegeld.status import (
    ElectionStatus,
    GossipStatus,
    HttpStatus,
    NodeStatus,
    PacketCounts,
    PeerStatus,
    RouterStatus,
    StoreStatus,
)
from spegeld.store import StoreStatistics

from ._support import wait_for

# What daemons served before the typed model (captured from real ones, numbers kept):
# the model must read each back and write it out unchanged.
BEFORE_STATIC: dict[str, Any] = {
    "advertise_addr": "127.0.0.1",
    "coordinator": None,
    "election": {
        "preflight": None,
        "reason": "static peers: no gossip, so no coordinator to elect",
        "role": "disabled",
    },
    "http": {
        "aborted": 0,
        "bad_requests": 0,
        "connections": 1,
        "errors": 0,
        "in_flight": 1,
        "refused": 0,
        "requests": 2,
        "timeouts": 0,
    },
    "node": "node-s",
    "registry": ["127.0.0.1:37425"],
    "router": {"kind": "static", "peers": ["127.0.0.1:33533"]},
    "store": {
        "digests": 0,
        "direct_reads": False,
        "events_applied": 0,
        "file_reads": 0,
        "full_syncs": 1,
        "grpc_reads": 0,
        "images": 0,
        "loose_blobs": 0,
        "read_mode": "none",
        "synced": True,
        "tags": 0,
        "warnings": ["containerd namespace 'k8s.io' does not exist: nothing to advertise"],
    },
    "version": "0.1.0",
}
BEFORE_GOSSIP: dict[str, Any] = {
    **BEFORE_STATIC,
    "node": "node-b",
    "coordinator": "node-a",
    "election": {
        "api": "https://127.0.0.1:9",
        "api_requests": 1,
        "consecutive_failures": 1,
        "holder": None,
        "last_error": "API server TCP: connection refused",
        "lease": "spegeld/spegeld-coordinator",
        "next_attempt_in": 0.47911890300019877,
        "preflight": "API server TCP: connection refused",
        "role": "unreachable",
        "transitions": 0,
    },
    "gossip": {
        "coordinator": "node-a",
        "incarnation": 1796668385,
        "key_fingerprint": "insecure",
        "known_keys": 3,
        "members": {"alive": 1, "suspect": 1},
        "node": "node-b",
        "own_keys": 0,
        "packets": {
            "bytes_in": 1143,
            "bytes_out": 1096,
            "dropped": {"auth": 2},
            "in": 12,
            "out": 12,
            "rejected": {},
            "send_errors": 0,
        },
        "peers": [
            {
                "addr": "127.0.0.1:33692",
                "coordinator": True,
                "incarnation": 1796668385,
                "keys": 3,
                "node": "node-a",
                "registry": "127.0.0.1:33533",
                "rtt_ms": 0.75,
                "state": "alive",
                "version": 1883943348469760,
            },
            {
                "addr": "[::1]:7946",
                "coordinator": False,
                "incarnation": 4,
                "keys": 0,
                "node": "node-c",
                "registry": "[::1]:5000",
                "rtt_ms": None,
                "state": "suspect",
                "version": 0,
            },
        ],
    },
    "router": {"kind": "gossip"},
}


# --- the model alone --------------------------------------------------------------------


@pytest.mark.parametrize("before", [BEFORE_STATIC, BEFORE_GOSSIP], ids=["static", "gossip"])
def test_what_earlier_daemons_served_reads_back_and_writes_out_unchanged(
    before: dict[str, Any],
) -> None:
    status = NodeStatus.from_json(json.loads(json.dumps(before)))
    assert status.to_json() == before
    assert NodeStatus.decode(json.dumps(before, indent=2, sort_keys=True).encode()) == status


def test_typed_fields_read_from_the_json() -> None:
    status = NodeStatus.from_json(BEFORE_GOSSIP)
    assert status.coordinator == "node-a"
    assert status.gossip is not None and status.gossip.alive == 1
    a, c = status.gossip.peers
    assert (a.rtt_ms, a.coordinator, c.rtt_ms) == (0.75, True, None)
    assert (a.gossip_addr(), c.gossip_addr()) == (("127.0.0.1", 33692), ("::1", 7946))
    assert status.gossip.packets == PacketCounts(12, 12, 1143, 1096, 0, {"auth": 2}, {})
    assert status.election is not None and status.election.lease == "spegeld/spegeld-coordinator"
    assert status.store.warnings == ("containerd namespace 'k8s.io' does not exist: "
                                     "nothing to advertise",)  # fmt: skip


def test_the_status_line_is_built_from_the_model() -> None:
    assert status_line_of(NodeStatus.from_json(BEFORE_GOSSIP)) == (
        "1 peers alive, coordinator node-a, 0 images; last error: API server TCP: "
        "connection refused"
    )
    assert status_line_of(NodeStatus.from_json(BEFORE_STATIC)) == (
        "0 peers alive, coordinator none, 0 images"
    )
    assert status_line_of(NodeStatus("bare")) == "0 peers alive, coordinator none, 0 images"


def test_an_older_or_partial_status_is_read_with_defaults_and_unknown_fields_ignored() -> None:
    """Older daemons had no election, router or store counters; newer ones may add fields."""
    old = {
        "node": "old-node",
        "registry": ["10.0.0.1:5000"],
        "store": {"digests": 4, "tags": 1, "synced": True},  # no read counters yet
        "gossip": {
            "node": "old-node",
            "peers": [{"node": "p", "state": "alive", "addr": "10.0.0.2:7946"}],
        },
        "added_by_a_newer_daemon": {"anything": [1, 2]},
        "coordinator": "p",
    }
    status = NodeStatus.from_json(old)
    assert status.election is None and status.router is None and status.version == ""
    assert (status.store.digests, status.store.read_mode, status.store.warnings) == (4, "none", ())
    assert status.gossip is not None
    assert status.gossip.peers == (PeerStatus("p", "alive", addr="10.0.0.2:7946"),)
    assert status.coordinator is None  # gossip names none; the top-level copy is not a source
    assert status_line_of(status) == "0 peers alive, coordinator none, 0 images"
    assert NodeStatus.from_json({"node": "x", "gossip": None, "election": None}) == NodeStatus("x")

    with answering(200, json.dumps(old).encode()) as address:  # served as an old daemon would
        result = _cli_status("--registry-addr", address)
    assert result.exit_code == 0, result.output
    assert "node old-node  (spegeld )" in result.stdout
    assert "coordinator: none known" in result.stdout
    assert "own keys: 4 digests, 1 tags  (store synced: True)" in result.stdout
    assert "10.0.0.2:7946" in result.stdout and "alive" in result.stdout


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"not json", "the status is not JSON"),
        (b"\xff\xfe", "the status is not JSON"),
        (b"[" * 100_000, "the status is not JSON"),  # deeper than json's recursion limit
        (b"[1, 2]", "the status: expected a JSON object, got a list [1, 2]"),
        (b'{"node": 7}', "node: expected a string, got an integer 7"),
        (b'{"node": "n", "store": {"images": true}}',
         "store.images: expected an integer, got a boolean True"),
        (b'{"node": "n", "store": []}', "store: expected a JSON object, got a list []"),
        (b'{"node": "n", "gossip": {"peers": [{"rtt_ms": "fast"}]}}',
         "gossip.peers[0].rtt_ms: expected a finite number, got a string 'fast'"),
        (b'{"node": "n", "gossip": {"members": {"alive": "1"}}}',
         "gossip.members.alive: expected an integer, got a string '1'"),
        (b'{"node": "n", "registry": ["a", 1]}', "registry[1]: expected a string"),
        (b'{"node": "n", "election": {"role": "leader", "next_attempt_in": [0]}}',
         "election.next_attempt_in: expected a finite number"),
        (b'{"node": "n", "election": {"role": "x", "next_attempt_in": NaN}}',
         "election.next_attempt_in: expected a finite number, got a number nan"),
    ],
)  # fmt: skip
def test_a_broken_status_is_a_remote_protocol_error_naming_the_field(
    body: bytes, message: str
) -> None:
    with pytest.raises(RemoteProtocolError, match="^" + re.escape(message)):
        NodeStatus.decode(body)


_KEYS = sorted(
    {f.name for cls in (NodeStatus, StoreStatus, HttpStatus, RouterStatus, PeerStatus,
                        GossipStatus, ElectionStatus) for f in fields(cls)}
    | {"in", "out"}
)  # fmt: skip
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=4), inner, max_size=6)
    ),
    max_leaves=30,
)


@given(st.dictionaries(st.sampled_from(_KEYS), _JSON, max_size=10) | _JSON)
def test_any_json_is_read_or_refused_with_a_remote_protocol_error(data: object) -> None:
    try:
        status = NodeStatus.from_json(data)
    except RemoteProtocolError:
        return
    assert NodeStatus.from_json(json.loads(json.dumps(status.to_json()))) == status


@given(st.binary(max_size=200))
def test_any_bytes_are_decoded_or_refused_with_a_remote_protocol_error(body: bytes) -> None:
    with suppress(RemoteProtocolError):
        NodeStatus.decode(body)


_TEXT = st.text(max_size=12)
_COUNT = st.integers(min_value=0, max_value=2**53)
_COUNTS = st.dictionaries(_TEXT, _COUNT, max_size=3)
_NUMBER = st.none() | st.floats(allow_nan=False, allow_infinity=False) | _COUNT
_PEER = st.builds(PeerStatus, _TEXT, _TEXT, _TEXT, _TEXT, _COUNT, _NUMBER, _COUNT, _COUNT,
                  st.booleans())  # fmt: skip
_STATUS = st.builds(
    NodeStatus,
    _TEXT,
    _TEXT,
    _TEXT,
    st.lists(_TEXT, max_size=2).map(tuple),
    st.builds(StoreStatus, *[_COUNT] * 6, st.booleans(), st.booleans(), _TEXT, _COUNT, _COUNT,
              st.lists(_TEXT, max_size=2).map(tuple)),
    st.builds(HttpStatus, *[_COUNT] * 8),
    st.none() | st.builds(RouterStatus, st.sampled_from(["gossip", "static"]),
                          st.lists(_TEXT, max_size=2).map(tuple)),
    st.none() | st.builds(GossipStatus, _TEXT, _COUNT, st.none() | _TEXT, _COUNT, _COUNT,
                          _COUNTS, st.lists(_PEER, max_size=3).map(tuple), st.none() | _TEXT,
                          st.builds(PacketCounts, *[_COUNT] * 5, _COUNTS, _COUNTS)),
    st.none() | st.builds(ElectionStatus, _TEXT, *[st.none() | _TEXT] * 6, _COUNT, _NUMBER,
                          _COUNT, _COUNT),
)  # fmt: skip


@given(_STATUS)
def test_what_the_daemon_writes_reads_back_and_writes_out_the_same(status: NodeStatus) -> None:
    served = json.loads(json.dumps(status.to_json(), indent=2, sort_keys=True))
    again = NodeStatus.from_json(served)
    assert again.to_json() == served
    assert again.coordinator == status.coordinator and again.node == status.node


# --- the model against its sources: a field added there must reach /status ---------------


def test_the_model_carries_every_field_its_sources_report() -> None:
    def names(cls: Any) -> set[str]:
        return {f.name for f in fields(cls)}

    assert names(StoreStatus) == names(StoreStatistics)
    assert names(HttpStatus) == names(ServerStatistics)
    assert names(PeerStatus) == names(MemberView)
    running = ElectionStatus("leader", lease="ns/name").to_json()
    assert set(running) == names(ElectionStatistics) | {"lease", "api", "preflight"}


async def test_the_gossip_shells_report_reads_into_the_model_without_loss() -> None:
    """Two real gossip shells on loopback UDP meet; each one's ``status()`` dict (the
    producer's input) converts to the model and back unchanged."""
    ports = [free_port("127.0.0.1", kind=2) for _ in range(2)]  # SOCK_DGRAM
    keys = Keyring([(1, b"s" * 32)])
    routers = [
        GossipRouter(
            GossipCore(
                GossipConfig(node=f"n{i}", addr=("127.0.0.1", port),
                             mirror=f"127.0.0.1:{5000 + i}", incarnation=1,
                             seeds=tuple(("127.0.0.1", p) for p in ports if p != port)),
                keys, random.Random(i), trio.current_time(),
            ),
            ("127.0.0.1", port),
        )
        for i, port in enumerate(ports)
    ]  # fmt: skip
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for router in routers:
                await nursery.start(router.run)
            while not all(r.status()["members"].get("alive") == 1 for r in routers):
                await trio.sleep(0.05)
            for router in routers:
                report = json.loads(json.dumps(router.status()))
                assert report["peers"], report
                assert GossipStatus.from_json(report).to_json() == report
            nursery.cancel_scope.cancel()


# --- a real daemon ---------------------------------------------------------------------


@pytest.fixture
def electing_daemon(containerd: PrivateContainerd, tmp_path: Path) -> Iterator[SpegeldProcess]:
    """A real daemon with gossip and an elector whose API server refuses: every status
    section is filled, the election one with its last error."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters: [{{name: c, cluster: {{server: 'https://127.0.0.1:{free_port('127.0.0.1')}'"
        ", insecure-skip-tls-verify: true}}]\n"
        "users: [{name: u, user: {token: t}}]\n"
        "contexts: [{name: x, context: {cluster: c, user: u}}]\ncurrent-context: x\n"
    )
    node = SpegeldProcess(tmp_path / "node-e", containerd,
                          extra_args=["--kubeconfig", str(kubeconfig)])  # fmt: skip
    node.start()
    try:
        wait_for(lambda: node.status()["election"]["last_error"] is not None, 15,
                 "the elector to report its refused API server")  # fmt: skip
        yield node
    finally:
        node.stop()


async def test_a_real_daemons_status_reads_through_every_consumer(
    electing_daemon: SpegeldProcess,
) -> None:
    node = electing_daemon
    raw = node.get("/status")[2]
    status = NodeStatus.decode(raw)
    assert status.to_json() == json.loads(raw)  # nothing dropped, nothing added
    assert status.node == "node-e" and status.mirror == (node.address,)
    assert status.router == RouterStatus("gossip")
    assert status.store.synced
    assert status.gossip is not None and status.gossip.key_fingerprint == "insecure"
    election = status.election
    assert election is not None and election.lease == "spegeld/spegeld-coordinator"
    assert election.last_error is not None and "connection refused" in election.last_error
    assert status_line_of(status).startswith("0 peers alive, coordinator none, 0 images; "
                                             "last error: API server TCP: connection refused")  # fmt: skip

    with trio.fail_after(10):
        seen = await daemon_status(("127.0.0.1", node.port), 5.0)
    assert seen is not None and seen.gossip is not None
    assert seen.gossip.key_fingerprint == "insecure" and seen.node == "node-e"

    shown = await trio.to_thread.run_sync(_cli_status, "--json", "--registry-addr", node.address)
    assert shown.exit_code == 0, shown.output
    printed = NodeStatus.decode(shown.stdout)  # counters move between reads; the rest holds
    assert printed.to_json().keys() == json.loads(raw).keys()
    assert (printed.node, printed.mirror, printed.router) == (
        status.node,
        status.mirror,
        status.router,
    )
    assert printed.election is not None and printed.election.lease == election.lease

    shown = await trio.to_thread.run_sync(_cli_status, "--registry-addr", node.address)
    assert shown.exit_code == 0, shown.output
    assert "node node-e  (spegeld " in shown.stdout
    assert "election: unreachable (Lease spegeld/spegeld-coordinator); last error:" in shown.stdout
    assert "peers (0 keys known)" in shown.stdout


# --- a broken daemon ---------------------------------------------------------------------


@contextmanager
def answering(code: int, body: bytes) -> Iterator[str]:
    """A stand-in for a broken daemon (a real one never serves these): a loopback HTTP
    server answering every GET with ``code`` and ``body``. Yields its HOST:PORT."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(code)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.mark.parametrize(
    ("code", "body", "said"),
    [
        (200, b"<html>a proxy page</html>", "did not answer with a spegeld status: the status "
                                            "is not JSON"),
        (200, b'{"node": "n", "gossip": {"peers": [{"rtt_ms": "fast"}]}}',
         "did not answer with a spegeld status: gossip.peers[0].rtt_ms: expected a finite"),
        (500, b"{}", "answered 500"),
    ],
)  # fmt: skip
async def test_spegeld_status_and_doctor_refuse_a_broken_status_clearly(
    code: int, body: bytes, said: str, caplog: pytest.LogCaptureFixture
) -> None:
    with answering(code, body) as address:
        result = await trio.to_thread.run_sync(_cli_status, "--registry-addr", address)
        assert result.exit_code == 1
        assert result.stderr.startswith(f"spegeld: error: http://{address}/status ")
        assert said in result.stderr and "Traceback" not in result.output
        host, port = address.rsplit(":", 1)
        with trio.fail_after(10):
            assert await daemon_status((host, int(port)), 5.0) is None
    if code == 200:
        assert "answered no spegeld status" in caplog.text


def _cli_status(*args: str) -> Any:
    return CliRunner(catch_exceptions=False).invoke(cli, ["status", *args])
