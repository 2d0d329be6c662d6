"""Just enough of the Kubernetes protobuf encoding to read a SelfSubjectAccessReview.

client-go's typed clients (``kubectl auth can-i``) send built-in kinds as
``application/vnd.kubernetes.protobuf``: the 4-byte magic ``k8s\\0`` and a
``runtime.Unknown`` envelope (typeMeta=1 {apiVersion=1, kind=2}, raw=2) whose raw
bytes are the object in protobuf. Field numbers are those of k8s.io/api's
``generated.proto``. The decoded object is handed on as JSON, so the same schema
checks apply to both encodings. Unknown fields are skipped, as gogo-protobuf does.
"""

from __future__ import annotations

from typing import Any

MAGIC = b"k8s\x00"
PROTOBUF = "application/vnd.kubernetes.protobuf"


class ProtobufError(ValueError):
    pass


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ProtobufError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) pairs: varints as int, length-delimited as bytes."""
    out: list[tuple[int, int | bytes]] = []
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
            out.append((number, value))
        elif wire == 2:
            length, pos = _varint(data, pos)
            if pos + length > len(data):
                raise ProtobufError("truncated length-delimited field")
            out.append((number, data[pos : pos + length]))
            pos += length
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise ProtobufError(f"unsupported wire type {wire}")
    if pos != len(data):
        raise ProtobufError("truncated fixed-width field")
    return out


def _strings(data: bytes, names: dict[int, str]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for number, value in fields(data):
        if number in names and isinstance(value, bytes):
            try:
                result[names[number]] = value.decode()
            except UnicodeDecodeError as exc:
                raise ProtobufError(f"invalid UTF-8 in field {number}") from exc
    return result


_RESOURCE_ATTRIBUTES = {
    1: "namespace",
    2: "verb",
    3: "group",
    4: "version",
    5: "resource",
    6: "subresource",
    7: "name",
}
_NON_RESOURCE_ATTRIBUTES = {1: "path", 2: "verb"}
_OBJECT_META = {1: "name", 2: "generateName", 3: "namespace"}


def _ssar(raw: bytes) -> dict[str, Any]:
    review: dict[str, Any] = {}
    for number, value in fields(raw):
        if not isinstance(value, bytes):
            continue
        if number == 1:
            review["metadata"] = _strings(value, _OBJECT_META)
        elif number == 2:
            spec: dict[str, Any] = {}
            for sub, sub_value in fields(value):
                if sub == 1 and isinstance(sub_value, bytes):
                    spec["resourceAttributes"] = _strings(sub_value, _RESOURCE_ATTRIBUTES)
                elif sub == 2 and isinstance(sub_value, bytes):
                    spec["nonResourceAttributes"] = _strings(sub_value, _NON_RESOURCE_ATTRIBUTES)
            review["spec"] = spec
    return review


DECODERS = {("authorization.k8s.io/v1", "SelfSubjectAccessReview"): _ssar}


def decode(body: bytes) -> dict[str, Any]:
    """Envelope and object to a JSON-shaped dict; raises ProtobufError."""
    if not body.startswith(MAGIC):
        raise ProtobufError(
            "provided data does not appear to be a protobuf message, expected prefix [107 56 115 0]"
        )
    type_meta: dict[str, Any] = {}
    raw = b""
    for number, value in fields(body[len(MAGIC) :]):
        if number == 1 and isinstance(value, bytes):
            type_meta = _strings(value, {1: "apiVersion", 2: "kind"})
        elif number == 2 and isinstance(value, bytes):
            raw = value
    key = (type_meta.get("apiVersion", ""), type_meta.get("kind", ""))
    decoder = DECODERS.get(key)
    if decoder is None:
        raise ProtobufError(f"no protobuf decoder for {key[1]!r} in {key[0]!r} in this test server")
    return {"kind": key[1], "apiVersion": key[0], **decoder(raw)}
