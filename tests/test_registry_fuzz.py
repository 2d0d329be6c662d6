"""Property tests of the registry's input handling: routes, ranges, and raw HTTP on a socket.

The oracles here are written from the specs (the OCI distribution grammars, RFC 9110 ranges,
RFC 9112 messages), not imported from the code under test. Set SPEGELD_FUZZ_EXAMPLES to run
more (and random rather than derandomized) examples.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import re
import socket
import struct
import threading
import warnings
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import (
    AbstractAsyncContextManager,
    AsyncExitStack,
    asynccontextmanager,
    contextmanager,
)
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import h11
import httpx
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from spegeld_harness import build_image

from spegeld.containerd import ContainerdClient
from spegeld.mirror import MirrorServer
from spegeld.mirror._errors import OciError
from spegeld.mirror._ranges import ByteRange, parse_range
from spegeld.mirror._routes import Kind, Route, parse_target
from spegeld.oci import Descriptor, Digest, digest_hex
from spegeld.routing import MemoryCluster, NodeId, StaticRouter
from spegeld.store import ContainerdStore, KeysChanged, MemoryStore, OpenBlob, Snapshot

from ._support import image_in_memory, serving_registry

_BUDGET = os.environ.get("SPEGELD_FUZZ_EXAMPLES")
FUZZ = settings(
    deadline=None,
    max_examples=int(_BUDGET) if _BUDGET else 300,
    derandomize=_BUDGET is None,  # deterministic by default; random when asked for more
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
E2E = settings(FUZZ, max_examples=int(_BUDGET) if _BUDGET else 150)

# -- the grammars, from the OCI distribution spec and RFC 1123, written out independently --

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
OCI_NAME = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*", re.ASCII)
OCI_TAG = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}", re.ASCII)
OCI_DIGEST = re.compile(r"sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128}", re.ASCII)
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
HOSTNAME = re.compile(
    rf"(?:{_LABEL}(?:\.{_LABEL})*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{{1,5}})?", re.ASCII
)
HEX64 = re.compile(r"[0-9a-f]{64}", re.ASCII)

IMAGE = build_image("example.com/team/app:v1", [70_000, 1_000, 0], seed=77)
EMPTY = "sha256:" + hashlib.sha256(b"").hexdigest()  # a zero-length blob, held as well
BLOBS: dict[str, bytes] = {d: IMAGE.read_blob(d) for d in IMAGE.blobs} | {EMPTY: b""}
LAYERS = IMAGE.platforms[0].layers
MANIFEST = IMAGE.platforms[0].manifest

# -- request targets --------------------------------------------------------------------

_hex = st.text("0123456789abcdef", min_size=64, max_size=64)
DIGESTS = st.one_of(
    st.sampled_from([*BLOBS, "sha256:" + "0" * 64]),
    _hex.map(lambda h: "sha256:" + h),
    st.text("0123456789abcdef", min_size=128, max_size=128).map(lambda h: "sha512:" + h),
    st.text("0123456789abcdefABCDEF./%\\\x00:", max_size=70).map(lambda h: "sha256:" + h),
    st.sampled_from(
        [
            "sha256:../../etc/passwd",
            "sha256:..%2f..%2fetc%2fpasswd",
            "sha256:%2e%2e%2f%2e%2e%2fetc%2fpasswd",
            "sha256%3a" + "a" * 64,
            "sha256:" + "a" * 64 + "%00",
            "sha256:" + "a" * 64 + "%0a",
            "sha256:" + "a" * 64 + "/../../x",
            "sha256:" + "a" * 63 + "/",
            "sha256:" + "A" * 64,
            "sha256:" + "a" * 65,
            "SHA256:" + "a" * 64,
            "sha384:" + "a" * 96,
            "md5:" + "a" * 32,
            "sha512:" + "a" * 64,
            "sha256:",
            ":" + "a" * 64,
            "a" * 64,
            "..",
            "%2e%2e",
            "%252e%252e",
        ]
    ),
)
TAGS = st.one_of(
    st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,130}", fullmatch=True),
    st.sampled_from(["v1", "latest", "..", ".v1", "-v1", "v1%00", "v%2f1", "a" * 128, "a" * 129]),
)
_PIECES = st.sampled_from(
    [
        "team",
        "app",
        "a",
        "x" * 100,
        "..",
        ".",
        "",
        "%2e%2e",
        "%2E%2e",
        ".%2e",
        "%2f",
        "%2F",
        "%5c",
        "\\",
        "%00",
        "%0a",
        "%",
        "%zz",
        "%c3%a9",
        "%ff",
        "é",
        "A",
        "a..b",
        "a__b",
        "a___b",
        "a--b",
        "a-",
        "-a",
        "a.",
        "_a",
        "a%20b",
        "blobs",
        "manifests",
        "sha256:" + "a" * 64,
        "%252e%252e",
        ";",
        "~",
    ]
)
NAMES = st.one_of(
    st.lists(st.one_of(_PIECES, st.text(max_size=8)), max_size=6).map("/".join),
    st.sampled_from(["team/app", "a" * 255, "a" * 256, "a/" * 127 + "a", "a/" * 128 + "a"]),
    st.integers(250, 5000).map(lambda n: "a" * n),
)
NAMESPACES = st.one_of(
    st.sampled_from(
        [
            "example.com",
            "docker.io",
            "localhost:5000",
            "[::1]:5000",
            "",
            "a..b",
            "..",
            "%2e%2e",
            "evil.com/../x",
            "evil.com%2f..%2fx",
            "a%00b",
            "a b",
            "a+b",
            "x" * 300,
            "-a.com",
            "a-.com",
            "1.2.3.4:99999",
            "example.com:",
        ]
    ),
    st.text(max_size=30),
)
QUERIES = st.one_of(
    st.just(""),
    NAMESPACES.map(lambda ns: "?ns=" + ns),
    st.tuples(NAMESPACES, NAMESPACES).map(lambda p: f"?ns={p[0]}&ns={p[1]}"),
    st.text(max_size=40).map(lambda q: "?" + q),
    st.integers(14, 40).map(lambda n: "?" + "&".join(f"k{i}=v" for i in range(n))),
    st.sampled_from(["?", "?ns", "?ns=example.com&x=1", "?ns=example.com#frag", "?=&&=="]),
)
PREFIXES = st.sampled_from(
    ["/v2/", "/v2/", "/v2/", "/v2//", "//v2/", "/V2/", "/v2/./", "/v2/../", "v2/", "/%76%32/", ""]
)
KINDS = st.sampled_from(["blobs", "manifests", "blobs", "manifests", "tags", "Blobs", "blobs%2f"])


@st.composite
def _content_targets(draw: st.DrawFn) -> str:
    name = draw(NAMES)
    kind = draw(KINDS)
    reference = draw(st.one_of(DIGESTS, TAGS, st.text(max_size=20)))
    return draw(PREFIXES) + name + "/" + kind + "/" + reference + draw(QUERIES)


def _percent_encode(text: str, positions: set[int], upper: bool) -> str:
    out = []
    for i, char in enumerate(text):
        if i in positions:
            out.extend(f"%{b:02X}" if upper else f"%{b:02x}" for b in char.encode())
        else:
            out.append(char)
    return "".join(out)


@st.composite
def text_targets(draw: st.DrawFn) -> str:
    text = draw(
        st.one_of(
            _content_targets(),
            st.sampled_from(
                [
                    "/healthz",
                    "/livez",
                    "/readyz",
                    "/metrics",
                    "/status",
                    "/v2",
                    "/v2/",
                    "*",
                    "/",
                    "http://example.com/v2/",
                ]
            ).flatmap(lambda p: QUERIES.map(lambda q: p + q)),
            st.sampled_from(
                [
                    f"/v2/team/app/blobs/{d}" + q
                    for d in BLOBS
                    for q in ("", "?ns=example.com", "?ns=docker.io")
                ]
                + ["/v2/team/app/manifests/v1?ns=example.com", f"/v2/team/app/manifests/{MANIFEST}"]
            ),
        )
    )
    if text and draw(st.booleans()):
        positions = draw(st.sets(st.integers(0, len(text) - 1), max_size=6))
        text = _percent_encode(text, positions, draw(st.booleans()))
    return text


TARGETS = st.one_of(
    text_targets().map(lambda t: t.encode("utf-8")),
    st.binary(max_size=200),
    st.binary(max_size=60).map(lambda b: b"/v2/team/app/blobs/" + b),
)
METHODS = st.one_of(
    st.sampled_from(
        [
            *(b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"CONNECT"),
            *(b"TRACE", b"get", b"head", b"", b"GET\x00", b"M-SEARCH"),
        ]
    ),
    st.binary(max_size=12),
)


# -- parse_target -------------------------------------------------------------------------


def check_route(route: Route, method: bytes) -> None:
    """What the rest of the server may rely on once a target is routed."""
    assert method in (b"GET", b"HEAD")
    for text in (route.name, route.digest or "", route.tag or "", route.upstream or ""):
        assert "\x00" not in text and "\\" not in text and "%" not in text
    for text in (route.name, route.digest or "", route.upstream or ""):
        assert ".." not in text  # (a tag may hold "..", and is never part of a path)
    if route.kind in (Kind.MANIFEST, Kind.BLOB):
        assert len(route.name) <= 255
        assert OCI_NAME.fullmatch(route.name), route
        assert (route.digest is None) != (route.tag is None), route
        if route.kind is Kind.BLOB:
            assert route.digest is not None
    else:
        assert route.name == "" and route.digest is None and route.tag is None
    if route.digest is not None:
        assert OCI_DIGEST.fullmatch(route.digest), route
        assert "/" not in route.digest
    if route.tag is not None:
        assert OCI_TAG.fullmatch(route.tag), route
    if route.upstream is not None:
        assert HOSTNAME.fullmatch(route.upstream), route
        assert "/" not in route.upstream
        host = route.upstream.rpartition("]")[0] or route.upstream.partition(":")[0]
        assert len(host) <= 253 and max(len(label) for label in host.split(".")) <= 63


def check_refusal(exc: OciError) -> None:
    assert 400 <= exc.status < 500, exc
    doc = json.loads(exc.body())
    assert doc["errors"][0]["code"] == exc.code


@FUZZ
@given(method=METHODS, target=TARGETS)
def test_parse_target_routes_only_valid_names_and_digests(method: bytes, target: bytes) -> None:
    try:
        route = parse_target(method, target)
    except OciError as exc:
        check_refusal(exc)
        return
    check_route(route, method)


@pytest.mark.parametrize(
    "target",
    [
        b"/v2/x/blobs/sha256:../../etc/passwd",
        b"/v2/x/blobs/sha256:..%2f..%2fetc%2fpasswd",
        b"/v2/x/blobs/sha256%3a%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        b"/v2/x/blobs/%2e%2e/%2e%2e/etc/passwd",
        b"/v2/../../etc/passwd/blobs/sha256:" + b"a" * 64,
        b"/v2/%2e%2e/blobs/sha256:" + b"a" * 64,
        b"/v2/x/blobs/sha256:" + b"a" * 64 + b"%00",
        b"/v2/x/blobs/sha256:" + b"a" * 64 + b"%0a",
        b"/v2/x/blobs/sha256:" + b"a" * 64 + b"/../../../etc/passwd",
        b"/v2/x%00/blobs/sha256:" + b"a" * 64,
        b"/v2/x/blobs/sha256:" + b"a" * 4096,
        b"/v2/" + b"a" * 300 + b"/blobs/sha256:" + b"a" * 64,
        b"/v2/x/manifests/..%2f..%2fetc?ns=example.com",
        b"/v2/x/manifests/v1?ns=..%2f..%2fetc",
        b"/v2/x/manifests/v1?ns=a%00b",
    ],
)
def test_traversal_attempts_are_refused(target: bytes) -> None:
    with pytest.raises(OciError) as caught:
        parse_target(b"GET", target)
    check_refusal(caught.value)


@pytest.mark.parametrize(
    ("target", "want"),
    [
        (
            b"/v2/team/app/blobs/sha256:" + b"a" * 64 + b"?ns=example.com",
            Route(Kind.BLOB, "team/app", Digest("sha256:" + "a" * 64), None, "example.com"),
        ),
        (
            b"/v2/team/app/blobs/sha256%3A" + b"b" * 64,  # an encoded ':' is still a digest
            Route(Kind.BLOB, "team/app", Digest("sha256:" + "b" * 64)),
        ),
        (
            b"/v2/a/blobs/b/manifests/v1?ns=localhost:5000",  # the last marker wins
            Route(Kind.MANIFEST, "a/blobs/b", None, "v1", "localhost:5000"),
        ),
        (b"/v2/?ns=docker.io", Route(Kind.BASE, upstream="docker.io")),
    ],
)
def test_valid_targets_route(target: bytes, want: Route) -> None:
    assert parse_target(b"GET", target) == want


def _content_store(content: Path) -> ContainerdStore:
    # blob_path is pure path arithmetic plus os.access: no client call is made.
    return ContainerdStore(cast(ContainerdClient, object()), content)


def test_blob_path_of_any_routed_digest_stays_in_blobs_sha256(tmp_path: Path) -> None:
    content = tmp_path / "content"
    blobs = content / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    (content / "blobs" / "sha512").mkdir()
    store = _content_store(content)
    seen: set[str] = set()

    @FUZZ
    @given(target=_content_targets().map(lambda t: t.encode("utf-8")) | TARGETS)
    def check(target: bytes) -> None:
        try:
            route = parse_target(b"GET", target)
        except OciError:
            return
        if route.digest is None:
            return
        seen.add(route.digest)
        algorithm, _, hexpart = route.digest.partition(":")
        # Make the file exist, so blob_path answers with a path rather than None; the
        # path is built only after the digest was checked to be algorithm:hex.
        assert digest_hex(route.digest) == hexpart
        assert re.fullmatch(r"[0-9a-f]+", hexpart)
        (content / "blobs" / algorithm / hexpart).touch()
        path = store.blob_path(route.digest)
        if algorithm != "sha256":
            assert path is None  # only sha256 is ever served from the content directory
            return
        assert path is not None
        assert path.parent == blobs
        assert HEX64.fullmatch(path.name)
        assert path.resolve().parent == blobs.resolve()

    check()
    assert seen, "no example reached a digest route"
    outside = [
        p for p in tmp_path.rglob("*") if p.is_file() and p.parent.parent != content / "blobs"
    ]
    assert outside == []


# -- parse_range --------------------------------------------------------------------------

_number = st.one_of(
    st.integers(0, 2**20), st.integers(0, 10**19 - 1), st.integers(10**19, 10**30)
).map(str)
_ows = st.sampled_from(["", " ", "\t", "  "])


@st.composite
def range_headers(draw: st.DrawFn) -> bytes:
    unit = draw(st.sampled_from(["bytes", "bytes", "Bytes", "BYTES", "byte", "items", ""]))
    spec = draw(
        st.one_of(
            st.tuples(_number, _number).map(lambda p: f"{p[0]}-{p[1]}"),
            _number.map(lambda n: f"{n}-"),
            _number.map(lambda n: f"-{n}"),
            st.sampled_from(["-", "", "0-0", "1-2,3-4", "0-0,", "--1", "1--2", "+1-2", "0x1-2"]),
            st.text("0123456789-, ", max_size=12),
            st.text(st.characters(), max_size=12),
        )
    )
    text = draw(_ows) + unit + draw(_ows) + "=" + draw(_ows) + spec + draw(_ows)
    return text.encode("utf-8")


RANGES = st.one_of(st.none(), range_headers(), st.binary(max_size=40))
SIZES = st.one_of(st.integers(0, 4), st.integers(0, 2**20), st.integers(0, 2**70))


def expected_range(header: bytes, size: int) -> ByteRange | int | None:
    """A model of RFC 9110 §14.1.2 for one well-formed range; 416 for anything else."""
    match = re.fullmatch(rb"\s*bytes\s*=\s*([0-9]*)-([0-9]*)\s*", header, re.IGNORECASE)
    if match is None:
        return 416
    first, last = match.group(1), match.group(2)
    if len(first) > 1000 or len(last) > 1000:
        return None  # not modelled
    if not first:
        if not last or int(last) == 0 or size == 0:
            return 416
        return ByteRange(max(0, size - int(last)), size - 1)
    start = int(first)
    end = int(last) if last else size - 1
    if start >= size or end < start:
        return 416
    return ByteRange(start, min(end, size - 1))


@FUZZ
@given(header=RANGES, size=SIZES)
def test_parse_range_is_none_a_range_within_the_blob_or_416(
    header: bytes | None, size: int
) -> None:
    try:
        got = parse_range(header, size)
    except OciError as exc:
        assert exc.status == 416, exc
        assert exc.code == "RANGE_NOT_SATISFIABLE"
        got_status: ByteRange | int | None = 416
    else:
        if header is None:
            assert got is None
            return
        assert got is not None, "a present Range header is honoured or refused"
        assert 0 <= got.start <= got.end < size
        assert got.length == got.end - got.start + 1
        assert got.content_range(size) == f"bytes {got.start}-{got.end}/{size}"
        got_status = got
    if header is not None and header.isascii():
        want = expected_range(header, size)
        if want is not None:
            assert got_status == want, (header, size)


@pytest.mark.parametrize(
    ("header", "size", "want"),
    [
        (b"bytes=0-" + b"9" * 25, 100, ByteRange(0, 99)),  # last-pos past the end: to the end
        (b"bytes=-" + b"9" * 25, 100, ByteRange(0, 99)),  # suffix longer than the blob: all
        (b"bytes=" + b"0" * 30 + b"5-" + b"0" * 30 + b"9", 100, ByteRange(5, 9)),
        (b"bytes=0-" + b"9" * 5000, 100, ByteRange(0, 99)),  # past int()'s 4300 digits
        (b"bytes=-" + b"9" * 5000, 100, ByteRange(0, 99)),
        (b"bytes=" + b"9" * 5000 + b"-", 100, 416),
        (b"bytes=" + b"9" * 25 + b"-" + b"9" * 26, 2**62, 416),
        (b"bytes=99-", 100, ByteRange(99, 99)),
        (b"bytes=100-", 100, 416),
        (b"bytes=0-0", 0, 416),
        (b"bytes=-1", 0, 416),
        (b"bytes=-0", 100, 416),
    ],
)
def test_parse_range_long_positions(header: bytes, size: int, want: ByteRange | int) -> None:
    try:
        got: ByteRange | int | None = parse_range(header, size)
    except OciError as exc:
        got = exc.status
    assert got == want


# -- raw HTTP on a real socket ----------------------------------------------------------


class FileBackedStore:
    """A MemoryStore whose layer blobs are files, so the registry answers them with sendfile."""

    def __init__(self, inner: MemoryStore, paths: Mapping[Digest, Path]) -> None:
        self._inner = inner
        self._paths = dict(paths)

    def list(self) -> Snapshot:
        return self._inner.list()

    def resolve(self, tag_key: str) -> Digest:
        return self._inner.resolve(tag_key)

    def descriptor(self, digest: Digest) -> Descriptor:
        return self._inner.descriptor(digest)

    async def open(self, digest: Digest, offset: int = 0, length: int | None = None) -> OpenBlob:
        blob = await self._inner.open(digest, offset, length)
        path = self._paths.get(digest)
        if path is None:
            return blob
        await _close(blob.chunks)
        return OpenBlob(blob.descriptor, path, _unused())

    def watch(
        self,
    ) -> AbstractAsyncContextManager[tuple[Snapshot, trio.MemoryReceiveChannel[KeysChanged]]]:
        return self._inner.watch()


async def _close(chunks: AsyncIterator[bytes]) -> None:
    aclose = getattr(chunks, "aclose", None)
    if aclose is not None:
        await aclose()


async def _unused() -> AsyncIterator[bytes]:
    raise AssertionError("the registry streamed a blob it could sendfile")
    yield b""  # pragma: no cover


def file_backed_store(content: Path) -> FileBackedStore:
    blobs = content / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    paths: dict[Digest, Path] = {}
    for digest in [*LAYERS, EMPTY]:
        path = blobs / digest_hex(Digest(digest))
        path.write_bytes(BLOBS[digest])
        paths[Digest(digest)] = path
    store = image_in_memory(IMAGE)
    empty = {Digest(EMPTY): ("application/octet-stream", b"")}
    store.add_image("example.com/team/empty:v1", empty, {})
    return FileBackedStore(store, paths)


@dataclass
class ServerThread:
    registry: MirrorServer
    host: str
    port: int


@contextmanager
def registry_in_thread(store: Any, *, proxied: bool = False) -> Iterator[ServerThread]:
    """One registry for a whole hypothesis run, on its own trio loop in a thread.

    With ``proxied``, ``store`` is held by a second registry, and the one under test
    holds nothing: it answers every content request through its peer proxy.
    """
    started = threading.Event()
    box: dict[str, Any] = {}

    async def serve() -> None:
        stop = trio.Event()
        async with AsyncExitStack() as stack:
            front_store, router = store, StaticRouter([])
            if proxied:
                _, holder_url = await stack.enter_async_context(
                    serving_registry(store, StaticRouter([]))
                )
                cluster = MemoryCluster()
                holder = cluster.router(NodeId("holder"), holder_url.removeprefix("http://"))
                holder.advertise(store.list().keys())
                front_store, router = MemoryStore(), cluster.router(NodeId("front"), "127.0.0.1:1")
            registry, url = await stack.enter_async_context(serving_registry(front_store, router))
            host, port = url.removeprefix("http://").rsplit(":", 1)
            box.update(server=ServerThread(registry, host, int(port)), stop=stop)
            box["token"] = trio.lowlevel.current_trio_token()
            started.set()
            await stop.wait()

    def main() -> None:
        try:
            trio.run(serve)
        except BaseException as exc:
            box["error"] = exc
            started.set()

    thread = threading.Thread(target=main, name="registry", daemon=True)
    thread.start()
    assert started.wait(10), "the registry did not start"
    if "error" in box:
        raise box["error"]
    try:
        yield box["server"]
    finally:
        if "token" in box:
            trio.from_thread.run_sync(box["stop"].set, trio_token=box["token"])
        thread.join(15)
        assert not thread.is_alive(), "the registry did not shut down"
        if "error" in box:
            raise box["error"]


@dataclass
class Message:
    raw: bytes
    method: bytes


@dataclass
class Case:
    messages: list[Message]
    junk: bytes | None = None  # sent instead of messages when set
    hang_up: bool = False  # reset the connection right after sending, reading nothing

    def payload(self) -> bytes:
        return self.junk if self.junk is not None else b"".join(m.raw for m in self.messages)


_TOKEN = st.text("abcdefghijklmnopqrstuvwxyz0123456789-!#$%&'*+.^_`|~", min_size=1, max_size=12)
_header_name = st.one_of(
    st.sampled_from([b"x-junk", b"accept", b"user-agent", b"x-spegeld-mirrored", b"Range"]),
    _TOKEN.map(str.encode),
    st.binary(max_size=12).filter(lambda b: b"\n" not in b),
)
_header_value = st.binary(max_size=40).filter(lambda b: b"\n" not in b)
_range_value = st.one_of(
    range_headers(),
    st.tuples(st.integers(0, 80_000), st.integers(0, 80_000)).map(
        lambda p: f"bytes={min(p)}-{max(p)}".encode()
    ),
    st.integers(0, 80_000).map(lambda n: f"bytes={n}-".encode()),
    st.integers(1, 80_000).map(lambda n: f"bytes=-{n}".encode()),
    st.binary(max_size=30).filter(lambda b: b"\n" not in b),
)
_SAFE_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def _clean_value(value: bytes) -> bytes:
    """A header value h11 accepts (RFC 9110 field-value): no controls, trimmed."""
    return _SAFE_VALUE.sub(b"", value).strip(b" \t")


def _wire_target(text: str) -> bytes:
    """A target h11 lets through to the handler: anything outside VCHAR percent-encoded."""
    return "".join(
        c if "\x21" <= c <= "\x7e" else "".join(f"%{b:02X}" for b in c.encode()) for c in text
    ).encode("ascii")


@st.composite
def messages(draw: st.DrawFn, head: bool = True) -> Message:
    """Mostly well-framed requests (so they reach the handler), sometimes broken framing."""
    if draw(st.integers(0, 9)) < 7:
        return draw(wellformed_messages(head))
    return draw(malformed_messages(head))


@st.composite
def wellformed_messages(draw: st.DrawFn, head: bool = True) -> Message:
    heads = [b"HEAD"] * 3 if head else []
    method = draw(st.sampled_from([b"GET"] * 5 + heads + [b"POST", b"PUT", b"DELETE", b"OPTIONS"]))
    target = draw(
        st.one_of(
            text_targets().map(_wire_target),
            st.sampled_from([f"/v2/team/app/blobs/{d}".encode() for d in BLOBS]),
        ).filter(bool)
    )
    version = draw(st.sampled_from([b"HTTP/1.1"] * 5 + [b"HTTP/1.0"]))
    headers: list[tuple[bytes, bytes]] = []
    if version == b"HTTP/1.1" or draw(st.booleans()):
        headers.append((b"Host", b"localhost"))
    if draw(st.integers(0, 2)) > 0:
        headers.append((b"Range", _clean_value(draw(_range_value))))
    headers += draw(
        st.lists(st.tuples(_TOKEN.map(str.encode), _header_value.map(_clean_value)), max_size=2)
    )
    extra = draw(st.sampled_from(["", "", "", "close", "length", "chunked", "expect", "upgrade"]))
    body = b""
    if extra == "close":
        headers.append((b"Connection", b"close"))
    elif extra == "length":
        body = b"x" * 10
        headers.append((b"Content-Length", b"10"))
    elif extra == "chunked" and version == b"HTTP/1.1":
        body = b"3\r\nabc\r\n0\r\n\r\n"
        headers.append((b"Transfer-Encoding", b"chunked"))
    elif extra == "expect":
        headers.append((b"Expect", b"100-continue"))
    elif extra == "upgrade":
        headers += [(b"Connection", b"upgrade"), (b"Upgrade", b"h2c")]
    head = method + b" " + target + b" " + version + b"\r\n"
    head += b"".join(name + b": " + value + b"\r\n" for name, value in headers)
    return Message(head + b"\r\n" + body, method)


@st.composite
def malformed_messages(draw: st.DrawFn, head: bool = True) -> Message:
    method = draw(METHODS.filter(lambda m: b"\n" not in m and (head or m != b"HEAD")))
    target = draw(TARGETS.filter(lambda t: b"\n" not in t))
    version = draw(
        st.sampled_from(
            [b"HTTP/1.1"] * 4
            + [b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1", b"http/1.1", b"HTTP/1.1 x", b""]
        )
    )
    sep = draw(st.sampled_from([b" ", b" ", b" ", b"  ", b"\t"]))
    eol = draw(st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n"]))
    headers: list[tuple[bytes, bytes]] = []
    if draw(st.integers(0, 9)) > 0:
        headers.append((b"Host", draw(st.sampled_from([b"localhost", b"", b"a b", b"x" * 300]))))
    if draw(st.booleans()):
        headers.append((b"Range", draw(_range_value)))
    headers += draw(st.lists(st.tuples(_header_name, _header_value), max_size=3))
    extra = draw(
        st.sampled_from(
            [
                *("", "", "", "close", "length", "short-length", "chunked", "bad-chunked"),
                *("te-gzip", "upgrade", "expect", "two-lengths", "huge-header"),
            ]
        )
    )
    body = b""
    if extra == "close":
        headers.append((b"Connection", b"close"))
    elif extra == "length":
        body = b"x" * 10
        headers.append((b"Content-Length", b"10"))
    elif extra == "short-length":
        body = b"x" * 3
        headers.append((b"Content-Length", b"10"))
    elif extra == "chunked":
        body = b"3\r\nabc\r\n0\r\n\r\n"
        headers.append((b"Transfer-Encoding", b"chunked"))
    elif extra == "bad-chunked":
        body = b"zz\r\nabc\r\n"
        headers.append((b"Transfer-Encoding", b"chunked"))
    elif extra == "te-gzip":
        headers.append((b"Transfer-Encoding", b"gzip"))
    elif extra == "upgrade":
        headers += [(b"Connection", b"upgrade"), (b"Upgrade", b"h2c")]
    elif extra == "expect":
        headers.append((b"Expect", b"100-continue"))
    elif extra == "two-lengths":
        headers += [(b"Content-Length", b"0"), (b"Content-Length", b"5")]
    elif extra == "huge-header":
        headers.append((b"x-big", b"a" * 20_000))
    head = method + sep + target + (sep + version if version else b"") + eol
    head += b"".join(name + b": " + value + eol for name, value in headers)
    return Message(head + eol + body, method)


def cases(*, head: bool = True, hang_up: bool = True) -> st.SearchStrategy[Case]:
    """Pipelines of 1-3 requests, raw junk, and (with ``hang_up``) clients that reset."""
    return st.one_of(
        st.lists(messages(head), min_size=1, max_size=3).map(Case),
        st.binary(min_size=1, max_size=300)
        .filter(lambda b: head or b"HEAD" not in b)
        .map(lambda b: Case([], junk=b)),
        *(
            [
                st.lists(wellformed_messages(), min_size=1, max_size=3).map(
                    lambda m: Case(m, hang_up=True)
                )
            ]
            if hang_up
            else []
        ),
    )


@dataclass
class Reply:
    status: int
    headers: dict[bytes, bytes]
    body: bytes
    to_head: bool


def exchange(
    host: str, port: int, payload: bytes, timeout: float = 5.0, *, hang_up: bool = False
) -> bytes:
    """Send the payload, half-close, and read everything until the server closes."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        if hang_up:  # close with a RST, in the middle of whatever the server is sending
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.sendall(payload)
            return b""
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # EPIPE, ECONNRESET, ENOTCONN: the server answered and closed early
            pass  # (say, on an over-long head it did not read): read what it sent
        received = bytearray()
        while True:
            try:
                chunk = sock.recv(256 * 1024)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
    return bytes(received)


