"""Rolling pull: Spegel's benchmark method on a real cluster on this machine.

Run as root (network namespaces, tc, containerd)::

    .venv/bin/python bench/rolling_pull.py                       # 10 MB and 100 MB, 1 and 4 layers
    .venv/bin/python bench/rolling_pull.py --sizes 100M --layers 4 --nodes 10 --v1 import
    .venv/bin/python bench/rolling_pull.py --sizes 1G --layers 1 --v1 import
    .venv/bin/python bench/rolling_pull.py --sizes 100M --layers 4 --nodes 5  # with Spegel
    .venv/bin/python bench/rolling_pull.py --containerd 1.6 --modes baseline,spegeld

Spegel (spegel.dev/docs/benchmark) creates a DaemonSet with image v1 on every node, then
updates it to v2, a different image with no layer in common, and reports the pull time of
each pod, with and without Spegel. Here each node is a network namespace with its own
containerd (``spegeld_harness.Cluster``); the upstream is a Distribution registry behind
a ``tc tbf`` link (100 Mbit/s by default). For every image (size x layers) and mode:

* **baseline**: a fresh cluster without spegeld: containerd pulls straight from the upstream;
* **spegeld**: a fresh cluster with a spegeld per node, hosts.toml from
  ``spegeld configure containerd``;
  Pulls are coordinated (docs/protocol.md §9, on by default): in the create phase (v1
  pulled by every node at once) one node fetches each layer upstream and the others
  follow its download;
* **spegeld-nocoord**: the same with ``--no-coordinate-pulls``: in-flight sharing only
  (§8), what the default was before;
* **spegel**: a fresh cluster with Spegel v0.7.4 per node (``bench/_spegel.py``: in the
  node's namespace, static bootstrap from node 1, hosts.toml from ``spegel configuration``).
  Skipped, with one line saying why, when its binary is not built or the nodes run 1.6.

Every node runs ``--containerd`` 2.3 (the build of ``scripts/build-components``; default)
or Debian's 1.6, the same in every mode of the run.

Each run pushes v1 and v2 (different seeds), then

1. **v1**: every node pulls v1 at once (threads): the create phase of a new workload.
   ``--v1 import`` instead puts v1 into each node's containerd with ``ctr images import``
   (saves 5 x 80 s of link time for 1 GB; v1 does not change v2's timing: no shared
   layers).
2. **v2**: a rolling update, ``--batch`` nodes at a time (1: maxUnavailable 20 % of 5 nodes),
   each batch's pulls at once; the next batch starts when the batch has pulled. With
   spegeld (and Spegel), before the next batch starts the script waits until the next
   batch's mirrors find v2's tag, config and every layer (gossip, or Spegel's DHT, has
   spread the holders' keys). That wait is reported apart (``wait before batch``) and not
   counted as pull time: in a real rollout it overlaps the pod's start-up and readiness,
   which take longer.

Every pull is a real ``ctr images pull`` in the node's namespace (2.3: through the
transfer service, which labels content with its distribution source as CRI does); its time,
the bytes the upstream served (its access log) and the bytes the node's mirror got from
peers (spegeld's /metrics; Spegel counts requests only: its mirror hits) are recorded.
The table gives per image and mode: average v2 pull time, its ratio to the baseline of the
same run, improvement = 1 - mode / baseline, the v2 pull time per batch, upstream bytes of
the v2 rollout (in copies of the image), and the v1 average. A second table gives the create
phase (v1 pulled): its average, ratio to the baseline and upstream copies. ``--json-out``
writes every pull.

With a rollout of one node at a time, the first node's pull has nobody to ask and takes as
long as the baseline's, so the improvement cannot exceed 1 - 1/N (80 % for N = 5). With
batches of b nodes sharing the link, 1 - b1^2 / sum(b_i^2) (``Case.ceiling``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import _spegel  # bench/_spegel.py, beside this script
from spegeld_harness import (
    BuiltImage,
    Cluster,
    HarnessUnavailable,
    Node,
    PullResult,
    build_image,
    missing_requirement,
)

MB = 1000 * 1000  # Spegel's images are 10 MB, 100 MB, 1 GB
MiB = 1 << 20
SPEGEL = {  # spegel.dev/docs/benchmark, v2 average pull time vs baseline (50 nodes, AKS)
    10 * MB: "70-89 %",
    100 * MB: "44-68 %",
    1000 * MB: "13-30 %",
}
SPEGEL_ANCHOR_100MB_4 = "62-68 %"  # DESIGN.md section 11
TARGET = 0.85
MODES = ("baseline", "spegeld", "spegel")  # and spegel@<duration>: another resolve timeout
OPTIONAL_MODES = ("spegeld-nocoord",)  # not in the default run
SPEGELD_ARGS = {"spegeld": (), "spegeld-nocoord": ("--no-coordinate-pulls",)}


def is_spegeld(mode: str) -> bool:
    return mode in SPEGELD_ARGS


def spegel_timeout(mode: str) -> str | None:
    """Spegel's ``--mirror-resolve-timeout`` for ``mode`` (None: not a Spegel mode)."""
    if mode == "spegel":
        return _spegel.RESOLVE_TIMEOUT
    return mode.removeprefix("spegel@") if mode.startswith("spegel@") else None


