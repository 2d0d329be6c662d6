"""Pushing a :class:`~spegeld_harness.BuiltImage` with the registry's own API.

Config and layer blobs go up as monolithic uploads (``POST .../blobs/uploads/`` then
``PUT <location>&digest=``), streamed from :meth:`BuiltImage.open_blob`; blobs the registry
already has (``HEAD``) are skipped.  Then each platform manifest is PUT by digest and the
top object (index or manifest) by tag, each with its media type as Content-Type.  Every
digest the registry reports back is checked against the image's.
"""

from __future__ import annotations

import http.client
import re
import urllib.parse
from collections.abc import Mapping
from typing import IO, Final

from spegeld_harness._images import BuiltImage
from spegeld_harness._registry_http import Connection, UpstreamError

__all__ = ["default_repository", "push_image", "resolve_target"]

# Distribution's repository name grammar (reference.NameRegexp without a domain).
_REPO_COMPONENT: Final = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO_RE: Final = re.compile(rf"^{_REPO_COMPONENT}(?:/{_REPO_COMPONENT})*$")
_TAG_RE: Final = re.compile(r"^[\w][\w.-]{0,127}$")


def default_repository(image: BuiltImage) -> str:
    """``image.repository`` without a leading registry host (``example.com:5000/a/b`` -> ``a/b``).

    The first component is a host when it has a ``.`` or ``:`` or is ``localhost`` (the
    Docker rule).
    """
    first, sep, rest = image.repository.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return rest
    return image.repository


def resolve_target(image: BuiltImage, repository: str | None, tag: str | None) -> tuple[str, str]:
    """(repository, tag) to push to: the given ones, checked, or the image's own."""
    repo = default_repository(image) if repository is None else repository
    tag = image.tag if tag is None else tag
    if not _REPO_RE.match(repo):
        raise ValueError(f"not a valid repository name for the registry: {repo!r}")
    if not _TAG_RE.match(tag):
        raise ValueError(f"not a valid tag: {tag!r}")
    return repo, tag


def push_image(conn: Connection, image: BuiltImage, repo: str, tag: str) -> None:
    """Push every blob and manifest of ``image`` on ``conn``, then tag it ``repo:tag``."""
    manifests = {p.manifest for p in image.platforms} | {image.digest}
    for digest in sorted(d for d in image.blobs if d not in manifests):
        _push_blob(conn, image, repo, digest)
    if image.is_index:
        for p in image.platforms:
            _put_manifest(conn, image, repo, p.manifest, p.manifest)
    _put_manifest(conn, image, repo, image.digest, tag)


def _roundtrip(
    conn: Connection,
    method: str,
    path: str,
    headers: Mapping[str, str],
    *,
    body: bytes | IO[bytes] | None = None,
    expect: tuple[int, ...] = (200,),
) -> http.client.HTTPResponse:
    try:
        conn.request(method, path, body=body, headers=dict(headers))
        resp = conn.getresponse()
        data = resp.read()
    except OSError as e:
        conn.close()
        raise RuntimeError(f"{method} {path} on http://{conn.host}:{conn.port} failed: {e}") from e
    if resp.status not in expect:
        raise UpstreamError(method, path, resp.status, data)
    return resp


def _push_blob(conn: Connection, image: BuiltImage, repo: str, digest: str) -> None:
    blob_path = f"/v2/{repo}/blobs/{digest}"
    head = _roundtrip(conn, "HEAD", blob_path, {}, expect=(200, 404))
    if head.status == 200:
        return
    started = _roundtrip(
        conn, "POST", f"/v2/{repo}/blobs/uploads/", {"Content-Length": "0"}, expect=(202,)
    )
    location = started.headers.get("Location")
    if not location:
        raise UpstreamError("POST", f"/v2/{repo}/blobs/uploads/", 202, b"", " (no Location)")
    # Distribution answers with an absolute URL built from our Host header: keep the path.
    loc = urllib.parse.urlsplit(location)
    sep = "&" if loc.query else "?"
    query = f"{loc.query}{sep}digest={urllib.parse.quote(digest, safe=':')}"
    put_path = f"{loc.path}?{query}"
    size = image.blobs[digest].size
    headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
    with image.open_blob(digest) as f:
        done = _roundtrip(conn, "PUT", put_path, headers, body=f, expect=(201,))
    got = done.headers.get("Docker-Content-Digest")
    if got != digest:
        raise UpstreamError("PUT", put_path, 201, b"", f" (stored as {got}, not {digest})")


def _put_manifest(conn: Connection, image: BuiltImage, repo: str, digest: str, ref: str) -> None:
    path = f"/v2/{repo}/manifests/{ref}"
    headers = {"Content-Type": image.blobs[digest].media_type}
    resp = _roundtrip(conn, "PUT", path, headers, body=image.read_blob(digest), expect=(201,))
    got = resp.headers.get("Docker-Content-Digest")
    if got != digest:
        raise UpstreamError("PUT", path, 201, b"", f" (stored as {got}, not {digest})")