def parse_replies(data: bytes, methods: list[bytes]) -> list[Reply]:
    """Parse a stream of HTTP/1.1 responses with h11 as the client, failing on bad syntax."""
    client = h11.Connection(h11.CLIENT)
    client.receive_data(data)
    client.receive_data(b"")
    replies: list[Reply] = []
    while True:
        pending, _ = client.trailing_data
        if not pending:
            return replies
        head_end = pending.find(b"\r\n\r\n")
        assert head_end != -1, f"incomplete response head: {pending[:300]!r}"
        raw_head = pending[: head_end + 4]
        # A response to a request h11 refused (text/plain, not the handler's JSON or
        # "text/plain; charset=utf-8") has a body even when the request said HEAD.
        refused = b"\r\ncontent-type: text/plain\r\n" in raw_head
        to_head = len(replies) < len(methods) and methods[len(replies)] == b"HEAD" and not refused
        client.send(
            h11.Request(
                method=b"HEAD" if to_head else b"GET", target=b"/", headers=[(b"host", b"x")]
            )
        )
        client.send(h11.EndOfMessage())
        event = client.next_event()
        assert isinstance(event, h11.Response), f"not a response: {event!r} in {pending[:300]!r}"
        assert event.http_version == b"1.1"
        headers: dict[bytes, bytes] = {}
        for name, value in event.headers:
            assert name not in headers or name == b"connection", f"duplicate header {name!r}"
            headers[bytes(name)] = bytes(value)
        body = bytearray()
        while True:
            part = client.next_event()
            if isinstance(part, h11.Data):
                body += part.data
            elif isinstance(part, h11.EndOfMessage):
                break
            else:
                raise AssertionError(f"truncated response body: {part!r} after {raw_head!r}")
        replies.append(Reply(event.status_code, headers, bytes(body), to_head))
        if client.our_state is h11.DONE and client.their_state is h11.DONE:
            client.start_next_cycle()
        else:
            leftover, _ = client.trailing_data
            assert leftover == b"", f"bytes after a closing response: {leftover[:200]!r}"
            return replies


