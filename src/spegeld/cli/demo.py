"""``spegeld demo``: a real cluster on this machine, and an image rolled out across it.

Every node is a network namespace with its own containerd and its own spegeld; the
upstream is a Distribution registry behind a rate-limited link. Node 1 pulls a generated
image from the upstream; the others get it from their peers.
"""

from __future__ import annotations

from typing import Any

import click

from spegeld.cli._options import option

MiB = 1 << 20
# The harness is a separate distribution: a node (the Talos image, the standalone binary,
# `pip install spegeld`) does not carry it.
HARNESS_MISSING = (
    "spegeld demo needs the spegeld-harness package, which a node install leaves out; "
    "install it with: pip install 'spegeld[demo]' (from a source tree: pip install ./harness)"
)


def _parse_size(text: str) -> int:
    units = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "M": 1 << 20, "MB": 1 << 20,
             "G": 1 << 30, "GB": 1 << 30}  # fmt: skip
    number = text.strip().upper().rstrip("IB") if text.upper().endswith("IB") else text.upper()
    digits = number.rstrip("KMGB")
    unit = number[len(digits) :]
    if unit.endswith("I"):
        unit = unit[:-1]
    if not digits.isdigit() or unit not in units or int(digits) == 0:
        raise click.BadParameter(f"{text!r} is not a size like 100M or 512K")
    return int(digits) * units[unit]


@click.command()
@option("--nodes", type=click.IntRange(min=1, max=20), default=3, show_default=True,
        help="Cluster size.")  # fmt: skip
@option("--image-size", default="100M", show_default=True,
        help="Total layer bytes of the generated image (e.g. 10M, 100M, 1G).")  # fmt: skip
@option("--layers", type=click.IntRange(min=1, max=16), default=4, show_default=True,
        help="Layers the image is split into.")  # fmt: skip
@option("--upstream-rate", default="100mbit", show_default=True,
        help="The upstream link's rate limit (tc tbf syntax).")  # fmt: skip
@option("--keep", is_flag=True, help="Leave the cluster running and print how to poke at it.")
@option("--clean", is_flag=True, help="Only tear down what an earlier --keep left running.")
def demo(
    nodes: int, image_size: str, layers: int, upstream_rate: str, keep: bool, clean: bool
) -> None:
    """Build a cluster on this machine and roll an image out across it (needs root)."""
    from rich.console import Console

    from spegeld.cli._root import fail

    try:
        from spegeld_harness import HarnessUnavailable, clean_leftovers, missing_requirement
    except ImportError:
        fail(HARNESS_MISSING)
        return

    size = _parse_size(image_size)
    console = Console(markup=False, highlight=False)
    problem = missing_requirement()
    if problem is not None:
        fail(problem)
    if clean:
        cleaned = clean_leftovers(include_kept=True)
        console.print(f"cleaned up: {', '.join(cleaned) or 'nothing was left'}")
        return
    try:
        results, scale_out, cluster = _run(console, nodes, size, layers, upstream_rate, keep)
    except HarnessUnavailable as exc:
        fail(str(exc))
        return
    _summary(console, results, size)
    if scale_out is not None:
        _scale_out_summary(console, *scale_out, size)
    if keep:
        _how_to_poke(console, cluster)


