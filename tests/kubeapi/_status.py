"""Kubernetes ``Status`` errors, worded the way kube-apiserver words them.

The message formats follow apimachinery's ``errors.New*`` constructors and the
authorization filter's ``forbiddenMessage``: clients (kubectl, client-go, the
Python client and spegeld) print or match these strings, so they are part of the
contract the test server must keep.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

OPTIMISTIC_LOCK_MSG = (
    "the object has been modified; please apply your changes to the latest version and try again"
)


def qualified(resource: str, group: str) -> str:
    """``leases.coordination.k8s.io``; core-group resources stay bare (``namespaces``)."""
    return f"{resource}.{group}" if group else resource


def go_quote(text: str) -> str:
    """Go's ``%q`` for the plain strings that appear in messages."""
    return json.dumps(text, ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class FieldError:
    """One entry of a ``field.ErrorList``: rendered as ``path: Type: detail``."""

    path: str
    type: str  # "Invalid value", "Required value", "Unsupported value", ...
    detail: str
    value: Any = None

    @property
    def reason(self) -> str:
        return {
            "Invalid value": "FieldValueInvalid",
            "Required value": "FieldValueRequired",
            "Forbidden": "FieldValueForbidden",
        }.get(self.type, "FieldValueInvalid")

    def body(self) -> str:
        if self.type != "Invalid value":
            return f"{self.type}: {self.detail}"
        value = self.value
        if isinstance(value, str):
            shown = go_quote(value)
        elif isinstance(value, bool):
            shown = "true" if value else "false"
        elif isinstance(value, GoHex):
            shown = f"{int(value):#x}"
        else:
            shown = str(value)
        return f"{self.type}: {shown}: {self.detail}"

    def __str__(self) -> str:
        return f"{self.path}: {self.body()}"


class GoHex(int):
    """A uint64 that Go prints with ``%#v`` (``0x0``), as for a missing resourceVersion."""


@dataclass
class ApiError(Exception):
    """An error answer; ``status()`` is the JSON body the real server would send."""

    code: int
    reason: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
        }
        details = {k: v for k, v in self.details.items() if v not in ("", None, [])}
        if details:
            body["details"] = details
        body["code"] = self.code
        return body


def _details(resource: str, group: str, name: str) -> dict[str, Any]:
    return {"name": name, "group": group, "kind": resource}


def not_found(resource: str, group: str, name: str) -> ApiError:
    return ApiError(
        404,
        "NotFound",
        f"{qualified(resource, group)} {go_quote(name)} not found",
        _details(resource, group, name),
    )


def resource_not_found() -> ApiError:
    """What the real server says for an unknown resource inside a served group version."""
    return ApiError(404, "NotFound", "the server could not find the requested resource")


def already_exists(resource: str, group: str, name: str) -> ApiError:
    return ApiError(
        409,
        "AlreadyExists",
        f"{qualified(resource, group)} {go_quote(name)} already exists",
        _details(resource, group, name),
    )


def conflict(resource: str, group: str, name: str, why: str = OPTIMISTIC_LOCK_MSG) -> ApiError:
    return ApiError(
        409,
        "Conflict",
        f"Operation cannot be fulfilled on {qualified(resource, group)} {go_quote(name)}: {why}",
        _details(resource, group, name),
    )


def invalid(kind: str, group: str, name: str, errors: list[FieldError]) -> ApiError:
    what = f"{kind}.{group}" if group else kind
    joined = str(errors[0]) if len(errors) == 1 else "[" + ", ".join(map(str, errors)) + "]"
    causes = [{"reason": e.reason, "message": e.body(), "field": e.path} for e in errors]
    return ApiError(
        422,
        "Invalid",
        f"{what} {go_quote(name)} is invalid: {joined}",
        {"name": name, "group": group, "kind": kind, "causes": causes},
    )


def forbidden(
    user: str, verb: str, resource: str, group: str, namespace: str, name: str
) -> ApiError:
    where = f"in the namespace {go_quote(namespace)}" if namespace else "at the cluster scope"
    why = (
        f"User {go_quote(user)} cannot {verb} resource {go_quote(resource)} "
        f"in API group {go_quote(group)} {where}"
    )
    subject = qualified(resource, group)
    head = f"{subject} {go_quote(name)}" if name else subject
    return ApiError(
        403, "Forbidden", f"{head} is forbidden: {why}", _details(resource, group, name)
    )


def unauthorized() -> ApiError:
    return ApiError(401, "Unauthorized", "Unauthorized")


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def method_not_allowed(method: str) -> ApiError:
    return ApiError(
        405,
        "MethodNotAllowed",
        f"the server does not allow this method on the requested resource ({method})",
    )


def unsupported_media_type(content_type: str) -> ApiError:
    return ApiError(
        415,
        "UnsupportedMediaType",
        f"the body of the request was in an unknown format: {content_type}",
    )


def internal(message: str) -> ApiError:
    return ApiError(
        500,
        "InternalError",
        f"Internal error occurred: {message}",
        {"causes": [{"message": message}]},
    )


def too_large() -> ApiError:
    return ApiError(413, "RequestEntityTooLarge", "Request entity too large: limit is 3145728")
