"""Request-body decoding with the real server's strictness, driven by official schemas.

kube-apiserver decodes a body into Go structs: a JSON syntax error, a value of the
wrong type, a number out of int32 range or a time in the wrong layout fails the
decode, which the server answers with 400 ``BadRequest`` ("Lease in version "v1"
cannot be handled as a Lease: ..."). Unknown fields are handled by
``?fieldValidation=`` (Strict: 400 ``strict decoding error``; Warn/Ignore: dropped).
The JSON schemas that ``kubernetes-validate`` ships for Kubernetes 1.32 stand in for
the Go types here; semantic rules (names, positive durations) live in ``_leases``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from importlib.resources import files
from typing import Any

import jsonschema  # type: ignore[import-untyped]
from referencing import Registry, Resource

from ._status import bad_request, go_quote, unsupported_media_type

SCHEMA_DIR = "v1.32.0-local-strict"  # the server impersonates v1.32
GO_MICRO_LAYOUT = "2006-01-02T15:04:05.000000Z07:00"  # metav1.RFC3339Micro
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})\Z")
_INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}
# Go's layout, element by element: (layout text, regex a value must match there).
_MICRO_ELEMENTS = [
    ("2006", r"\d{4}"),
    ("-", "-"),
    ("01", r"\d{2}"),
    ("-", "-"),
    ("02", r"\d{2}"),
    ("T", "T"),
    ("15", r"\d{2}"),
    (":", ":"),
    ("04", r"\d{2}"),
    (":", ":"),
    ("05", r"\d{2}"),
    (".000000", r"\.\d{6}"),
    ("Z07:00", r"Z|[+-]\d{2}:\d{2}"),
]


def _schema_file(name: str) -> Any:
    path = files("kubernetes_validate") / "kubernetes-json-schema" / SCHEMA_DIR / name
    return json.loads(path.read_text(encoding="utf-8"))


@cache
def _registry() -> Registry:
    return Resource.from_contents(_schema_file("_definitions.json")) @ Registry()


def _is_int(_checker: Any, instance: Any) -> bool:
    # Go refuses 15.0 for an int32 field; jsonschema would accept it.
    return isinstance(instance, int) and not isinstance(instance, bool)


def _format_checker() -> jsonschema.FormatChecker:
    checker = jsonschema.FormatChecker(formats=())

    def in_range(fmt: str) -> Any:
        low, high = _INT_RANGES[fmt]
        return lambda v: not isinstance(v, int) or low <= v <= high

    checker.checks("int32")(in_range("int32"))
    checker.checks("int64")(in_range("int64"))
    checker.checks("date-time")(lambda v: not isinstance(v, str) or bool(_RFC3339.match(v)))
    return checker


@cache
def validator_for(schema_file: str) -> jsonschema.protocols.Validator:
    base = jsonschema.Draft202012Validator
    strict_types = base.TYPE_CHECKER.redefine("integer", _is_int)
    cls = jsonschema.validators.extend(base, type_checker=strict_types)
    return cls(_schema_file(schema_file), registry=_registry(), format_checker=_format_checker())


@dataclass(frozen=True, slots=True)
class ObjectType:
    """One kind the server accepts in bodies, and where its MicroTime fields are."""

    group: str
    version: str
    kind: str
    schema_file: str
    micro_times: tuple[tuple[str, ...], ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


LEASE = ObjectType(
    "coordination.k8s.io",
    "v1",
    "Lease",
    "lease-coordination-v1.json",
    (("spec", "acquireTime"), ("spec", "renewTime")),
)
SSAR = ObjectType(
    "authorization.k8s.io",
    "v1",
    "SelfSubjectAccessReview",
    "selfsubjectaccessreview-authorization-v1.json",
)
DELETE_OPTIONS = ObjectType("", "v1", "DeleteOptions", "deleteoptions-meta-v1.json")


def _go_type(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object" if isinstance(value, dict) else "null"


def _dotted(path: Any) -> str:
    return ".".join(str(p) for p in path)


def parse_micro_time(value: str) -> datetime:
    """Parse like Go's ``time.Parse(RFC3339Micro, value)``; raise ValueError with Go's wording."""
    rest, layout_left = value, GO_MICRO_LAYOUT
    for layout, pattern in _MICRO_ELEMENTS:
        match = re.match(pattern, rest)
        if match is None:
            raise ValueError(
                f"parsing time {go_quote(value)} as {go_quote(GO_MICRO_LAYOUT)}: "
                f"cannot parse {go_quote(rest)} as {go_quote(layout)}"
            )
        rest, layout_left = rest[match.end() :], layout_left[len(layout) :]
    if rest:
        raise ValueError(f"parsing time {go_quote(value)}: extra text: {go_quote(rest)}")
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)
    except ValueError as exc:
        raise ValueError(f"parsing time {go_quote(value)}: {exc}") from None


def format_micro_time(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def format_time(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class Decoded:
    obj: dict[str, Any]
    warnings: tuple[str, ...]


def decode_body(
    body: bytes, content_type: str | None, expected: ObjectType, field_validation: str
) -> Decoded:
    """Decode and check a request body as the real server would; raise ApiError."""
    media = (content_type or "application/json").split(";")[0].strip().lower()
    if media != "application/json":
        raise unsupported_media_type(content_type or "")
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad_request(f"couldn't get version/kind; json parse error: {exc}") from None
    if not isinstance(obj, dict):
        raise bad_request(
            f"couldn't get version/kind; json parse error: json: cannot unmarshal "
            f"{_go_type(obj)} into Go value of type struct {{ APIVersion string "
            f'"json:\\"apiVersion,omitempty\\""; Kind string "json:\\"kind,omitempty\\"" }}'
        )
    api_version = obj.get("apiVersion") or expected.api_version
    kind = obj.get("kind") or expected.kind
    if not isinstance(api_version, str) or not isinstance(kind, str):
        raise bad_request(
            "couldn't get version/kind; json parse error: apiVersion and kind must be strings"
        )
    version = api_version.rsplit("/", 1)[-1]
    if api_version != expected.api_version:
        raise bad_request(
            f"the API version in the data ({api_version}) does not match the expected "
            f"API version ({expected.api_version})"
        )
    if kind != expected.kind:
        raise bad_request(
            f"{kind} in version {go_quote(version)} cannot be handled as a {expected.kind}: "
            f"no kind {go_quote(kind)} is registered for version {go_quote(api_version)} "
            f'in scheme "pkg/api/legacyscheme/scheme.go:30"'
        )
    obj["apiVersion"], obj["kind"] = api_version, kind
    prefix = f"{kind} in version {go_quote(version)} cannot be handled as a {expected.kind}: "

    for path in expected.micro_times:
        value = _dig(obj, path)
        if isinstance(value, str):
            try:
                parse_micro_time(value)
            except ValueError as exc:
                raise bad_request(f"{prefix}{exc}") from None
    unknown: list[tuple[list[Any], str]] = []
    for error in sorted(
        validator_for(expected.schema_file).iter_errors(obj),
        key=lambda e: [str(p) for p in e.absolute_path],
    ):
        where = list(error.absolute_path)
        if error.validator == "additionalProperties":
            allowed = set(error.schema.get("properties", {}))
            unknown += [(where, key) for key in error.instance if key not in allowed]
            continue
        if error.validator == "type":
            raise bad_request(
                f"{prefix}json: cannot unmarshal {_go_type(error.instance)} into Go struct field "
                f"{expected.kind}.{_dotted(where)} of type {_expected_go_type(error.validator_value)}"
            )
        raise bad_request(f"{prefix}{_dotted(where) or '<root>'}: {error.message}")
    warnings = tuple(f"unknown field {go_quote(_dotted([*w, k]))}" for w, k in unknown)
    if unknown and field_validation == "Strict":
        raise bad_request("strict decoding error: " + ", ".join(warnings))
    for where, key in unknown:
        parent = _dig(obj, tuple(where))
        if isinstance(parent, dict):
            parent.pop(key, None)
    return Decoded(obj, warnings if field_validation == "Warn" else ())


def _expected_go_type(types: Any) -> str:
    names = [t for t in (types if isinstance(types, list) else [types]) if t != "null"]
    return {
        "integer": "int32",
        "string": "string",
        "boolean": "bool",
        "object": "struct",
        "array": "slice",
    }.get(names[0] if names else "", "value")


def _dig(obj: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        if isinstance(obj, dict):
            obj = obj.get(key)
        elif isinstance(obj, list) and isinstance(key, int) and key < len(obj):
            obj = obj[key]
        else:
            return None
    return obj


def check_field_validation(value: str | None) -> str:
    if value in (None, ""):
        return ""
    if value not in ("Strict", "Warn", "Ignore"):
        raise bad_request(
            f"fieldValidation parameter unsupported: {go_quote(value or '')}. "
            "Supported values are: Ignore, Warn, Strict"
        )
    return value or ""