def _run(
    console: Any, nodes: int, size: int, layers: int, rate: str, keep: bool
) -> tuple[list[Any], tuple[list[Any], int] | None, Any]:
    """The rollout's pulls one node after another, then (with more than one node) v2
    pulled by every node at once, and the cluster."""
    from rich.progress import Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
    from spegeld_harness import Cluster, build_image

    progress = Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console
    )
    current: list[TaskID] = []

    def step(text: str) -> None:
        if current:
            progress.update(current[-1], completed=1, total=1)
        current.append(progress.add_task(text, total=None))

    results: list[Any] = []
    scale_out = None
    with progress:
        step(f"building a {nodes}-node cluster, upstream limited to {rate}")
        cluster = Cluster(nodes_wanted=nodes, upstream_rate=rate, keep=keep,
                          progress=lambda m: progress.console.print(f"  {m}"))  # fmt: skip
        with cluster:
            step(f"generating a {size / MiB:.0f} MiB image in {layers} layers")
            per_layer = max(1, size // layers)
            image = build_image("demo.local/app:v1", [per_layer] * layers, seed=None)
            step("pushing it to the upstream registry")
            reference = cluster.push(image, "demo/app", "v1")
            first, *others = cluster.nodes
            step(f"{first.name} pulls {reference} (nobody has it: from the upstream)")
            results.append(cluster.pull(first, reference))
            if others:
                step("waiting for gossip to tell the others who holds it")
                cluster.wait_findable(reference, image, others)
            for node in others:
                step(f"{node.name} pulls it (from its peers)")
                results.append(cluster.pull(node, reference))
            if others:
                step(f"generating v2, another {size / MiB:.0f} MiB with no layer in common")
                v2 = build_image("demo.local/app:v2", [per_layer] * layers, seed=None)
                reference = cluster.push(v2, "demo/app", "v2")
                step(f"every node pulls {reference} at the same moment (a scale-out)")
                scale_out = _all_at_once(cluster, reference)
            step("done")
            progress.update(current[-1], completed=1, total=1)
    return results, scale_out, cluster


def _all_at_once(cluster: Any, reference: str) -> tuple[list[Any], int]:
    """Every node pulls ``reference`` at once: their results, and the upstream's bytes."""
    from concurrent.futures import ThreadPoolExecutor

    mark = cluster.upstream.log_position()
    with ThreadPoolExecutor(max_workers=len(cluster.nodes)) as pool:
        pulled = list(pool.map(lambda node: cluster.pull(node, reference), cluster.nodes))
    return pulled, cluster.upstream.blob_bytes_served(mark)


def _summary(console: Any, results: list[Any], size: int) -> None:
    from rich.table import Table

    table = Table(title="pulls, one node after another")
    for column, justify in (("node", "left"), ("pull time", "right"),
                            ("from peers", "right"), ("from upstream", "right")):  # fmt: skip
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for r in results:
        table.add_row(r.node, f"{r.seconds:.2f} s", f"{r.from_peers / MiB:.1f} MiB",
                      f"{r.from_upstream / MiB:.1f} MiB")  # fmt: skip
    console.print(table)
    upstream = sum(r.from_upstream for r in results)
    console.print(
        f"{len(results)} pulls of a {size / MiB:.0f} MiB image; the upstream served "
        f"{upstream / MiB:.1f} MiB ({upstream / size:.2f} copies)."
    )
    if len(results) > 1:
        first, rest = results[0].seconds, [r.seconds for r in results[1:]]
        console.print(
            f"from the upstream: {first:.2f} s; from peers: {sum(rest) / len(rest):.2f} s "
            f"on average ({first / (sum(rest) / len(rest)):.1f}x faster)."
        )


def _scale_out_summary(console: Any, pulled: list[Any], upstream: int, size: int) -> None:
    from rich.table import Table

    table = Table(title="v2: every node at the same moment")
    for column in ("node", "pull time", "from peers"):
        table.add_column(column, justify="left" if column == "node" else "right")
    for r in pulled:
        table.add_row(r.node, f"{r.seconds:.2f} s", f"{r.from_peers / MiB:.1f} MiB")
    console.print(table)
    console.print(
        f"{len(pulled)} pulls at once; the upstream served {upstream / MiB:.1f} MiB "
        f"({upstream / size:.2f} copies): one node fetched each layer from the upstream, "
        "and the others streamed it from that node's download as it landed."
    )


def _how_to_poke(console: Any, cluster: Any) -> None:
    console.print("\nthe cluster is still running. Try:")
    for node in cluster.describe():
        ns, mirror = node["netns"], node["registry"]  # the harness's key for a node's mirror
        console.print(f"  ip netns exec {ns} .venv/bin/spegeld status "
                      f"--registry-addr {mirror.removeprefix('http://')}")  # fmt: skip
    first = cluster.describe()[0]
    console.print(
        f"  ip netns exec {first['netns']} .venv/bin/spegeld doctor --only node,gossip "
        f"--containerd-sock {first['containerd']} --hosts-dir {first['hosts_dir']} "
        f"--registry-addr {first['registry'].removeprefix('http://')} "
        f"--cluster-key-file {cluster.base}/cluster.key --peer {first['address']}:7946"
    )
    console.print(
        f"  ip netns exec {first['netns']} curl -s {first['registry']}/metrics | grep spegel"
    )
    console.print("tear it down: .venv/bin/spegeld demo --clean")
