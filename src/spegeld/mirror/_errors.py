"""OCI distribution errors as HTTP responses."""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class OciError(Exception):
    """An answer that is an error: its HTTP status, OCI error code and message."""

    status: int
    code: str
    message: str
    headers: tuple[tuple[bytes, bytes], ...] = ()  # e.g. a 416's Content-Range

    def body(self) -> bytes:
        doc = {"errors": [{"code": self.code, "message": self.message, "detail": None}]}
        return json.dumps(doc).encode()


def manifest_unknown(what: str) -> OciError:
    return OciError(404, "MANIFEST_UNKNOWN", f"manifest unknown: {what}")


def blob_unknown(what: str) -> OciError:
    return OciError(404, "BLOB_UNKNOWN", f"blob unknown: {what}")


def name_invalid(message: str) -> OciError:
    return OciError(400, "NAME_INVALID", message)


def digest_invalid(message: str) -> OciError:
    return OciError(400, "DIGEST_INVALID", message)


def unsupported(message: str, status: int = 405) -> OciError:
    return OciError(status, "UNSUPPORTED", message)


def not_found(message: str = "not found") -> OciError:
    return OciError(404, "NOT_FOUND", message)
