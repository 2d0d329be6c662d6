"""Gossip over real UDP between real ``spegeld run`` processes (DESIGN.md §5).

Every node is a private containerd plus ``spegeld run`` on its own loopback
address (127.0.0.2 … 127.0.0.6), all holding one generated cluster key; node 0
is the seed the others name with ``--peer``. The two tests that follow an image
through the cluster (an import spreading, a killed node's keys leaving and coming
back from its content store) run on containerd 1.6 and on 2.3 (``any_cluster``);
the rest, about datagrams and membership, on 1.6 only. Nothing is mocked: the datagrams,
tags, tables and the registry proxy are the daemons' own, and everything is
observed from outside, through ``/status`` and HTTP.

The hostile-datagram test talks to a daemon from a plain UDP socket on
127.0.0.9, sealing packets itself with ``_security.seal`` and ``_codec``.
"""

from __future__ import annotations

import base64
import hmac
import math
import os
import socket
import struct
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from spegeld_harness import (
    BuiltImage,
    PrivateContainerd,
    SpegeldProcess,
    build_image,
    write_cluster_key,
)

from spegeld.errors import RemoteProtocolError
from spegeld.gossip import Keyring, Timings
from spegeld.gossip._codec import decode_payload, encode_message, encode_sender
from spegeld.gossip._messages import Ack, Delta, Join, Member, Ping, State, Summary
from spegeld.gossip._security import (
    HEADER_SIZE,
    MAX_DATAGRAM,
    DroppedPacket,
    open_datagram,
    seal,
)
from tests._support import wait_for

pytestmark = [pytest.mark.containerd, pytest.mark.slow]

HOSTS = tuple(f"127.0.0.{i}" for i in range(2, 7))
ATTACKER_HOST = "127.0.0.9"  # the plain UDP socket that sends hostile datagrams
T = Timings()  # the daemon runs memberlist's LAN defaults
# DESIGN.md §5: suspicion lasts 4·max(1, log10 N) probe intervals.
SUSPICION = T.suspicion_mult * max(1.0, math.log10(len(HOSTS))) * T.probe_interval
# A node is suspected once a probe of it has gone unanswered for a probe interval. Probe
# targets are taken round-robin in an order shuffled every round (SWIM §4.3, as
# memberlist does), so each survivor probes a given member once per round of N - 1
# probes, and two probes of it can be up to 2(N - 1) - 1 intervals apart: SWIM's
# time-bounded completeness. Usually some survivor gets there within a second or two.
FIRST_PROBE_WITHIN = (2 * (len(HOSTS) - 1) - 1) * T.probe_interval
SUSPECTED_WITHIN = FIRST_PROBE_WITHIN + T.probe_interval + 0.5  # 0.5: our polling
DEAD_MARGIN = 1.0  # timer and polling slack on a loaded 2-core machine
# Dead everywhere: suspected, then the suspicion timeout, plus margin.
DEAD_WITHIN = SUSPECTED_WITHIN + SUSPICION + DEAD_MARGIN
PULLABLE_WITHIN = 3.0  # seconds from an import's end to pullable through every other node
CONVERGE_WITHIN = 10.0
POLL = 0.05

