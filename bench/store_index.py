"""Benchmark spegeld's local index and its blob read paths against anchors in the same run.

Run as root (it starts a private containerd)::

    sudo .venv/bin/python bench/store_index.py            # 1000 images, 256 MiB blob
    sudo .venv/bin/python bench/store_index.py --quick    # smoke run: 100 images, 32 MiB

Part 1, the index.  N generated images (two small layers each: one of 16 shared base layers
and one of the image's own) are imported into a private containerd with ONE
``ctr images import``: the archive's ``index.json`` lists every manifest, each with its own
``io.containerd.image.name`` annotation, and ctr 1.6 makes an image of each.  Then it times
``ContainerdStore.sync()`` cold (a fresh store: every manifest is read) and warm (the same
store again: the document cache answers), reading documents from the content directory
and, with a content path that does not exist, through gRPC ``Content.Read``.  The anchor is
``ctr images ls`` plus ``ctr content ls`` on the same store: another process listing what
spegeld indexes (``ctr images ls`` also reads every manifest, for the SIZE column).

Part 2, blob reads.  One image with a big layer; the whole layer read through
``ContainerdClient.read`` (gRPC Content.Read over grpclib and trio-asyncio), through
``ContainerdStore.open`` (trio file reads of the content directory, and its gRPC fallback),
and, as the anchor, a plain synchronous read of the blob file in 1 MiB chunks.  Everything
is warm-cache: nothing is dropped from the page cache.  Timed passes only count bytes; one
more pass of each path hashes what it read and checks the sha256 against the digest.

Every figure is also printed as a ratio to its anchor: absolute times on shared machines
are noisy, ratios measured in one run much less so.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import json
import os
import platform
import pstats
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from spegeld_harness import (
    ANNOTATION_IMAGE_NAME,
    ANNOTATION_REF_NAME,
    PrivateContainerd,
    build_image,
    containerd_unavailable_reason,
)

from spegeld.containerd import ContainerdClient, open_containerd
from spegeld.oci import Digest, parse_digest
from spegeld.store import ContainerdStore

NAMESPACE = "k8s.io"
REGISTRY = "bench.example.com"
BASE_LAYERS = 16  # shared base layers; image i sits on base i % BASE_LAYERS
FILE_CHUNK = 1024 * 1024
MISSING_CONTENT_PATH = Path("/nonexistent/spegeld-bench/content")  # forces gRPC reads
OCI_LAYOUT = b'{"imageLayoutVersion":"1.0.0"}'
MIB = 1024 * 1024


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# -- generated images ------------------------------------------------------------------------


@dataclass
class ManyImages:
    """N small images sharing base layers, as one OCI archive's worth of blobs."""

    blobs: dict[str, bytes] = field(default_factory=dict)  # digest -> bytes
    entries: list[dict[str, Any]] = field(default_factory=list)  # index.json descriptors
    expected_tags: dict[str, str] = field(default_factory=dict)  # tag key -> manifest digest

    @property
    def expected_digests(self) -> set[str]:
        return set(self.blobs)