@dataclass
class Pull:
    node: str
    seconds: float
    from_peers: int
    from_upstream: int
    # Spegel's spegel_mirror_requests_total{cache="hit"|"miss"} during the pull
    mirror_hits: int = 0
    mirror_misses: int = 0

    @classmethod
    def of(cls, result: PullResult, hits: tuple[int, int] = (0, 0)) -> Pull:
        return cls(result.node, round(result.seconds, 3), result.from_peers,
                   result.from_upstream, *hits)  # fmt: skip


@dataclass
class Run:
    mode: str  # one of MODES, or spegel@<timeout>
    v1_mode: str  # "pull" or "import"
    v1: list[Pull] = field(default_factory=list)
    v1_seconds: float = 0.0  # wall time of the v1 phase
    v1_findable_seconds: float | None = None
    v2: list[list[Pull]] = field(default_factory=list)  # per batch
    # Upstream blob bytes per phase, from the registry's log. A pull's own from_upstream
    # counts every blob the upstream served while it ran, so concurrent pulls overlap.
    v1_upstream: int = 0
    v2_upstream_per_batch: list[int] = field(default_factory=list)
    gossip_waits: list[float] = field(default_factory=list)  # before batches 2..
    v2_wall_seconds: float = 0.0  # first pull's start to last pull's end, waits included
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    setup_seconds: float = 0.0

    @property
    def v2_pulls(self) -> list[Pull]:
        return [p for batch in self.v2 for p in batch]

    def v2_avg(self) -> float:
        return statistics.fmean(p.seconds for p in self.v2_pulls)

    def v1_avg(self) -> float | None:
        return statistics.fmean(p.seconds for p in self.v1) if self.v1 else None

    def v1_peers(self) -> int:
        return sum(p.from_peers for p in self.v1)

    def v2_upstream(self) -> int:
        return sum(self.v2_upstream_per_batch)

    def v2_peers(self) -> int:
        return sum(p.from_peers for p in self.v2_pulls)


@dataclass
class Case:
    size: int
    layers: int
    nodes: int
    batch: int
    image_bytes: int  # compressed layers + config: what one pull fetches as blobs
    runs: list[Run] = field(default_factory=list)

    def runs_of(self, mode: str) -> list[Run]:
        return [r for r in self.runs if r.mode == mode]

    def avg(self, mode: str) -> float | None:
        runs = self.runs_of(mode)
        return statistics.fmean(r.v2_avg() for r in runs) if runs else None

    def improvement(self, mode: str = "spegeld") -> float | None:
        base, other = self.avg("baseline"), self.avg(mode)
        return None if base is None or other is None else 1 - other / base

    def ceiling(self) -> float:
        """The best improvement possible if peer pulls took no time at all.

        The first batch has nobody to ask: its b1 pulls share the upstream link, as in the
        baseline, where every batch's b_i pulls take b_i x T each. So the average can at
        best fall by 1 - b1^2 / sum(b_i^2): 1 - 1/N one node at a time.
        """
        sizes = [min(self.batch, self.nodes - i) for i in range(0, self.nodes, self.batch)]
        return 1 - sizes[0] ** 2 / sum(b * b for b in sizes)


