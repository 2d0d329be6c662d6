"""spegeld.oci: digests, references and documents, validated at the edge.

Everything here parses what a peer or containerd hands us, so besides the
examples each parser has a property: arbitrary input either parses or raises
RemoteProtocolError, never anything else.
"""

from __future__ import annotations

import json
import string
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spegeld.errors import ProtocolError, RemoteProtocolError, SpegeldError
from spegeld.oci import (
    DOCKER_CONFIG,
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    Descriptor,
    Digest,
    Index,
    IndexEntry,
    Manifest,
    Reference,
    digest_hex,
    is_digest,
    is_index,
    is_manifest,
    parse_digest,
    parse_document,
    parse_reference,
    tag_key,
)

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SHA256 = Digest("sha256:" + "0123456789abcdef" * 4)
SHA512 = Digest("sha512:" + "fedcba9876543210" * 8)


def sha(n: int) -> Digest:
    return Digest(f"sha256:{n:064x}")


sha256_digests = st.text("0123456789abcdef", min_size=64, max_size=64).map("sha256:".__add__)
sha512_digests = st.text("0123456789abcdef", min_size=128, max_size=128).map("sha512:".__add__)
valid_digests = (sha256_digests | sha512_digests).map(Digest)


# --- parse_digest -----------------------------------------------------------------------


@pytest.mark.parametrize("text", [SHA256, SHA512, "sha256:" + "0" * 64, "sha512:" + "f" * 128])
def test_parse_digest_accepts_sha256_and_sha512(text: str) -> None:
    digest = parse_digest(text)
    assert digest == text
    assert is_digest(text)
    assert digest_hex(digest) == text.split(":", 1)[1]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "sha256:",
        "sha256",
        "0123456789abcdef" * 4,  # no algorithm
        SHA256.upper(),  # hex must be lowercase
        "SHA256:" + SHA256[7:],
        "sha256:" + "0123456789ABCDEF" * 4,
        SHA256[:-1],  # 63 hex digits
        SHA256 + "0",  # 65
        "sha512:" + "0" * 64,  # sha512 with a sha256-length hex
        "sha256:" + "0" * 128,  # sha256 with a sha512-length hex
        "sha384:" + "0" * 96,
        "md5:" + "0" * 32,
        "sha256:" + "g" * 64,
        SHA256 + "\n",
        " " + SHA256,
        SHA256 + " ",
        "sha256 :" + "0" * 64,
        "sha256:" + "0" * 63 + "\u0660",  # an Arabic-Indic zero is not a hex digit
        f"{SHA256}@{SHA256}",
    ],
)
def test_parse_digest_rejects_everything_else(text: str) -> None:
    with pytest.raises(RemoteProtocolError, match="invalid digest"):
        parse_digest(text)
    assert not is_digest(text)


def test_remote_protocol_error_sits_under_protocol_error() -> None:
    assert issubclass(RemoteProtocolError, ProtocolError)
    assert issubclass(RemoteProtocolError, SpegeldError)


def test_parse_digest_error_message_is_bounded() -> None:
    with pytest.raises(RemoteProtocolError) as info:
        parse_digest("x" * 10_000)
    assert len(str(info.value)) < 200


@FAST
@given(st.text())
def test_parse_digest_never_raises_anything_else(text: str) -> None:
    try:
        digest = parse_digest(text)
    except RemoteProtocolError:
        assert not is_digest(text)
    else:
        assert digest == text
        assert is_digest(text)


@FAST
@given(valid_digests)
def test_parse_digest_accepts_every_valid_digest(text: str) -> None:
    assert parse_digest(text) == text
    algorithm, hexpart = text.split(":")
    assert digest_hex(parse_digest(text)) == hexpart
    assert len(hexpart) == {"sha256": 64, "sha512": 128}[algorithm]


