"""OCI distribution errors as HTTP responses."""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RegistryError(Exception):
    """An answer that is an error: its HTTP status, OCI error code and message."""

    status: int
    code: str
    message: str
    headers: tuple[tuple[bytes, bytes], ...] = ()  # e.g. a 416's Content-Range

    def body(self) -> bytes:
        doc = {"errors": [{"code": self.code, "message": self.message, "detail": None}]}
        return json.dumps(doc).encode()


def manifest_unknown(what: str) -> RegistryError:
    return RegistryError(404, "MANIFEST_UNKNOWN", f"manifest unknown: {what}")


def blob_unknown(what: str) -> RegistryError:
    return RegistryError(404, "BLOB_UNKNOWN", f"blob unknown: {what}")


def name_invalid(message: str) -> RegistryError:
    return RegistryError(400, "NAME_INVALID", message)


def digest_invalid(message: str) -> RegistryError:
    return RegistryError(400, "DIGEST_INVALID", message)


def unsupported(message: str, status: int = 405) -> RegistryError:
    return RegistryError(status, "UNSUPPORTED", message)


def not_found(message: str = "not found") -> RegistryError:
    return RegistryError(404, "NOT_FOUND", message)