def parse_size(text: str) -> int:
    units = {"K": 1000, "M": MB, "G": 1000 * MB}
    text = text.strip().upper().removesuffix("B")
    unit = units.get(text[-1:], 1)
    digits = text[:-1] if text[-1:] in units else text
    if not digits.isdigit() or int(digits) == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 10M, 100M or 1G")
    return int(digits) * unit


def size_label(size: int) -> str:
    return f"{size // (1000 * MB)} GB" if size >= 1000 * MB else f"{size // MB} MB"


def blob_bytes(image: BuiltImage) -> int:
    plat = image.platforms[0]
    return sum(image.blobs[d].size for d in (*plat.layers, plat.config))


def check_pulled(node: Node, image: BuiltImage) -> None:
    """Every layer of ``image`` is in the node's content store at its full size."""
    for digest in image.platforms[0].layers:
        path = node.containerd.blob_path(digest)
        if not path.is_file() or path.stat().st_size != image.blobs[digest].size:
            raise RuntimeError(f"{node.name}: layer {digest} missing after the pull")


def say(text: str) -> None:
    print(text, flush=True)


def run_mode(
    args: argparse.Namespace, case: Case, v1: BuiltImage, v2: BuiltImage, mode: str, tmp: Path
) -> Run:
    run = Run(mode=mode, v1_mode=args.v1, load_before=os.getloadavg())
    started = time.monotonic()
    with Cluster(
        nodes_wanted=case.nodes,
        upstream_rate=args.upstream_rate,
        with_spegeld=is_spegeld(mode),
        spegeld_args=SPEGELD_ARGS.get(mode, ()),
        base_dir=tmp / f"cluster-{mode}",
        containerd_bin_dir=args.containerd_dir,
    ) as cluster:
        spegels: list[_spegel.SpegelNode] = []
        try:
            timeout = spegel_timeout(mode)
            if timeout is not None:
                (tmp / "spegel").mkdir(exist_ok=True)
                spegels = _spegel.start_on_cluster(
                    args.spegel, cluster, tmp / "spegel", resolve_timeout=timeout
                )
            _rollout(args, case, cluster, spegels, run, (v1, v2), tmp, started)
        finally:
            for spegel in spegels:
                spegel.stop()
            if spegels:
                say(f"    Spegel errors logged: {_spegel_errors(spegels)}")
    run.load_after = os.getloadavg()
    shutil.rmtree(tmp / f"cluster-{mode}", ignore_errors=True)
    shutil.rmtree(tmp / "spegel", ignore_errors=True)
    return run