# --- parse_reference --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "docker.io/library/nginx:1.25",
            Reference("docker.io", "library/nginx", "1.25", None),
        ),
        (
            "registry.local:5000/a/b/c:tag",
            Reference("registry.local:5000", "a/b/c", "tag", None),
        ),
        ("localhost/x:y", Reference("localhost", "x", "y", None)),
        ("localhost:5000/x:y", Reference("localhost:5000", "x", "y", None)),
        ("[::1]:5000/x:y", Reference("[::1]:5000", "x", "y", None)),
        ("example.com/app@" + SHA256, Reference("example.com", "app", None, SHA256)),
        ("example.com/app:v1@" + SHA256, Reference("example.com", "app", "v1", SHA256)),
        ("example.com/app:v1@" + SHA512, Reference("example.com", "app", "v1", SHA512)),
        (
            "ghcr.io/some-org/my_app__x.y/sub-path:V1.0_rc-1",
            Reference("ghcr.io", "some-org/my_app__x.y/sub-path", "V1.0_rc-1", None),
        ),
        ("example.com/app:" + "t" * 128, Reference("example.com", "app", "t" * 128, None)),
    ],
)
def test_parse_reference_accepts_containerd_names(text: str, expected: Reference) -> None:
    ref = parse_reference(text)
    assert ref == expected
    assert str(ref) == text


@pytest.mark.parametrize(
    "text",
    [
        # No registry host: containerd's names always carry one.
        "library/nginx:1",
        "nginx:1",
        "nginx",
        "library/nginx@" + SHA256,
        "",
        "/x:y",
        # Invalid hosts.
        "exa_mple.com/app:1",
        "-example.com/app:1",
        "example.com:port/app:1",
        "example.com:/app:1",
        "example..com/app:1",
        # Invalid tags.
        "example.com/app:",
        "example.com/app:-bad",
        "example.com/app:.bad",
        "example.com/app:bad/tag",
        "example.com/app:" + "t" * 129,
        "example.com/app:t ag",
        # Invalid repositories.
        "example.com/Library/nginx:1",
        "example.com/NGINX:1",
        "example.com/app-:1",
        "example.com/-app:1",
        "example.com/a//b:1",
        "example.com/a/:1",
        "example.com/:1",
        "example.com/a..b:1",
        "example.com/a:b/c:d",
        "example.com/" + "a" * 256 + ":1",
        # Neither tag nor digest.
        "docker.io/library/nginx",
        "example.com/app@",
        # Bad digests.
        "example.com/app@sha256:abc",
        "example.com/app:v1@" + SHA256.upper(),
        "example.com/app@" + SHA256 + "@" + SHA256,
    ],
)
def test_parse_reference_rejects(text: str) -> None:
    with pytest.raises(RemoteProtocolError):
        parse_reference(text)


def test_parse_reference_rejects_an_empty_digest_after_a_tag() -> None:
    # parse_reference("example.com/app:v1@") returns Reference(tag="v1", digest=None),
    # whose str() is "example.com/app:v1": the input does not round-trip.
    with pytest.raises(RemoteProtocolError):
        parse_reference("example.com/app:v1@")


def test_tag_key_is_registry_repository_tag() -> None:
    ref = parse_reference("registry.local:5000/a/b/c:tag")
    assert ref.tag_key() == "registry.local:5000/a/b/c:tag"
    assert tag_key("docker.io", "library/nginx", "1.25") == "docker.io/library/nginx:1.25"
    # A pinned reference still names its tag; the key leaves the digest out.
    pinned = parse_reference("example.com/app:v1@" + SHA256)
    assert pinned.tag_key() == "example.com/app:v1"


def test_tag_key_is_none_for_a_digest_only_reference() -> None:
    assert parse_reference("example.com/app@" + SHA256).tag_key() is None


@FAST
@given(st.text())
def test_parse_reference_only_raises_remote_protocol_error(text: str) -> None:
    try:
        ref = parse_reference(text)
    except RemoteProtocolError:
        return
    assert ref.tag is not None or ref.digest is not None
    assert ref.digest is None or is_digest(ref.digest)