_BUDGET = os.environ.get("SPEGELD_FUZZ_EXAMPLES")
FUZZ = settings(
    deadline=None,
    max_examples=int(_BUDGET) if _BUDGET else 250,
    derandomize=_BUDGET is None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# -- the cluster ---------------------------------------------------------------------------------


class LiveOnlySpegeld(SpegeldProcess):
    """A daemon that is expected never to join: start() waits for /healthz, not /readyz."""

    _starting = False

    def start(self) -> LiveOnlySpegeld:
        self._starting = True
        try:
            super().start()
        finally:
            self._starting = False
        return self

    def get(
        self, path: str, *, method: str = "GET", headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        if self._starting and path == "/readyz":
            path = "/healthz"
        return super().get(path, method=method, headers=headers)


class Node:
    def __init__(self, containerd: PrivateContainerd, spegeld: SpegeldProcess) -> None:
        self.containerd = containerd
        self.spegeld = spegeld

    @property
    def name(self) -> str:
        return self.spegeld.base_dir.name

    def view(self) -> dict[str, dict[str, Any]]:
        """This node's gossip table: peer name → its /status entry."""
        return {p["node"]: p for p in self.spegeld.status()["gossip"]["peers"]}

    def gossip(self) -> dict[str, Any]:
        result: dict[str, Any] = self.spegeld.status()["gossip"]
        return result


# These tests read a tag that one node holds through every other node's mirror: how fast
# gossip spreads a lone holder's keys. Under the default --tag-quorum 2 such a tag goes to
# the upstream instead (by design: tests/test_sharing*.py); here the quorum is 1.
LONE_HOLDER_TAGS = ("--tag-quorum", "1")


class Cluster:
    def __init__(self, base: Path, containerd_bin_dir: Path | None = None) -> None:
        self.base = base
        self.containerd_bin_dir = containerd_bin_dir  # None: Debian's 1.6 from PATH
        self.key = write_cluster_key(base / "cluster.key")
        self.nodes: list[Node] = []
        self._all: list[Node] = []  # everything started, for close()

    def node(
        self,
        name: str,
        host: str,
        *,
        key_file: Path | None,
        peers: Sequence[str],
        live_only: bool = False,
    ) -> Node:
        containerd = PrivateContainerd(
            self.base / f"{name}-containerd", bin_dir=self.containerd_bin_dir
        )
        kind = LiveOnlySpegeld if live_only else SpegeldProcess
        spegeld = kind(
            self.base / name, containerd, host=host, key_file=key_file, peers=peers,
            extra_args=LONE_HOLDER_TAGS,
        )  # fmt: skip
        node = Node(containerd, spegeld)
        self._all.append(node)
        return node

    def start(self, nodes: Sequence[Node]) -> None:
        """Start containerds, then daemons, in parallel (each start waits for readiness)."""
        with ThreadPoolExecutor(max_workers=len(nodes)) as pool:
            for containerd in [pool.submit(n.containerd.start) for n in nodes]:
                containerd.result()
            for spegeld in [pool.submit(n.spegeld.start) for n in nodes]:
                spegeld.result()

    def close(self) -> None:
        for node in self._all:
            node.spegeld.stop()
        for node in self._all:
            node.containerd.close()


def start_cluster(
    base: Path, count: int, containerd_bin_dir: Path | None = None
) -> tuple[Cluster, float]:
    """``count`` members seeded through node 0; returns it once every node sees every
    other alive, and how long that took after the last daemon was ready."""
    cluster = Cluster(base, containerd_bin_dir)
    seed = cluster.node("node-0", HOSTS[0], key_file=cluster.key, peers=())
    cluster.nodes.append(seed)
    for i in range(1, count):
        cluster.nodes.append(
            cluster.node(
                f"node-{i}", HOSTS[i], key_file=cluster.key, peers=[seed.spegeld.gossip_address]
            )
        )
    try:
        seed.containerd.start()
        seed.spegeld.start()
        cluster.start(cluster.nodes[1:])
        converged = wait_for(
            lambda: all_alive(cluster.nodes), CONVERGE_WITHIN, f"{count} nodes to converge"
        )
    except BaseException:
        cluster.close()
        raise
    return cluster, converged


def five_nodes(base: Path, containerd_bin_dir: Path | None) -> Iterator[Cluster]:
    started = time.monotonic()
    cluster, converged = start_cluster(base, len(HOSTS), containerd_bin_dir)
    print(
        f"\n[gossip] {len(HOSTS)} nodes on containerd "
        f"{cluster.nodes[0].containerd.version}: converged {converged:.2f} s after the last "
        f"was ready ({time.monotonic() - started:.2f} s from the first start)"
    )
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """Five nodes on Debian's containerd 1.6."""
    yield from five_nodes(tmp_path, None)


@pytest.fixture
def any_cluster(tmp_path: Path, containerd_bin_dir: Path | None) -> Iterator[Cluster]:
    """Five nodes, once on containerd 1.6 and once on 2.3 (marked ``containerd2``)."""
    yield from five_nodes(tmp_path, containerd_bin_dir)


# -- observations ---------------------------------------------------------------------------------


def all_alive(nodes: Sequence[Node]) -> bool:
    names = {n.name for n in nodes}
    for node in nodes:
        view = node.view()
        if any(view.get(other, {}).get("state") != "alive" for other in names - {node.name}):
            return False
    return True


def image_paths(image: BuiltImage) -> tuple[str, str, str]:
    """(registry, repository path, tag) of an image name like ``example.com/team/app:v1``."""
    registry, _, path = image.repository.partition("/")
    return registry, path, image.tag


def manifest_by_tag(node: SpegeldProcess, image: BuiltImage) -> tuple[int, bytes]:
    registry, path, tag = image_paths(image)
    status, headers, body = node.get(f"/v2/{path}/manifests/{tag}?ns={registry}")
    if status == 200:
        assert headers["docker-content-digest"] == image.digest
    return status, body


def blob(node: SpegeldProcess, image: BuiltImage, digest: str) -> tuple[int, bytes]:
    registry, path, _ = image_paths(image)
    status, _, body = node.get(f"/v2/{path}/blobs/{digest}?ns={registry}")
    return status, body


def pullable(node: SpegeldProcess, image: BuiltImage) -> bool:
    """The manifest by tag and every blob answer 200 with exactly the image's bytes."""
    status, body = manifest_by_tag(node, image)
    if status != 200:
        return False
    assert body == image.read_blob(image.digest)
    for digest in image.digests() - {image.digest}:
        status, body = blob(node, image, digest)
        if status != 200:
            return False
        assert body == image.read_blob(digest), f"{node.url} served wrong bytes for {digest}"
    return True


def unknown_everywhere(nodes: Sequence[Node], image: BuiltImage) -> bool:
    for node in nodes:
        if manifest_by_tag(node.spegeld, image)[0] != 404:
            return False
        if any(blob(node.spegeld, image, d)[0] != 404 for d in image.digests()):
            return False
    return True


def import_image(node: Node, image: BuiltImage, tmp: Path) -> float:
    """Import into the node's containerd; the monotonic time the import finished."""
    archive = image.write_oci_archive(tmp / f"{image.tag}-{node.name}.tar")
    node.containerd.import_image(archive)
    return time.monotonic()


def time_until_pullable(nodes: Sequence[Node], image: BuiltImage, since: float) -> dict[str, float]:
    """Per node, seconds from ``since`` until ``image`` was pullable through it."""
    seen: dict[str, float] = {}
    deadline = since + PULLABLE_WITHIN
    while len(seen) < len(nodes):
        for node in nodes:
            if node.name not in seen and pullable(node.spegeld, image):
                seen[node.name] = time.monotonic() - since
        if len(seen) < len(nodes):
            if time.monotonic() > deadline:
                missing = sorted({n.name for n in nodes} - set(seen))
                raise AssertionError(
                    f"{image.name} not pullable through {missing} within {PULLABLE_WITHIN} s "
                    f"(pullable elsewhere after {seen})"
                )
            time.sleep(POLL)
    return seen


# -- tests ------------------------------------------------------------------------------------------


def test_five_daemons_converge_and_an_import_is_pullable_through_every_mirror_within_3s(
    any_cluster: Cluster, tmp_path: Path
) -> None:
    nodes = any_cluster.nodes
    incarnations = {n.name: n.gossip()["incarnation"] for n in nodes}
    for node in nodes:
        gossip = node.gossip()
        assert gossip["members"] == {"alive": len(nodes) - 1}
        view = {p["node"]: p for p in gossip["peers"]}
        assert set(view) == {n.name for n in nodes} - {node.name}
        for other in nodes:
            if other is node:
                continue
            entry = view[other.name]
            assert entry["state"] == "alive"
            assert entry["addr"] == other.spegeld.gossip_address
            assert entry["registry"] == other.spegeld.peer_address
            assert entry["incarnation"] == incarnations[other.name]
        assert gossip["packets"]["in"] > 0 and gossip["packets"]["out"] > 0
        assert gossip["packets"]["dropped"] == {}, "an honest cluster drops nothing"

    image = build_image("example.com/team/gossip:v1", [300_000, 40_000], seed=501)
    source, others = nodes[2], [n for n in nodes if n is not nodes[2]]
    assert unknown_everywhere(nodes, image)
    started = time.monotonic()
    imported = import_image(source, image, tmp_path)
    seen = time_until_pullable(others, image, imported)
    print(
        f"[gossip] import took {imported - started:.2f} s; pullable through the other four "
        f"after {', '.join(f'{k} {v:.2f} s' for k, v in sorted(seen.items()))}"
    )
    assert max(seen.values()) <= PULLABLE_WITHIN
    # Every byte came from the source node, through each mirror's proxy.
    total = sum(image.blobs[d].size for d in image.digests())
    for node in others:
        assert node.spegeld.metric('spegeld_bytes_served_total{source="peer"}') >= total
    # The blobs and the tag key, and nothing else once the import's leftovers are gone:
    # containerd 2.x's import also writes the archive's index.json into the content store
    # (a /content/create event, so advertised) and its GC deletes it a moment later (so
    # withdrawn); 1.6 announces only the image. Wait for that, within the spreading bound.
    wanted = len(image.digests()) + 1
    settled = wait_for(
        lambda: (
            source.gossip()["own_keys"] == wanted
            and all(node.view()[source.name]["keys"] == wanted for node in others)
        ),
        PULLABLE_WITHIN,
        f"{source.name}'s {wanted} keys, exactly, everywhere",
    )
    print(f"[gossip] keys settled everywhere {settled:.2f} s after the mirrors served the image")


def test_a_killed_node_goes_dead_everywhere_its_keys_leave_and_it_rejoins_higher(
    any_cluster: Cluster, tmp_path: Path
) -> None:
    cluster = any_cluster
    victim = cluster.nodes[4]
    survivors = cluster.nodes[:4]
    image = build_image("example.com/team/victim:v1", [100_000], seed=502)
    time_until_pullable(survivors, image, import_image(victim, image, tmp_path))
    before = {s.view()[victim.name]["incarnation"] for s in survivors}
    assert before == {victim.gossip()["incarnation"]}, "every peer agrees on its incarnation"
    (old_incarnation,) = before

    victim.spegeld.kill()
    killed = time.monotonic()
    dead_after: dict[str, float] = {}
    suspected: dict[str, float] = {}
    deadline = killed + DEAD_WITHIN
    while len(dead_after) < len(survivors):
        for survivor in survivors:
            if survivor.name in dead_after:
                continue
            entry = survivor.view()[victim.name]
            if entry["state"] == "suspect":
                suspected.setdefault(survivor.name, time.monotonic() - killed)
            elif entry["state"] == "dead":
                dead_after[survivor.name] = time.monotonic() - killed
                # Its keys left with it: nothing routes to it any more.
                assert entry["keys"] == 0
                assert manifest_by_tag(survivor.spegeld, image)[0] == 404
                assert blob(survivor.spegeld, image, image.platforms[0].layers[0])[0] == 404
            else:
                assert entry["state"] == "alive", entry
        if len(dead_after) < len(survivors):
            assert time.monotonic() < deadline, (
                f"{victim.name} not dead everywhere {DEAD_WITHIN} s after SIGKILL: {dead_after}"
            )
            time.sleep(POLL)
    print(
        f"[gossip] {victim.name} killed: dead after "
        f"{', '.join(f'{k} {v:.2f} s' for k, v in sorted(dead_after.items()))} "
        f"(suspicion {SUSPICION:.1f} s, bound {DEAD_WITHIN:.1f} s; first seen suspect after "
        f"{min(suspected.values(), default=math.nan):.2f} s by {len(suspected)})"
    )
    # SWIM suspects before it declares dead: nobody skipped the suspicion period, and
    # nobody waited much longer than it once the victim was suspected.
    first_suspected = min(suspected.values(), default=min(dead_after.values()))
    assert first_suspected <= SUSPECTED_WITHIN
    assert min(dead_after.values()) >= SUSPICION - 0.25
    for name, after in dead_after.items():
        assert after - first_suspected <= SUSPICION + DEAD_MARGIN, (name, after)
    assert max(dead_after.values()) <= DEAD_WITHIN
    assert unknown_everywhere(survivors, image)
    for survivor in survivors:
        gossip = survivor.gossip()
        assert gossip["members"] == {"alive": 3, "dead": 1}
        assert gossip["packets"]["dropped"] == {}

    # Same node, same containerd, same addresses: a new process, a new incarnation.
    reborn = SpegeldProcess(
        victim.spegeld.base_dir, victim.containerd, host=victim.spegeld.host,
        port=victim.spegeld.port, gossip_port=victim.spegeld.gossip_port,
        peer_port=victim.spegeld.peer_port,
        key_file=cluster.key, peers=[cluster.nodes[0].spegeld.gossip_address],
        extra_args=LONE_HOLDER_TAGS,
    )  # fmt: skip
    victim.spegeld = reborn
    restarted = time.monotonic()
    reborn.start()
    ready_after = time.monotonic() - restarted
    started_with = victim.gossip()["incarnation"]
    assert started_with > old_incarnation
    current = {"incarnation": started_with}

    def rejoined() -> bool:
        # Compare with the node's own incarnation as it is now: the restarted node may
        # have had to refute a suspicion since it started (each refutation adds 1).
        current["incarnation"] = own = victim.gossip()["incarnation"]
        views = [s.view()[victim.name] for s in survivors]
        return all(v["state"] == "alive" and v["incarnation"] == own for v in views)

    try:
        rejoin = wait_for(rejoined, CONVERGE_WITHIN, f"{victim.name} to rejoin everywhere")
    except AssertionError as exc:
        views = {s.name: s.view()[victim.name] for s in survivors}
        raise AssertionError(f"{exc}: it says {current}, peers see {views}") from None
    new_incarnation = current["incarnation"]
    assert new_incarnation > old_incarnation
    wait_for(lambda: all_alive(cluster.nodes), CONVERGE_WITHIN, "the whole cluster alive again")
    assert victim.gossip()["members"] == {"alive": len(survivors)}
    # It still holds the image in its containerd, and says so again.
    again = time_until_pullable(survivors, image, time.monotonic())
    print(
        f"[gossip] restart: ready {ready_after:.2f} s after the start, alive with "
        f"incarnation {old_incarnation} -> {new_incarnation} everywhere {rejoin:.2f} s later "
        f"(started with {started_with}: {new_incarnation - started_with} refutation(s)); "
        f"its image pullable again after {max(again.values()):.2f} s"
    )


def test_a_node_without_the_cluster_key_is_isolated(cluster: Cluster, tmp_path: Path) -> None:
    members = cluster.nodes
    seeds = [n.spegeld.gossip_address for n in members]
    wrong_key = write_cluster_key(tmp_path / "other.key")  # same key id 1, another secret
    forger = cluster.node("forger", "127.0.0.7", key_file=wrong_key, peers=seeds, live_only=True)
    lab = cluster.node("lab", "127.0.0.8", key_file=None, peers=seeds, live_only=True)
    cluster.start([forger, lab])
    images = {
        forger.name: build_image("example.com/team/forged:v1", [50_000], seed=503),
        lab.name: build_image("example.com/team/lab:v1", [50_000], seed=504),
    }
    for outsider in (forger, lab):
        image = images[outsider.name]
        import_image(outsider, image, tmp_path)
        # The outsider holds it, serves it itself, and tries to tell the cluster.
        wait_for(lambda: pullable(outsider.spegeld, image), 10, f"{outsider.name} to index")  # noqa: B023
        assert outsider.gossip()["own_keys"] == len(image.digests()) + 1

    # Watch for several join retries, gossip rounds and anti-entropy rounds.
    watch_until = time.monotonic() + 3 * T.join_retry + 2 * T.sync_interval
    polls = 0
    while time.monotonic() < watch_until:
        polls += 1
        for member in members:
            assert not {forger.name, lab.name} & set(member.view()), member.name
            for image in images.values():
                assert manifest_by_tag(member.spegeld, image)[0] == 404
                assert blob(member.spegeld, image, image.platforms[0].layers[0])[0] == 404
        time.sleep(POLL)
    assert polls > 10
    counted = {m.name: m.gossip()["packets"]["dropped"] for m in members}
    print(f"\n[gossip] outsiders' datagrams dropped over {polls} polls: {counted}")
    for member in members:
        gossip = member.gossip()
        assert gossip["members"] == {"alive": len(members) - 1}
        dropped = gossip["packets"]["dropped"]
        assert dropped.get("bad_mac", 0) >= 2, (member.name, dropped)  # the forger's joins
        assert dropped.get("unknown_key", 0) >= 2, (member.name, dropped)  # the lab's (id 0)
        assert set(dropped) <= {"bad_mac", "unknown_key"}
    for outsider in (forger, lab):
        assert outsider.spegeld.get("/readyz")[0] == 503, "it never joined"
        assert outsider.gossip()["members"] == {}
        assert outsider.spegeld.get("/healthz")[0] == 200


# -- hostile datagrams -----------------------------------------------------------------------------


def read_secret(key_file: Path) -> bytes:
    key_id, _, secret = key_file.read_text().strip().partition(":")
    assert key_id == "1"
    return base64.b64decode(secret)


def authentic_oversize(secret: bytes, payload: bytes) -> bytes:
    """A datagram with a correct tag whose payload is too big to be sealed legitimately."""
    prefix = struct.pack(">2sBBII", b"SG", 1, 1, 99, 1)
    return prefix + hmac.digest(secret, prefix + payload, "sha256")[:16] + payload


def reason_for(keyring: Keyring, datagram: bytes) -> str | None:
    """Why the daemon must drop ``datagram`` (None: it would be accepted)."""
    try:
        opened = open_datagram(keyring, datagram)
    except DroppedPacket as exc:
        return exc.reason
    try:
        decode_payload(opened.payload)
    except RemoteProtocolError:
        return "malformed"
    return None


def header_shaped() -> st.SearchStrategy[bytes]:
    """Right magic and version, any key id and counters, a random tag and payload."""
    return st.builds(
        lambda key_id, incarnation, sequence, tag, payload: (
            struct.pack(">2sBBII", b"SG", 1, key_id, incarnation, sequence) + tag + payload
        ),
        st.integers(0, 255),
        st.integers(0, 2**32 - 1),
        st.integers(0, 2**32 - 1),
        st.binary(min_size=16, max_size=16),
        st.binary(max_size=1200),
    )


def authentic_junk(keyring: Keyring) -> st.SearchStrategy[bytes]:
    """Correctly sealed with the cluster key, but not a gossip payload."""
    leaf = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.binary(max_size=40)
    value = st.recursive(
        leaf | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=5), inner),
        max_leaves=12,
    )
    payloads = st.one_of(
        st.binary(max_size=200).map(lambda b: b"\xc1" + b),  # 0xc1 is never valid msgpack
        st.lists(value, min_size=1, max_size=4).map(
            lambda items: b"".join(msgpack.packb(i, use_bin_type=True) for i in items)
        ),
        st.lists(value, max_size=3).map(
            lambda items: (
                encode_sender("fuzzer")
                + b"".join(msgpack.packb(i, use_bin_type=True) for i in items)
            )
        ),
    )
    return st.builds(
        lambda inc, seq, payload: seal(keyring, inc, seq, payload[:1100]),
        st.integers(0, 2**32 - 1),
        st.integers(0, 2**32 - 1),
        payloads,
    )


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Cluster]:
    cluster, _ = start_cluster(tmp_path, 2)
    try:
        yield cluster
    finally:
        cluster.close()