def _rollout(
    args: argparse.Namespace,
    case: Case,
    cluster: Cluster,
    spegels: list[_spegel.SpegelNode],
    run: Run,
    images: tuple[BuiltImage, BuiltImage],
    tmp: Path,
    started: float,
) -> None:
    """v1 everywhere, then v2 batch by batch (with ``spegels``: Spegel's mirrors)."""
    v1, v2 = images
    ref1 = cluster.push(v1, "bench/app", "v1")
    ref2 = cluster.push(v2, "bench/app", "v2")
    run.setup_seconds = round(time.monotonic() - started, 1)
    nodes = cluster.nodes
    upstream = cluster.upstream
    assert upstream is not None
    spegel_of = {n.name: s for n, s in zip(nodes, spegels, strict=False)}

    def hits(node: Node) -> tuple[int, int]:
        spegel = spegel_of.get(node.name)
        if spegel is None:
            return 0, 0
        name = "spegel_mirror_requests_total"
        return int(spegel.metric_sum(name, 'cache="hit"')), int(
            spegel.metric_sum(name, 'cache="miss"')
        )

    def pull(node: Node, ref: str) -> Pull:
        hits0, misses0 = hits(node)
        result = cluster.pull(node, ref)
        hits1, misses1 = hits(node)
        return Pull.of(result, (hits1 - hits0, misses1 - misses0))

    def wait_findable(ref: str, image: BuiltImage, batch: list[Node]) -> None:
        if is_spegeld(run.mode):
            cluster.wait_findable(ref, image, batch, timeout=60)
        elif spegels:  # the tag only: see _spegel.wait_findable
            _spegel.wait_findable([spegel_of[n.name] for n in batch], ref, timeout=60)

    mark = upstream.log_position()
    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=len(nodes)) as pool:
        if args.v1 == "pull":
            run.v1 = list(pool.map(lambda n: pull(n, ref1), nodes))
            for node in nodes:
                check_pulled(node, v1)
        else:
            archive = tmp / "v1.tar"
            if not archive.exists():
                v1.write_oci_archive(archive)
            list(pool.map(lambda n: n.containerd.import_image(archive), nodes))
    run.v1_seconds = round(time.monotonic() - t0, 2)
    run.v1_upstream = upstream.blob_bytes_served(mark)
    if args.create_only:
        return
    if run.mode != "baseline":
        t0 = time.monotonic()
        wait_findable(ref1, v1, nodes)
        run.v1_findable_seconds = round(time.monotonic() - t0, 2)
    batches = [nodes[i : i + case.batch] for i in range(0, len(nodes), case.batch)]
    t_first = time.monotonic()
    for i, batch in enumerate(batches):
        if i and run.mode != "baseline":
            t0 = time.monotonic()
            wait_findable(ref2, v2, batch)
            run.gossip_waits.append(round(time.monotonic() - t0, 2))
        mark = upstream.log_position()
        with ThreadPoolExecutor(max_workers=len(batch)) as pool:
            pulled = list(pool.map(lambda n: pull(n, ref2), batch))
        run.v2.append(pulled)
        run.v2_upstream_per_batch.append(upstream.blob_bytes_served(mark))
        for node in batch:
            check_pulled(node, v2)
        say("    v2 " + ", ".join(_describe(p) for p in pulled))
    run.v2_wall_seconds = round(time.monotonic() - t_first, 2)


def _spegel_errors(spegels: list[_spegel.SpegelNode]) -> str:
    """Spegel's ERROR log lines, counted by node and message: why a pull missed."""
    found: dict[str, int] = {}
    for spegel in spegels:
        for line in spegel.log.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("level") == "ERROR":
                key = f"{spegel.name}: {entry.get('msg')} ({str(entry.get('err'))[:80]})"
                found[key] = found.get(key, 0) + 1
    return "; ".join(f"{n} x {key}" for key, n in sorted(found.items())) or "none"