def generate_images(count: int, seed: int) -> ManyImages:
    """``count`` images of two 1-4 KiB layers: a shared base layer and the image's own.

    Layers come from :func:`build_image`; each image's manifest and config are then
    recomposed to put the shared base layer first.
    """
    rng = random.Random(seed)
    out = ManyImages()
    bases = []
    for b in range(min(BASE_LAYERS, count)):
        base = build_image(f"{REGISTRY}/bench/base-{b}:v1", [rng.randint(1024, 4096)], seed=seed)
        plat = base.platforms[0]
        layer = plat.layers[0]
        out.blobs[layer] = base.read_blob(layer)
        bases.append((base.blobs[layer], layer, plat.diff_ids[0]))
    for i in range(count):
        name = f"{REGISTRY}/bench/app-{i:05d}:v{i % 7}"
        own = build_image(name, [rng.randint(1024, 4096)], seed=seed)
        plat = own.platforms[0]
        base_info, base_layer, base_diff_id = bases[i % len(bases)]
        config = own.read_json(plat.config)
        config["rootfs"]["diff_ids"] = [base_diff_id, *plat.diff_ids]
        config["history"] = [{"created_by": "spegeld bench base"}, *config["history"]]
        config_bytes = canonical_json(config)
        config_digest = sha256_digest(config_bytes)
        manifest = own.read_json(plat.manifest)
        manifest["config"] = {
            "mediaType": own.media_types.config,
            "digest": config_digest,
            "size": len(config_bytes),
        }
        base_desc = {
            "mediaType": base_info.media_type,
            "digest": base_layer,
            "size": base_info.size,
        }
        manifest["layers"] = [base_desc, *manifest["layers"]]
        manifest_bytes = canonical_json(manifest)
        manifest_digest = sha256_digest(manifest_bytes)
        own_layer = plat.layers[0]
        out.blobs[own_layer] = own.read_blob(own_layer)
        out.blobs[config_digest] = config_bytes
        out.blobs[manifest_digest] = manifest_bytes
        out.entries.append(
            {
                "mediaType": own.media_types.manifest,
                "digest": manifest_digest,
                "size": len(manifest_bytes),
                "annotations": {ANNOTATION_IMAGE_NAME: own.name, ANNOTATION_REF_NAME: own.tag},
            }
        )
        out.expected_tags[own.name] = manifest_digest
    return out


def write_many_archive(images: ManyImages, path: Path) -> Path:
    """One OCI image-layout tar whose index.json names every image."""

    def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o644
        tar.addfile(info, io.BytesIO(data))

    index = {"schemaVersion": 2, "manifests": images.entries}
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        add(tar, "oci-layout", OCI_LAYOUT)
        add(tar, "index.json", json.dumps(index).encode())
        for digest, data in sorted(images.blobs.items()):
            add(tar, "blobs/sha256/" + digest.removeprefix("sha256:"), data)
    return path


# -- timing helpers --------------------------------------------------------------------------


@dataclass
class Timing:
    label: str
    seconds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def best(self) -> float:
        return min(self.seconds)


def time_ctr(containerd: PrivateContainerd, args: list[str], repeat: int) -> tuple[Timing, str]:
    """Wall time of a whole ``ctr`` process (start-up included), and its last output."""
    argv = ["ctr", "--address", str(containerd.socket), "-n", NAMESPACE, *args]
    times = []
    out = ""
    for _ in range(repeat):
        t0 = time.perf_counter()
        res = subprocess.run(argv, capture_output=True, check=True)
        times.append(time.perf_counter() - t0)
        out = res.stdout.decode()
    return Timing("ctr " + " ".join(args), times), out


async def time_async(repeat: int, fn: Callable[[], Awaitable[object]]) -> list[float]:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        await fn()
        times.append(time.perf_counter() - t0)
    return times


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:9.1f}"


# -- part 1: the index -----------------------------------------------------------------------


@dataclass
class IndexResults:
    timings: list[tuple[Timing, bool]]  # (timing, is_anchor)
    tags: int
    digests: int
    checks: list[str]
    profiles: dict[str, str]


def check_snapshot(store: ContainerdStore, images: ManyImages, label: str) -> list[str]:
    snap = store.list()
    problems = []
    if dict(snap.tags) != images.expected_tags:
        problems.append(
            f"{label}: {len(snap.tags)} tags, expected {len(images.expected_tags)}"
            f" ({len(set(snap.tags) ^ set(images.expected_tags))} differ)"
        )
    if set(snap.digests) != images.expected_digests:
        problems.append(
            f"{label}: {len(snap.digests)} digests, expected {len(images.expected_digests)}"
        )
    return problems


def profile_text(profile: cProfile.Profile, limit: int) -> str:
    buf = io.StringIO()
    stats = pstats.Stats(profile, stream=buf)
    stats.sort_stats("tottime").print_stats(limit)
    return buf.getvalue()