def check_reply(reply: Reply, payload: bytes) -> None:
    status = reply.status
    assert status != 500, reply
    if status >= 500:
        # h11 answers 501 to a transfer coding it does not implement (RFC 9112 §6.1).
        assert status == 501 and b"transfer-encoding" in payload.lower(), reply
    assert 200 <= status < 600
    assert b"content-length" in reply.headers, reply
    length = int(reply.headers[b"content-length"])
    if not reply.to_head:
        assert length == len(reply.body)
    else:
        assert reply.body == b""
    if reply.headers.get(b"content-type") == b"text/plain":  # refused by h11 itself
        assert status in (400, 431, 501), reply
        return
    if status >= 400:
        doc = json.loads(reply.body) if not reply.to_head else None
        if doc is not None:
            assert doc["errors"][0]["code"], reply
        return
    digest = reply.headers.get(b"docker-content-digest", b"").decode()
    if not digest:
        return
    blob = BLOBS[digest]
    if reply.to_head:
        if status == 200:  # a HEAD tells the size a GET would send
            assert length == len(blob), reply
        return
    if status == 200:
        assert reply.body == blob
    else:
        assert status == 206, reply
        match = re.fullmatch(rb"bytes ([0-9]+)-([0-9]+)/([0-9]+)", reply.headers[b"content-range"])
        assert match, reply
        start, end, size = (int(g) for g in match.groups())
        assert size == len(blob) and 0 <= start <= end < size
        assert reply.body == blob[start : end + 1]