def test_hostile_datagrams_are_dropped_and_counted_and_the_daemon_carries_on(
    pair: Cluster, tmp_path: Path
) -> None:
    target, peer = pair.nodes
    secret = read_secret(pair.key)
    keyring = Keyring([(1, secret)])
    wrong = Keyring([(1, os.urandom(32))])
    rotated = Keyring([(2, secret)])  # the right secret under an id the cluster lacks
    gossip_addr = (target.spegeld.host, target.spegeld.gossip_port)
    name = target.name
    expected: Counter[str] = Counter()
    baseline = target.gossip()["packets"]
    assert baseline["dropped"] == {}

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as attacker:
        attacker.bind((ATTACKER_HOST, 0))
        attacker.settimeout(2.0)

        def send(datagram: bytes, reason: str | None) -> None:
            attacker.sendto(datagram, gossip_addr)
            if reason is not None:
                expected[reason] += 1
            time.sleep(0.001)  # pace: the daemon's receive buffer is not the subject here

        def no_reply() -> None:
            attacker.settimeout(0.3)
            try:
                data, _ = attacker.recvfrom(65536)
            except TimeoutError:
                return
            finally:
                attacker.settimeout(2.0)
            raise AssertionError(f"a dropped datagram was answered: {data!r}")

        # Replay: real datagrams sealed with the cluster key by a sender the daemon has
        # never met. The first copy of each is answered; every second copy is a replay.
        def ping(sender: str, incarnation: int, sequence: int) -> bytes:
            payload = encode_sender(sender) + encode_message(Ping(sequence))
            return seal(keyring, incarnation, sequence, payload)

        captured = [ping("visitor", 7, sequence) for sequence in range(1, 6)]
        for sequence, datagram in enumerate(captured, start=1):
            send(datagram, None)
            reply, source = attacker.recvfrom(65536)
            assert source == gossip_addr
            opened = open_datagram(keyring, reply)  # the daemon's reply is properly sealed
            sender, messages = decode_payload(opened.payload)
            assert sender == name and Ack(sequence) in messages
        for datagram in captured:
            send(datagram, "replay")
        send(ping("visitor", 6, 100), "replay")  # an older incarnation, a fresh sequence
        no_reply()
        send(ping(name, 1, 1), "self")  # the daemon's own name, with the right key
        no_reply()

        # Forged: the whole story of a member "mallory" holding content, under wrong keys.
        claimed = "sha256:" + os.urandom(32).hex()
        forged_payload = (
            encode_sender("mallory")
            + encode_message(Join(Member("mallory", 1, State.ALIVE, ("127.0.0.9", 1), "127.0.0.9:1", 1)))
            + encode_message(Delta("mallory", 1, (claimed,), ()))
        )  # fmt: skip
        send(seal(wrong, 1, 1, forged_payload), "bad_mac")
        send(seal(rotated, 1, 2, forged_payload), "unknown_key")
        send(seal(Keyring.insecure(), 1, 3, forged_payload), "unknown_key")
        tampered = bytearray(seal(keyring, 1, 4, forged_payload))
        tampered[-1] ^= 1  # a real seal, one payload bit flipped in flight
        send(bytes(tampered), "bad_mac")

        # Oversize: over 1200 bytes is dropped before anything else, even with a good tag.
        send(authentic_oversize(secret, encode_sender("visitor") + encode_message(Ping(9)) + b"\0" * 1200), "oversize")  # fmt: skip
        send(captured[0] + b"\0" * (MAX_DATAGRAM + 1 - len(captured[0])), "oversize")
        send(os.urandom(MAX_DATAGRAM + 1), "oversize")
        send(os.urandom(8000), "oversize")
        no_reply()

        # Malformed: short, wrong magic, wrong version, authentic but not gossip.
        send(b"", "malformed")
        send(b"SG", "malformed")
        send(b"XX" + captured[0][2:], "malformed")
        send(captured[0][:2] + b"\x02" + captured[0][3:], "malformed")
        send(captured[0][: HEADER_SIZE - 1], "malformed")
        send(seal(keyring, 1, 5, b"\xc1"), "malformed")

        # Hypothesis: whatever the bytes, the reason is the one the framing rules give.
        sent = Counter[str]()

        @FUZZ
        @given(
            st.one_of(
                st.binary(max_size=1400),
                st.binary(min_size=MAX_DATAGRAM + 1, max_size=4 * MAX_DATAGRAM),
                header_shaped(),
                authentic_junk(keyring),
                authentic_junk(wrong),
            )
        )
        def fuzz(datagram: bytes) -> None:
            reason = reason_for(keyring, datagram)
            assume(reason is not None)
            assert reason is not None
            sent[reason] += 1
            send(datagram, reason)

        fuzz()
        print(f"\n[gossip] fuzzed datagrams by expected reason: {dict(sent)}")
        assert {"malformed", "oversize", "unknown_key", "bad_mac"} <= set(sent)
        no_reply()

    def counted() -> bool:
        return Counter(target.gossip()["packets"]["dropped"]) == expected

    try:
        wait_for(counted, 10, "every hostile datagram to be counted")
    finally:
        print(f"[gossip] dropped, as counted by {name}: {target.gossip()['packets']['dropped']}")
    assert target.gossip()["packets"]["in"] - baseline["in"] >= expected.total()

    # The daemon is up, still ready, and still gossips.
    assert target.spegeld.pid is not None
    assert target.spegeld.get("/healthz")[0] == 200
    assert target.spegeld.get("/readyz")[0] == 200
    assert set(target.view()) == {peer.name}, "no visitor, no mallory"
    assert target.view()[peer.name]["state"] == "alive"
    assert peer.view()[name]["state"] == "alive"
    assert peer.gossip()["packets"]["dropped"] == {}
    assert target.spegeld.get(f"/v2/team/app/blobs/{claimed}?ns=example.com")[0] == 404
    image = build_image("example.com/team/after:v1", [60_000], seed=505)
    seen = time_until_pullable([target], image, import_image(peer, image, tmp_path))
    print(f"[gossip] after the assault: a new import pullable through it after {seen[name]:.2f} s")
    assert "Traceback" not in target.spegeld.log_path.read_text()