def run_case(args: argparse.Namespace, size: int, layers: int, work: Path) -> Case:
    tmp = Path(tempfile.mkdtemp(prefix=f"rolling-{size // MB}M-{layers}-", dir=work))
    try:
        per_layer = size // layers
        label = f"{size_label(size)} / {layers} layer{'s' if layers > 1 else ''}"
        say(f"== {label}: building v1 and v2 ({layers} x {per_layer / MB:.1f} MB, gzip 1)")
        big = size >= 200 * MB
        v1 = build_image("bench.local/app:v1", [per_layer] * layers, seed=size + layers,
                         workdir=tmp / "v1" if big else None)  # fmt: skip
        v2 = build_image("bench.local/app:v2", [per_layer] * layers, seed=size + layers + 7919,
                         workdir=tmp / "v2" if big else None)  # fmt: skip
        assert not set(v1.platforms[0].layers) & set(v2.platforms[0].layers)
        case = Case(size, layers, args.nodes, args.batch, blob_bytes(v2))
        for round_ in range(args.repeat):
            for mode in args.modes:
                say(f"  {mode} (round {round_ + 1}), load {_load()}")
                case.runs.append(run_mode(args, case, v1, v2, mode, tmp))
                r = case.runs[-1]
                waits = f", gossip waits {r.gossip_waits}" if r.gossip_waits else ""
                create = (f"v1 (create) avg {v1avg:.2f} s, upstream "
                          f"{r.v1_upstream / case.image_bytes:.2f} copies; "
                          if (v1avg := r.v1_avg()) is not None else "")  # fmt: skip
                rollout = ("" if args.create_only else f"v2 avg {r.v2_avg():.2f} s, upstream "
                           f"{r.v2_upstream() / case.image_bytes:.2f} copies{waits}")  # fmt: skip
                say(f"    -> {create}{rollout}")
        return case
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _describe(p: Pull) -> str:
    hits = f", Spegel hits {p.mirror_hits} misses {p.mirror_misses}" if p.mirror_hits else ""
    return (f"{p.node} {p.seconds:.2f} s (up {p.from_upstream / MiB:.1f} MiB, "
            f"peers {p.from_peers / MiB:.1f} MiB{hits})")  # fmt: skip


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f} %"


def _secs(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f} s"