async def measure_index(
    containerd: PrivateContainerd, images: ManyImages, repeat: int, profile: bool
) -> IndexResults:
    timings: list[tuple[Timing, bool]] = []
    checks: list[str] = []
    profiles: dict[str, str] = {}
    tags = digests = 0
    async with open_containerd(containerd.socket, NAMESPACE) as client:
        await client.version()  # connect before timing anything

        async def lists() -> None:
            await client.list_images()
            await client.list_content()

        for content_path, how in (
            (containerd.content_path, "files"),
            (MISSING_CONTENT_PATH, "gRPC Content.Read"),
        ):
            stores: list[ContainerdStore] = []

            async def cold(content_path: Path = content_path, stores: list = stores) -> None:
                store = ContainerdStore(client, content_path)
                await store.sync()
                stores.append(store)

            cold_times = await time_async(repeat, cold)
            warm_store = stores[-1]
            assert warm_store.statistics().direct_reads == (how == "files")
            warm_times = await time_async(repeat, warm_store.sync)
            checks += check_snapshot(warm_store, images, f"sync ({how})")
            stats = warm_store.statistics()
            tags, digests = stats.tags, stats.digests
            timings.append((Timing(f"spegeld sync, cold ({how})", cold_times), False))
            timings.append((Timing(f"spegeld sync, warm ({how})", warm_times), False))
            if profile:
                for kind in ("cold", "warm"):
                    store = warm_store if kind == "warm" else ContainerdStore(client, content_path)
                    prof = cProfile.Profile()
                    prof.enable()
                    await store.sync()
                    prof.disable()
                    profiles[f"{kind} sync ({how})"] = profile_text(prof, 25)

        list_times = await time_async(repeat, lists)
        timings.append((Timing("spegeld Images.List + Content.List alone", list_times), False))
    return IndexResults(timings, tags, digests, checks, profiles)


def run_index_part(args: argparse.Namespace, work: Path) -> IndexResults:
    print(f"== Part 1: index of {args.images} images", flush=True)
    t0 = time.perf_counter()
    images = generate_images(args.images, args.seed)
    archive = write_many_archive(images, work / "many.tar")
    t_build = time.perf_counter() - t0
    print(
        f"   built {len(images.entries)} images, {len(images.blobs)} blobs,"
        f" archive {archive.stat().st_size / MIB:.1f} MiB in {t_build:.1f}s",
        flush=True,
    )
    containerd = PrivateContainerd(namespace=NAMESPACE)
    try:
        containerd.start()
        t0 = time.perf_counter()
        containerd.import_image(archive, gc=True)
        t_import = time.perf_counter() - t0
        names = containerd.images()
        content = containerd.content_digests()
        print(
            f"   one ctr import: {len(names)} images, {len(content)} blobs in {t_import:.1f}s",
            flush=True,
        )
        if set(names) != set(images.expected_tags) or content != images.expected_digests:
            raise SystemExit(
                "ctr import did not create every image of the archive"
                f" ({len(names)} images, {len(content)} blobs); containerd too old?"
            )
        archive.unlink()
        results = trio.run(measure_index, containerd, images, args.repeat, args.profile)
        ls_images, out_images = time_ctr(containerd, ["images", "ls"], args.repeat)
        ls_content, out_content = time_ctr(containerd, ["content", "ls"], args.repeat)
        if len(out_images.splitlines()) != len(names) + 1:
            results.checks.append("ctr images ls printed an unexpected number of lines")
        if len(out_content.splitlines()) != len(content) + 1:
            results.checks.append("ctr content ls printed an unexpected number of lines")
        anchor = Timing(
            "ctr images ls + ctr content ls",
            [a + b for a, b in zip(ls_images.seconds, ls_content.seconds, strict=True)],
        )
        results.timings[:0] = [(anchor, True), (ls_images, False), (ls_content, False)]
        return results
    finally:
        containerd.close()


def print_index_table(args: argparse.Namespace, results: IndexResults) -> None:
    anchor = next(t for t, is_anchor in results.timings if is_anchor)
    print()
    print(f"Store index, {args.images} images, median of {args.repeat} runs each")
    header = f"{'what':<44} {'median ms':>9} {'best ms':>9}  {'x anchor':>8}"
    print(header)
    print("-" * len(header))
    for timing, is_anchor in results.timings:
        ratio = "anchor" if is_anchor else f"{timing.median / anchor.median:8.2f}"
        print(f"{timing.label:<44} {fmt_ms(timing.median)} {fmt_ms(timing.best)}  {ratio:>8}")
    print()
    print(
        f"index: {results.tags} tags, {results.digests} digests"
        f" (expected {args.images} tags, {args.expected_digests} digests)"
    )