@FAST
@given(
    st.lists(
        st.sampled_from(["localhost", "example.com", "a", "b", "c.d", ":", "/", "@", "_", "-", "."])
        | st.sampled_from([":5000", "Upper", "v1.2", SHA256, "sha256:", "[::1]"])
    ).map("".join)
)
def test_parse_reference_near_miss_text_only_raises_remote_protocol_error(text: str) -> None:
    # Plain st.text() rarely builds anything close to a reference; these pieces do.
    try:
        ref = parse_reference(text)
    except RemoteProtocolError:
        return
    assert parse_reference(str(ref)) == ref


_HOST_LABEL = r"[a-z0-9]|[a-z0-9][a-z0-9-]{0,8}[a-z0-9]"
host_labels = st.from_regex(rf"(?:{_HOST_LABEL})", fullmatch=True)
ports = st.integers(min_value=0, max_value=99999).map(lambda p: f":{p}")
registries = st.one_of(
    st.just("localhost"),
    ports.map("localhost".__add__),
    st.builds(
        lambda labels, port: ".".join(labels) + port,
        st.lists(host_labels, min_size=2, max_size=4),
        st.just("") | ports,
    ),
    st.builds(lambda label, port: label + port, host_labels, ports),
    st.builds(
        lambda addr, port: f"[{addr}]{port}",
        st.from_regex(r"[0-9a-f]{0,4}(?::[0-9a-f]{0,4}){1,7}", fullmatch=True),
        st.just("") | ports,
    ),
)
components = st.from_regex(r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*", fullmatch=True)
repositories = (
    st.lists(components, min_size=1, max_size=4).map("/".join).filter(lambda r: len(r) <= 255)
)
_TAG_FIRST = string.ascii_letters + string.digits + "_"
tags = st.builds(str.__add__, st.sampled_from(_TAG_FIRST), st.text(_TAG_FIRST + ".-", max_size=127))


@st.composite
def references(draw: st.DrawFn) -> Reference:
    tag = draw(st.none() | tags)
    digest = draw(valid_digests) if tag is None else draw(st.none() | valid_digests)
    return Reference(draw(registries), draw(repositories), tag, digest)


@FAST
@given(references())
def test_parse_reference_round_trips_generated_references(ref: Reference) -> None:
    text = str(ref)
    assert parse_reference(text) == ref
    if ref.tag is None:
        assert ref.tag_key() is None
    else:
        assert ref.tag_key() == f"{ref.registry}/{ref.repository}:{ref.tag}"


# --- parse_document ---------------------------------------------------------------------


def _desc(media_type: Any, digest: Any, size: Any, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": digest, "size": size, **extra}


def _doc(value: Any) -> bytes:
    return json.dumps(value).encode()


def test_parse_oci_index_with_platforms() -> None:
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            _desc(OCI_MANIFEST, sha(1), 500, platform={"os": "linux", "architecture": "amd64"}),
            _desc(
                OCI_MANIFEST,
                sha(2),
                501,
                platform={"os": "linux", "architecture": "arm", "variant": "v7"},
            ),
            _desc(OCI_MANIFEST, sha(3), 502),  # e.g. an attestation manifest: no platform
            _desc(OCI_MANIFEST, sha(4), 503, platform={"os": "", "architecture": ""}),
            _desc(OCI_MANIFEST, sha(5), 504, platform="linux/amd64"),  # not an object
        ],
        "annotations": {"org.opencontainers.image.ref.name": "v1"},
    }
    parsed = parse_document(OCI_INDEX, _doc(doc))
    assert parsed == Index(
        (
            IndexEntry(Descriptor(OCI_MANIFEST, sha(1), 500), "linux/amd64"),
            IndexEntry(Descriptor(OCI_MANIFEST, sha(2), 501), "linux/arm/v7"),
            IndexEntry(Descriptor(OCI_MANIFEST, sha(3), 502), None),
            IndexEntry(Descriptor(OCI_MANIFEST, sha(4), 503), None),
            IndexEntry(Descriptor(OCI_MANIFEST, sha(5), 504), None),
        )
    )