def table(cases: list[Case], args: argparse.Namespace) -> str:
    """One row per image and mode; ratios against the baseline of the same run."""
    if args.create_only:
        return "\n".join(create_table(cases, args)[1:])
    v1_note = "imported" if args.v1 == "import" else "pulled"
    rows = [
        "| Image | Mode | v2 avg | / baseline | Improvement | Ceiling | v2 pull per batch | "
        f"v2 upstream | v2 from peers | wait before batch (avg, max) | v1 avg ({v1_note}) |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for c in cases:
        name = f"{size_label(c.size)}, {c.layers} layer{'s' if c.layers > 1 else ''}"
        base = c.avg("baseline")
        for mode in args.modes:
            runs = c.runs_of(mode)
            if not runs:
                continue
            avg = c.avg(mode)
            ratio = "-" if base is None or avg is None else f"{avg / base:.2f}"
            imp = "-" if mode == "baseline" else _pct(c.improvement(mode))
            per_batch = ", ".join(
                f"{statistics.fmean(p.seconds for r in runs for p in r.v2[i]):.2f}"
                for i in range(len(runs[0].v2))
            )
            up = statistics.fmean(r.v2_upstream() for r in runs)
            upstream = f"{up / MiB:.1f} MiB ({up / c.image_bytes:.2f}x)"
            if is_spegeld(mode):
                peers = f"{statistics.fmean(r.v2_peers() for r in runs) / MiB:.1f} MiB"
            elif spegel_timeout(mode) is not None:
                hits = statistics.fmean(sum(p.mirror_hits for p in r.v2_pulls) for r in runs)
                miss = statistics.fmean(sum(p.mirror_misses for p in r.v2_pulls) for r in runs)
                peers = f"{hits:.0f} hits, {miss:.0f} misses"
            else:
                peers = "-"
            waits = [w for r in runs for w in r.gossip_waits]
            wait = f"{statistics.fmean(waits):.2f} s, {max(waits):.2f} s" if waits else "-"
            v1s = [a for r in runs if (a := r.v1_avg()) is not None]
            v1 = _secs(statistics.fmean(v1s)) if v1s else "imported"
            rows.append(
                f"| {name} | {mode} | {_secs(avg)} | {ratio} | {imp} | {_pct(c.ceiling())} | "
                f"{per_batch} s | {upstream} | {peers} | {wait} | {v1} |"
            )
    notes = []
    for c in cases:
        spg = c.avg("spegeld")
        for mode in args.modes:
            spl = c.avg(mode) if spegel_timeout(mode) is not None else None
            if spg is not None and spl is not None:
                published = SPEGEL.get(c.size, "-")
                notes.append(f"{size_label(c.size)} / {c.layers}: spegeld / {mode} v2 avg "
                             f"{spg / spl:.2f} (Spegel published {published})")  # fmt: skip
    return "\n".join(rows + (["", *notes] if notes else []) + create_table(cases, args))


def create_table(cases: list[Case], args: argparse.Namespace) -> list[str]:
    """The create phase: every node pulls v1 at once (only when v1 was pulled)."""
    if args.v1 != "pull":
        return []
    rows = [
        "",
        "| Image | Mode | create avg | / baseline | Improvement | upstream copies (mean, max) "
        "| from peers |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for c in cases:
        name = f"{size_label(c.size)}, {c.layers} layer{'s' if c.layers > 1 else ''}"
        base_runs = c.runs_of("baseline")
        base = statistics.fmean(r.v1_avg() or 0.0 for r in base_runs) if base_runs else None
        for mode in args.modes:
            runs = c.runs_of(mode)
            if not runs:
                continue
            avg = statistics.fmean(r.v1_avg() or 0.0 for r in runs)
            ratio = "-" if not base else f"{avg / base:.2f}"
            imp = "-" if mode == "baseline" or not base else _pct(1 - avg / base)
            copies = [r.v1_upstream / c.image_bytes for r in runs]
            peers = (f"{statistics.fmean(r.v1_peers() for r in runs) / MiB:.1f} MiB"
                     if is_spegeld(mode) else "-")  # fmt: skip
            rows.append(
                f"| {name} | {mode} | {_secs(avg)} | {ratio} | {imp} | "
                f"{statistics.fmean(copies):.2f}, {max(copies):.2f} | {peers} |"
            )
    return rows


def verdict(cases: list[Case]) -> str:
    lines = ["| Target | Anchor | Measured | Verdict |", "|---|---|---|---|"]
    for c in cases:
        if c.size != 100 * MB or c.layers != 4:
            continue
        imp = c.improvement()
        spg = c.runs_of("spegeld")
        if imp is None or not spg:
            continue
        copies = max(r.v2_upstream() for r in spg) / c.image_bytes
        where = f"N = {c.nodes}, batch {c.batch}"
        lines.append(
            f"| >= 85 % faster, 100 MB / 4 layers ({where}) | Spegel {SPEGEL_ANCHOR_100MB_4} | "
            f"{_pct(imp)} (ceiling {_pct(c.ceiling())}) | "
            f"{'meets' if imp >= TARGET else 'misses'} |"
        )
        lines.append(
            f"| v2 upstream bytes = 1 copy ({where}) | baseline {c.nodes} copies | "
            f"{copies:.2f} copies | {'meets' if copies <= 1.02 else 'misses'} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=5, help="cluster size N (default 5)")
    parser.add_argument("--sizes", default="10M,100M", help="image sizes, e.g. 10M,100M,1G")
    parser.add_argument("--layers", default="1,4", help="layer counts, e.g. 1,4")
    parser.add_argument("--batch", type=int, default=1, help="v2 nodes per rollout step")
    parser.add_argument("--v1", choices=("pull", "import"), default="pull",
                        help="how v1 gets onto the nodes (import: ctr images import)")  # fmt: skip
    parser.add_argument("--modes", default=",".join(MODES),
                        help="baseline, spegeld, spegeld-nocoord (--no-coordinate-pulls), spegel, "
                             "spegel@200ms (its timeout)")  # fmt: skip
    parser.add_argument("--containerd", choices=("2.3", "1.6"), default="2.3",
                        help="every node's containerd: the 2.3 build, or Debian's 1.6")  # fmt: skip
    parser.add_argument("--repeat", type=int, default=1, help="runs per mode and image")
    parser.add_argument("--create-only", action="store_true",
                        help="only the create phase (v1 pulled by every node at once), no v2 "
                             "rollout: the 1 GB row without 5 x 80 s more of baseline")  # fmt: skip
    parser.add_argument("--upstream-rate", default="100mbit")
    parser.add_argument("--json-out", type=Path, help="write every pull here")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    try:
        sizes = [parse_size(s) for s in args.sizes.split(",")]
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    if not all(n.strip().isdigit() and 1 <= int(n) <= 16 for n in args.layers.split(",")):
        parser.error("--layers takes layer counts from 1 to 16, e.g. 1,4")
    layers = [int(n) for n in args.layers.split(",")]
    args.modes = args.modes.split(",")
    spegels = [m for m in args.modes if spegel_timeout(m) is not None]
    if not args.modes or not all(
        m in MODES + OPTIONAL_MODES or re.fullmatch(r"spegel@\d+m?s", m) for m in args.modes
    ):
        parser.error(
            "--modes takes some of baseline, spegeld, spegeld-nocoord, spegel, spegel@200ms"
        )
    if args.create_only and args.v1 != "pull":
        parser.error("--create-only measures v1's pull: not with --v1 import")
    if not 1 <= args.batch <= args.nodes or not 2 <= args.nodes <= 20:
        parser.error("need 2 <= nodes <= 20 and 1 <= batch <= nodes")
    args.containerd_dir = None
    if args.containerd == "2.3":
        args.containerd_dir, why = _spegel.component_path("containerd")
        if args.containerd_dir is None:
            print(f"rolling_pull: no containerd 2.3 ({why}); --containerd 1.6", file=sys.stderr)
            return 2
    args.spegel = None
    if spegels:
        args.spegel, why = _spegel.spegel_binary()
        if args.containerd == "1.6":
            why = "Spegel v0.7.4 is tested on containerd 2.x only; not run on 1.6 here"
        if args.spegel is None or args.containerd == "1.6":
            say(f"rolling_pull: Spegel skipped: {why}")
            args.modes = [m for m in args.modes if m not in spegels]
            if not args.modes:
                return 2
    problem = missing_requirement(args.containerd_dir)
    if problem is not None:
        print(f"rolling_pull: {problem}", file=sys.stderr)
        return 2

    uptime = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout
    say(f"start: {uptime.strip()}")
    say(f"machine: {os.cpu_count()} CPUs, Linux {platform.release()}, Python "
        f"{platform.python_version()}; N = {args.nodes}, batch {args.batch}, "
        f"upstream {args.upstream_rate}, v1 {args.v1}, containerd {args.containerd} "
        f"({args.containerd_dir or 'Debian, PATH'}), modes {', '.join(args.modes)}"
        + (f", Spegel {_spegel.VERSION} ({args.spegel})" if args.spegel else ""))  # fmt: skip
    disk = shutil.disk_usage(args.work_dir)
    say(f"disk free in {args.work_dir}: {disk.free / (1 << 30):.0f} GiB")
    wall = time.monotonic()
    cases: list[Case] = []
    try:
        for size in sizes:
            for n in layers:
                cases.append(run_case(args, size, n, args.work_dir))
    except (HarnessUnavailable, KeyboardInterrupt) as exc:
        print(f"rolling_pull: stopped: {exc or type(exc).__name__}", file=sys.stderr)
    finally:
        uptime_end = subprocess.run(["uptime"], capture_output=True, text=True,
                                    check=False).stdout  # fmt: skip
        say(f"end: {uptime_end.strip()}; wall {time.monotonic() - wall:.0f} s")
        if cases:
            say("")
            say(table(cases, args))
            if not args.create_only:
                say("")
                say(verdict(cases))
        if args.json_out is not None:
            out: dict[str, Any] = {
                "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "uptime_start": uptime.strip(),
                "uptime_end": uptime_end.strip(),
                "cases": [
                    {
                        **asdict(c),
                        "improvement": {}
                        if args.create_only
                        else {m: c.improvement(m) for m in args.modes},
                        "ceiling": c.ceiling(),
                        "v2_avg": {} if args.create_only else {m: c.avg(m) for m in args.modes},
                    }
                    for c in cases
                ],
            }
            args.json_out.write_text(json.dumps(out, indent=1))
    return 0 if cases else 1


if __name__ == "__main__":
    sys.exit(main())