# -- part 2: blob reads ----------------------------------------------------------------------


@dataclass
class ReadResult:
    label: str
    seconds: list[float]
    nbytes: int
    chunks: int
    verified: bool
    hashed_seconds: float

    @property
    def mb_per_s(self) -> float:
        return self.nbytes / statistics.median(self.seconds) / 1e6

    @property
    def hashed_mb_per_s(self) -> float:
        return self.nbytes / self.hashed_seconds / 1e6


def file_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb", buffering=0) as f:
        while chunk := f.read(FILE_CHUNK):
            yield chunk


def measure_sync_read(label: str, path: Path, digest: str, repeat: int) -> ReadResult:
    times = []
    nbytes = chunks = 0
    for _ in range(repeat):
        nbytes = chunks = 0
        t0 = time.perf_counter()
        for chunk in file_chunks(path):
            nbytes += len(chunk)
            chunks += 1
        times.append(time.perf_counter() - t0)
    h = hashlib.sha256()
    t0 = time.perf_counter()
    for chunk in file_chunks(path):
        h.update(chunk)
    hashed = time.perf_counter() - t0
    verified = "sha256:" + h.hexdigest() == digest
    return ReadResult(label, times, nbytes, chunks, verified, hashed)


async def measure_async_read(
    label: str, open_chunks: Callable[[], Awaitable[AsyncIterator[bytes]]], digest: str, repeat: int
) -> ReadResult:
    times = []
    nbytes = chunks = 0
    for _ in range(repeat):
        nbytes = chunks = 0
        t0 = time.perf_counter()
        async for chunk in await open_chunks():
            nbytes += len(chunk)
            chunks += 1
        times.append(time.perf_counter() - t0)
    h = hashlib.sha256()
    t0 = time.perf_counter()
    async for chunk in await open_chunks():
        h.update(chunk)
    hashed = time.perf_counter() - t0
    verified = "sha256:" + h.hexdigest() == digest
    return ReadResult(label, times, nbytes, chunks, verified, hashed)


async def measure_reads_async(
    containerd: PrivateContainerd, digest: Digest, repeat: int
) -> list[ReadResult]:
    results = []
    async with open_containerd(containerd.socket, NAMESPACE) as client:
        await client.version()
        store = ContainerdStore(client, containerd.content_path)
        await store.sync()
        fallback = ContainerdStore(client, MISSING_CONTENT_PATH)
        await fallback.sync()

        async def via_client(client: ContainerdClient = client) -> AsyncIterator[bytes]:
            return client.read(digest)

        async def via_store() -> AsyncIterator[bytes]:
            blob = await store.open(digest)
            assert blob.path is not None
            return blob.chunks

        async def via_fallback() -> AsyncIterator[bytes]:
            blob = await fallback.open(digest)
            assert blob.path is None
            return blob.chunks

        for label, opener in (
            ("(a) client.read: gRPC Content.Read", via_client),
            ("(b) store.open: trio file reads", via_store),
            ("(b') store.open, no content dir (gRPC)", via_fallback),
        ):
            print(f"   reading via {label} ...", flush=True)
            results.append(await measure_async_read(label, opener, digest, repeat))
    return results