def test_parse_docker_manifest_list() -> None:
    doc = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST_LIST,
        "manifests": [
            _desc(DOCKER_MANIFEST, sha(1), 7, platform={"os": "linux", "architecture": "amd64"}),
            _desc(
                DOCKER_MANIFEST,
                SHA512,
                8,
                platform={"architecture": "arm64", "os": "linux", "variant": "v8"},
            ),
        ],
    }
    parsed = parse_document(DOCKER_MANIFEST_LIST, _doc(doc))
    assert isinstance(parsed, Index)
    assert [(e.descriptor, e.platform) for e in parsed.manifests] == [
        (Descriptor(DOCKER_MANIFEST, sha(1), 7), "linux/amd64"),
        (Descriptor(DOCKER_MANIFEST, SHA512, 8), "linux/arm64/v8"),
    ]


def test_parse_empty_index() -> None:
    assert parse_document(OCI_INDEX, b'{"manifests": []}') == Index(())


@pytest.mark.parametrize(
    ("media_type", "config_type", "layer_type"),
    [
        (OCI_MANIFEST, OCI_CONFIG, OCI_LAYER_GZIP),
        (DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER_GZIP),
    ],
)
def test_parse_manifest(media_type: str, config_type: str, layer_type: str) -> None:
    doc = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": _desc(config_type, sha(10), 1469),
        "layers": [_desc(layer_type, sha(11), 0), _desc(layer_type, sha(12), 2**40)],
    }
    parsed = parse_document(media_type, _doc(doc))
    assert parsed == Manifest(
        config=Descriptor(config_type, sha(10), 1469),
        layers=(
            Descriptor(layer_type, sha(11), 0),
            Descriptor(layer_type, sha(12), 2**40),
        ),
    )


def test_parse_manifest_without_layers_entries() -> None:
    doc = {"config": _desc(OCI_CONFIG, sha(1), 2), "layers": []}
    assert parse_document(OCI_MANIFEST, _doc(doc)) == Manifest(
        Descriptor(OCI_CONFIG, sha(1), 2),
        (),
    )


@pytest.mark.parametrize(
    "media_type",
    [OCI_CONFIG, DOCKER_CONFIG, OCI_LAYER_GZIP, DOCKER_LAYER_GZIP, "application/octet-stream", ""],
)
@pytest.mark.parametrize("data", [b"", b"\x1f\x8b\x08\x00garbage", b'{"manifests": "nope"}'])
def test_configs_and_layers_parse_to_none_without_reading(media_type: str, data: bytes) -> None:
    assert not is_index(media_type)
    assert not is_manifest(media_type)
    assert parse_document(media_type, data) is None


def test_media_type_classification() -> None:
    assert is_index(OCI_INDEX)
    assert is_index(DOCKER_MANIFEST_LIST)
    assert is_manifest(OCI_MANIFEST)
    assert is_manifest(DOCKER_MANIFEST)
    assert not is_index(OCI_MANIFEST)
    assert not is_manifest(OCI_INDEX)


def _manifest_with_layer(layer: Any) -> bytes:
    return _doc({"config": _desc(OCI_CONFIG, sha(1), 1), "layers": [layer]})