def healthz(host: str, port: int) -> int:
    data = exchange(host, port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    (reply,) = parse_replies(data, [b"GET"])
    return reply.status


@pytest.mark.parametrize("proxied", [False, True], ids=["local", "proxied"])
def test_raw_requests_never_break_the_server(
    proxied: bool, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Arbitrary bytes on a socket: a valid HTTP/1.1 answer, never a 500, and no harm done.

    Local blobs are layers served with sendfile and small blobs streamed; ``proxied``
    sends every content request through the peer proxy to a second registry.

    Clients that hang up are left out of the proxied run: they leak the peer connection
    (see the xfail test below).
    """
    caplog.set_level(logging.DEBUG, logger="spegeld")
    examples = 0
    store = file_backed_store(tmp_path / "content")
    with registry_in_thread(store, proxied=proxied) as server:

        @E2E
        @given(case=cases(hang_up=not proxied))
        def check(case: Case) -> None:
            nonlocal examples
            examples += 1
            payload = case.payload()
            data = exchange(server.host, server.port, payload, hang_up=case.hang_up)
            assert healthz(server.host, server.port) == 200
            if case.hang_up:
                return
            replies = parse_replies(data, [m.method for m in case.messages])
            assert replies, f"no response to {payload[:300]!r}"
            if case.junk is None:
                assert len(replies) <= len(case.messages)
            for reply in replies:
                check_reply(reply, payload)

        check()
        stats = server.registry.statistics()
    assert examples > 50
    assert stats["requests"] > 0 and stats["bad_requests"] > 0
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert errors == [], [r.getMessage() for r in errors]
    assert "Traceback" not in caplog.text


@pytest.mark.parametrize(
    "target",
    [
        b"/v2/x/blobs/sha256:../../etc/passwd",
        b"/v2/x/blobs/sha256:..%2f..%2f..%2fetc%2fpasswd",
        b"/v2/x/blobs/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        b"/v2/x/blobs/sha256%3a%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        b"/v2/x/blobs/sha256:" + b"a" * 64 + b"%00",
        b"/v2/x/blobs/sha256:" + b"a" * 64 + b"%2f..%2f..%2fetc%2fpasswd",
        b"/v2/x/blobs/sha256:" + b"a" * 10_000,
        b"/v2/" + b"a/" * 3000 + b"blobs/sha256:" + b"a" * 64,
        b"/v2/x/blobs/..%c0%af..%c0%afetc%c0%afpasswd",
    ],
)
async def test_traversal_over_http_is_refused(target: bytes, tmp_path: Path) -> None:
    """A real registry with real files: every traversal attempt is a 4xx, never a file."""
    secret = tmp_path / "etc" / "passwd"
    secret.parent.mkdir()
    secret.write_bytes(b"root:x:0:0\n")
    store = file_backed_store(tmp_path / "content")
    with trio.fail_after(10):
        async with serving_registry(store, StaticRouter([])) as (_, url):
            host, port = url.removeprefix("http://").rsplit(":", 1)
            request = b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            data = await trio.to_thread.run_sync(exchange, host, int(port), request)
            (reply,) = parse_replies(data, [b"GET"])
            assert 400 <= reply.status < 500, reply
            assert b"root:" not in reply.body


# -- the peer proxy (src/spegeld/mirror/_proxy.py): what the runs above found --


@asynccontextmanager
async def proxying_registry() -> AsyncIterator[tuple[MirrorServer, str]]:
    """A registry holding nothing, whose router names a second registry holding IMAGE."""
    holder_store = image_in_memory(IMAGE)
    async with serving_registry(holder_store, StaticRouter([])) as (_, holder_url):
        cluster = MemoryCluster()
        holder = cluster.router(NodeId("holder"), holder_url.removeprefix("http://"))
        holder.advertise(holder_store.list().keys())
        router = cluster.router(NodeId("front"), "127.0.0.1:1")
        async with serving_registry(MemoryStore(), router) as (registry, url):
            yield registry, url


async def test_a_proxied_head_answers_like_a_local_head() -> None:
    """A HEAD forwarded as a HEAD once answered Content-Length 0 for a blob, and 404 for a
    manifest (its empty body failed the digest check, and the honest peer was marked bad)."""
    layer = LAYERS[0]
    with trio.fail_after(10):
        async with proxying_registry() as (_, url):
            async with httpx.AsyncClient(base_url=url) as client:
                blob = await client.head(f"/v2/team/app/blobs/{layer}")
                manifest = await client.head("/v2/team/app/manifests/v1?ns=example.com")
                metrics = (await client.get("/metrics")).text
    assert blob.status_code == 200
    assert blob.headers["content-length"] == str(len(BLOBS[layer]))
    assert manifest.status_code == 200
    assert manifest.headers["content-length"] == str(IMAGE.size)
    assert manifest.headers["docker-content-digest"] == IMAGE.digest
    assert re.search(r"^spegeld_bad_peers_total 0(\.0)?$", metrics, re.MULTILINE), metrics


async def test_the_peer_connection_is_closed_when_the_client_goes_away() -> None:
    """StreamBody.on_close closes the peer's response even if its body never started."""
    layer = LAYERS[0]
    request = f"GET /v2/team/app/blobs/{layer} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        with trio.fail_after(10):
            async with proxying_registry() as (registry, url):
                host, port = url.removeprefix("http://").rsplit(":", 1)
                for _ in range(10):
                    stream = await trio.open_tcp_stream(host, int(port))
                    stream.socket.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                    await stream.send_all(request)
                    await stream.aclose()  # a reset, before the answer
                async with httpx.AsyncClient(base_url=url) as client:
                    await client.head(f"/v2/team/app/blobs/{layer}")
                while registry.statistics()["connections"]:
                    await trio.sleep(0.01)
        gc.collect()
    leaked = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert leaked == []