# -- member records a key holder should not be believed about ---------------------------------------


def test_malformed_member_records_are_ignored_and_counted_and_gossip_goes_on(
    pair: Cluster, tmp_path: Path
) -> None:
    """Issue 11: records that decode but no honest node could send, sealed with the right
    key (a buggy or hostile member), from a plain UDP socket to a real daemon."""
    target, peer = pair.nodes
    keyring = Keyring([(1, read_secret(pair.key))])
    gossip_addr = (target.spegeld.host, target.spegeld.gossip_port)
    name = target.name
    incarnation = target.gossip()["incarnation"]
    mallory = (ATTACKER_HOST, 7946)

    def record(node: str, **fields: Any) -> Member:
        values: dict[str, Any] = {
            "incarnation": incarnation, "state": State.ALIVE, "addr": mallory,
            "mirror": f"{ATTACKER_HOST}:5000", "version": incarnation << 20,
        }  # fmt: skip
        values.update(fields)
        return Member(node, **values)

    rejected = {
        "registry": [record("m-port", mirror=f"{ATTACKER_HOST}:http")],  # non-numeric port
        "incarnation": [
            record("m-huge", incarnation=0xFFFF_FFFF),
            record(name, incarnation=0xFFFF_FFFF - 1, state=State.SUSPECT),  # push us
            record(peer.name, incarnation=0xFFFF_FFFF, state=State.DEAD),  # push a peer
        ],
        "address": [record("m-addr", addr=("garbage", 7946))],
        "name": [record("m bad;name")],
        "version": [record(peer.name, version=2**63 - 1)],
    }
    overlong = encode_sender("mallory") + msgpack.packb(
        [3, "m" * 300, incarnation, 0, ATTACKER_HOST, 7946, f"{ATTACKER_HOST}:5000", 0, False]
    )
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as attacker:
        attacker.bind((ATTACKER_HOST, 0))
        attacker.settimeout(2.0)
        sequence = 0
        for records in rejected.values():
            for bad in records:
                for message in (bad, Join(bad), Summary((bad,), True)):
                    sequence += 1
                    payload = encode_sender("mallory") + encode_message(message)
                    attacker.sendto(seal(keyring, 1, sequence, payload), gossip_addr)
        attacker.sendto(seal(keyring, 1, sequence + 1, overlong), gossip_addr)
        # A ping last: its ack says every datagram before it was read (one socket, in order).
        ping = encode_sender("mallory") + encode_message(Ping(4242))
        attacker.sendto(seal(keyring, 1, sequence + 2, ping), gossip_addr)
        others = []
        for _ in range(20):  # bounded: the ack comes first unless a member list was sent
            reply, _ = attacker.recvfrom(65536)
            _, messages = decode_payload(open_datagram(keyring, reply).payload)
            if Ack(4242) in messages:
                break
            others.append(messages)
        else:
            raise AssertionError("no ack for the final ping")
        assert others == [], "a rejected Join gets no member list"

    expected = {reason: 3 * len(records) for reason, records in rejected.items()}
    packets = target.gossip()["packets"]
    print(f"\n[gossip] hostile records rejected by {name}: {packets['rejected']}")
    assert packets["rejected"] == expected
    assert packets["dropped"] == {"malformed": 1}  # the 300-character name fails the codec
    for reason, count in expected.items():
        assert target.spegeld.metric(f'spegeld_gossip_rejected_total{{reason="{reason}"}}') == count
    assert target.spegeld.metric('spegeld_gossip_dropped_total{reason="malformed"}') == 1

    # Nothing believed: no new member, our incarnation and the peer's record unmoved.
    assert target.gossip()["incarnation"] == incarnation
    view = target.view()
    assert set(view) == {peer.name}
    assert view[peer.name]["state"] == "alive"
    assert view[peer.name]["incarnation"] < 0xFFFF_FFFF // 2
    assert view[peer.name]["version"] < 2**62
    # And it still gossips with its honest peer, both ways, keys included.
    image = build_image("example.com/team/honest:v1", [40_000], seed=506)
    seen = time_until_pullable([target], image, import_image(peer, image, tmp_path))
    print(
        f"[gossip] then an import on {peer.name} pullable through {name} after {seen[name]:.2f} s"
    )
    assert peer.view()[name]["state"] == "alive"
    # A state pull that races a join (the puller learnt of us from the seed before we learnt
    # of it) is not answered until the puller is a member: counted as "stranger", honest.
    honest_rejections = {k: v for k, v in peer.gossip()["packets"]["rejected"].items()
                         if k != "stranger"}  # fmt: skip
    assert peer.gossip()["packets"]["dropped"] == {} and honest_rejections == {}
    assert target.spegeld.pid is not None
    assert "Traceback" not in target.spegeld.log_path.read_text()