def run_read_part(args: argparse.Namespace, work: Path) -> list[ReadResult]:
    print(f"== Part 2: reading a {args.blob_mib} MiB layer", flush=True)
    t0 = time.perf_counter()
    image_dir = work / "big"
    big = build_image(
        f"{REGISTRY}/bench/big:v1",
        [args.blob_mib * MIB],
        seed=args.seed,
        workdir=image_dir,
        compresslevel=0,
    )
    archive = big.write_oci_archive(work / "big.tar")
    shutil.rmtree(image_dir)
    layer = big.platforms[0].layers[0]
    print(f"   built the image in {time.perf_counter() - t0:.1f}s", flush=True)
    containerd = PrivateContainerd(namespace=NAMESPACE)
    try:
        containerd.start()
        t0 = time.perf_counter()
        containerd.import_image(archive, gc=True)
        archive.unlink()
        print(f"   imported it in {time.perf_counter() - t0:.1f}s", flush=True)
        path = containerd.blob_path(layer)
        size = path.stat().st_size
        print(f"   layer {layer[:19]}..., {size / MIB:.1f} MiB", flush=True)
        # Warm the page cache with one untimed pass; every path below reads warm.
        for _ in file_chunks(path):
            pass
        anchor = measure_sync_read("(c) file read, 1 MiB chunks", path, layer, args.repeat)
        others = trio.run(measure_reads_async, containerd, parse_digest(layer), args.repeat)
        results = [anchor, *others]
        for r in results:
            if r.nbytes != size:
                raise SystemExit(f"{r.label} read {r.nbytes} bytes, expected {size}")
        return results
    finally:
        containerd.close()


def print_read_table(args: argparse.Namespace, results: list[ReadResult]) -> None:
    anchor = results[0]
    print()
    print(
        f"Blob read, {args.blob_mib} MiB layer, warm page cache, median of {args.repeat} runs"
        " (timed runs count bytes; a separate run hashes)"
    )
    header = (
        f"{'read path':<40} {'MB/s':>7} {'x (c)':>6} {'chunk KiB':>9} {'MB/s+sha':>8} {'sha256':>6}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        ratio = "anchor" if r is anchor else f"{r.mb_per_s / anchor.mb_per_s:6.3f}"
        print(
            f"{r.label:<40} {r.mb_per_s:7.0f} {ratio:>6} {r.nbytes / r.chunks / 1024:9.0f}"
            f" {r.hashed_mb_per_s:8.0f} {'ok' if r.verified else 'BAD':>6}"
        )


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=None, help="images to index (1000)")
    parser.add_argument("--blob-mib", type=int, default=None, help="layer size to read (256)")
    parser.add_argument("--repeat", type=int, default=None, help="runs per figure (5)")
    parser.add_argument("--seed", type=int, default=1, help="seed for generated images")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 100 images, 32 MiB, 3 runs"
    )
    parser.add_argument(
        "--profile", action="store_true", help="also print cProfile of cold and warm syncs"
    )
    parser.add_argument("--skip-index", action="store_true", help="skip part 1")
    parser.add_argument("--skip-read", action="store_true", help="skip part 2")
    args = parser.parse_args(argv)
    quick = args.quick
    if args.images is None:
        args.images = 100 if quick else 1000
    if args.blob_mib is None:
        args.blob_mib = 32 if quick else 256
    if args.repeat is None:
        args.repeat = 3 if quick else 5
    if args.images < 1 or args.blob_mib < 1 or args.repeat < 1:
        parser.error("--images, --blob-mib and --repeat must be positive")
    args.expected_digests = 3 * args.images + min(BASE_LAYERS, args.images)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reason = containerd_unavailable_reason()
    if reason is not None:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    ctr_version = subprocess.run(
        ["ctr", "--version"], check=False, capture_output=True, text=True
    ).stdout.strip()
    print(
        f"spegeld store benchmark: {time.strftime('%Y-%m-%d %H:%M:%S %Z')},"
        f" {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()},"
        f" {ctr_version}",
        flush=True,
    )
    work = Path(tempfile.mkdtemp(prefix="spg-bench-", dir="/tmp"))
    index_results = None
    read_results = None
    try:
        if not args.skip_index:
            index_results = run_index_part(args, work)
        if not args.skip_read:
            read_results = run_read_part(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    failed = False
    if index_results is not None:
        print_index_table(args, index_results)
        for name, text in index_results.profiles.items():
            print(f"\n-- cProfile, {name}, by own time --\n{text}")
        for problem in index_results.checks:
            print(f"CHECK FAILED: {problem}")
            failed = True
        if not index_results.checks:
            print("check: every expected tag and digest is in the index, and nothing else")
    if read_results is not None:
        print_read_table(args, read_results)
        if not all(r.verified for r in read_results):
            print("CHECK FAILED: a read's sha256 differs from the digest")
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