@pytest.mark.parametrize(
    ("media_type", "data"),
    [
        # Not JSON at all.
        (OCI_INDEX, b""),
        (OCI_INDEX, b"{"),
        (OCI_MANIFEST, b"not json"),
        (OCI_MANIFEST, b"\xff\xfe\xfa"),
        (OCI_MANIFEST, b'{"config": 1,}'),
        # JSON, but not an object.
        (OCI_INDEX, b"[]"),
        (OCI_INDEX, b'"manifests"'),
        (OCI_MANIFEST, b"null"),
        (OCI_MANIFEST, b"42"),
        # Wrong shapes.
        (OCI_INDEX, b"{}"),
        (OCI_INDEX, b'{"manifests": {}}'),
        (DOCKER_MANIFEST_LIST, b'{"manifests": null}'),
        (OCI_MANIFEST, b"{}"),
        (OCI_MANIFEST, _doc({"config": _desc(OCI_CONFIG, sha(1), 1)})),
        (OCI_MANIFEST, _doc({"config": _desc(OCI_CONFIG, sha(1), 1), "layers": {}})),
        (DOCKER_MANIFEST, _doc({"layers": []})),
        (OCI_MANIFEST, _doc({"config": [], "layers": []})),
        (OCI_MANIFEST, _manifest_with_layer("sha256:" + "0" * 64)),
        (OCI_MANIFEST, _manifest_with_layer(None)),
        # Bad descriptors.
        (OCI_MANIFEST, _manifest_with_layer(_desc(OCI_LAYER_GZIP, sha(2), -1))),
        (OCI_MANIFEST, _manifest_with_layer(_desc(OCI_LAYER_GZIP, sha(2), True))),
        (OCI_MANIFEST, _manifest_with_layer(_desc(OCI_LAYER_GZIP, sha(2), False))),
        (OCI_MANIFEST, _manifest_with_layer(_desc(OCI_LAYER_GZIP, sha(2), 1.5))),
        (OCI_MANIFEST, _manifest_with_layer(_desc(OCI_LAYER_GZIP, sha(2), 1.0))),
        (OCI_MANIFEST, _manifest_with_layer(_desc(OCI_LAYER_GZIP, sha(2), "1"))),
        (OCI_MANIFEST, _manifest_with_layer(_desc(OCI_LAYER_GZIP, sha(2), None))),
        (OCI_MANIFEST, _manifest_with_layer({"mediaType": OCI_LAYER_GZIP, "digest": sha(2)})),
        (OCI_MANIFEST, _manifest_with_layer({"digest": sha(2), "size": 1})),
        (OCI_MANIFEST, _manifest_with_layer({"mediaType": OCI_LAYER_GZIP, "size": 1})),
        (OCI_MANIFEST, _manifest_with_layer(_desc(5, sha(2), 1))),
        (OCI_MANIFEST, _manifest_with_layer(_desc(OCI_LAYER_GZIP, "sha256:abc", 1))),
        (OCI_MANIFEST, _manifest_with_layer(_desc(OCI_LAYER_GZIP, sha(2).upper(), 1))),
        (OCI_MANIFEST, _manifest_with_layer(_desc(OCI_LAYER_GZIP, 12, 1))),
        (OCI_MANIFEST, _doc({"config": _desc(OCI_CONFIG, "md5:00", 1), "layers": []})),
        (OCI_INDEX, _doc({"manifests": [_desc(OCI_MANIFEST, sha(1), -5)]})),
        (OCI_INDEX, _doc({"manifests": [_desc(OCI_MANIFEST, "sha256:zz", 5)]})),
        (DOCKER_MANIFEST_LIST, _doc({"manifests": [_desc(DOCKER_MANIFEST, sha(1), True)]})),
    ],
)
def test_parse_document_rejects_malformed_documents(media_type: str, data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        parse_document(media_type, data)


def test_parse_document_rejects_deeply_nested_json() -> None:
    # 10 kB, far under the 4 MiB document limit the store applies before parsing.
    with pytest.raises(RemoteProtocolError):
        parse_document(OCI_INDEX, b"[" * 10_000)


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | valid_digests
    | st.sampled_from([OCI_INDEX, OCI_MANIFEST, OCI_CONFIG, OCI_LAYER_GZIP])
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "mediaType",
                    "digest",
                    "size",
                    "platform",
                    "os",
                    "architecture",
                    "variant",
                    "manifests",
                    "layers",
                    "config",
                ]
            )
            | st.text(max_size=8),
            children,
            max_size=6,
        )
    ),
    max_leaves=20,
)
descriptor_like = st.fixed_dictionaries(
    {},
    optional={
        "mediaType": json_values,
        "digest": valid_digests | json_values,
        "size": st.integers(min_value=-3, max_value=2**64) | json_values,
        "platform": json_values,
    },
)
document_like = st.fixed_dictionaries(
    {},
    optional={
        "manifests": st.lists(descriptor_like | json_values, max_size=4) | json_values,
        "layers": st.lists(descriptor_like | json_values, max_size=4) | json_values,
        "config": descriptor_like | json_values,
        "schemaVersion": json_values,
    },
)
all_media_types = st.sampled_from(
    [
        OCI_INDEX,
        DOCKER_MANIFEST_LIST,
        OCI_MANIFEST,
        DOCKER_MANIFEST,
        OCI_CONFIG,
        DOCKER_CONFIG,
        OCI_LAYER_GZIP,
        DOCKER_LAYER_GZIP,
    ]
)