def test_a_saved_incarnation_at_the_u32_limit_starts_and_gossips(tmp_path: Path) -> None:
    """Issue 11: a member pushed this node to 0xFFFFFFFF and it was saved at shutdown; the
    next start (``saved + 1 = 2**32``) could not seal a datagram. Now it starts from the
    clock, gossips with a peer, and saves a value the start after can use too."""
    cluster = Cluster(tmp_path)
    seed = cluster.node("node-0", HOSTS[0], key_file=cluster.key, peers=())
    pushed = cluster.node(
        "node-1", HOSTS[1], key_file=cluster.key, peers=[seed.spegeld.gossip_address]
    )
    cluster.nodes += [seed, pushed]
    state = pushed.spegeld.base_dir / "state"
    state.mkdir(parents=True)
    (state / "incarnation").write_text("4294967295\n")
    try:
        before = int(time.time())
        cluster.start(cluster.nodes)
        wait_for(lambda: all_alive(cluster.nodes), CONVERGE_WITHIN, "the pushed node to join")
        own = pushed.gossip()["incarnation"]
        assert before <= own <= int(time.time()) + 10
        assert seed.view()[pushed.name]["incarnation"] == own
        assert "ahead of the wall clock" in pushed.spegeld.log_path.read_text()
        image = build_image("example.com/team/pushed:v1", [30_000], seed=507)
        time_until_pullable([seed], image, import_image(pushed, image, tmp_path))
        assert pushed.spegeld.stop() == 0
        saved = int((state / "incarnation").read_text())
        assert own <= saved < 0xFFFF_FFFF // 2
    finally:
        cluster.close()
    assert "Traceback" not in pushed.spegeld.log_path.read_text()