def _check_parse(media_type: str, data: bytes) -> None:
    try:
        parsed = parse_document(media_type, data)
    except RemoteProtocolError:
        assert is_index(media_type) or is_manifest(media_type)
        return
    if is_index(media_type):
        assert isinstance(parsed, Index)
        for entry in parsed.manifests:
            assert is_digest(entry.descriptor.digest)
            assert type(entry.descriptor.size) is int
            assert entry.descriptor.size >= 0
    elif is_manifest(media_type):
        assert isinstance(parsed, Manifest)
        for desc in (parsed.config, *parsed.layers):
            assert is_digest(desc.digest)
            assert type(desc.size) is int
            assert desc.size >= 0
    else:
        assert parsed is None


@FAST
@given(all_media_types, st.binary(max_size=200))
def test_parse_document_arbitrary_bytes(media_type: str, data: bytes) -> None:
    _check_parse(media_type, data)


@FAST
@given(all_media_types, json_values | document_like)
def test_parse_document_arbitrary_json(media_type: str, value: Any) -> None:
    _check_parse(media_type, json.dumps(value).encode())


descriptors = st.builds(
    Descriptor,
    st.sampled_from([OCI_MANIFEST, DOCKER_MANIFEST, OCI_CONFIG, OCI_LAYER_GZIP]) | st.text(),
    valid_digests,
    st.integers(min_value=0, max_value=2**63 - 1),
)
platforms = st.none() | st.builds(
    lambda os_, arch, variant: "/".join(p for p in (os_, arch, variant) if p),
    st.sampled_from(["linux", "windows"]),
    st.sampled_from(["amd64", "arm64", "arm"]),
    st.sampled_from(["", "v7", "v8"]),
)


def _platform_json(platform: str) -> dict[str, str]:
    keys = ["os", "architecture", "variant"]
    return dict(zip(keys, platform.split("/"), strict=False))


@FAST
@given(
    st.lists(st.tuples(descriptors, platforms), max_size=5),
    st.sampled_from([OCI_INDEX, DOCKER_MANIFEST_LIST]),
)
def test_generated_index_round_trips(entries: list[tuple[Descriptor, str | None]], mt: str) -> None:
    doc = {
        "manifests": [
            _desc(d.media_type, d.digest, d.size)
            | ({} if p is None else {"platform": _platform_json(p)})
            for d, p in entries
        ]
    }
    assert parse_document(mt, _doc(doc)) == Index(tuple(IndexEntry(d, p) for d, p in entries))


@FAST
@given(
    descriptors, st.lists(descriptors, max_size=5), st.sampled_from([OCI_MANIFEST, DOCKER_MANIFEST])
)
def test_generated_manifest_round_trips(
    config: Descriptor, layers: list[Descriptor], mt: str
) -> None:
    doc = {
        "config": _desc(config.media_type, config.digest, config.size),
        "layers": [_desc(d.media_type, d.digest, d.size) for d in layers],
    }
    assert parse_document(mt, _doc(doc)) == Manifest(config, tuple(layers))
