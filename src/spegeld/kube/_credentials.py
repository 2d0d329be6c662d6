"""Where the Kubernetes API is and how to prove who we are: kubeconfig or in-cluster.

Only the static credential forms are supported: a bearer token (inline or from a
file re-read on every request, so projected ServiceAccount tokens can rotate), a
client certificate and key, or nothing. Exec plugins, auth-providers, basic auth,
impersonation and proxies are refused by name: a daemon that starts on every node
must not run arbitrary commands or depend on a desktop login flow, and a
half-supported feature would fail later and less clearly.

Secrets (tokens, keys) are kept out of reprs, logs and error messages; paths,
context, cluster and user names are not secret and are named freely.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from spegeld.errors import KubeconfigError

__all__ = [
    "DEFAULT_ACCOUNT_DIR",
    "Credentials",
    "discover",
    "in_cluster",
    "jwt_claims",
    "jwt_expiry",
    "load_kubeconfig",
]

logger = logging.getLogger(__name__)

DEFAULT_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# Kubeconfigs, PEM bundles and tokens are kilobytes; a cap keeps /dev/zero from eating RAM.
MAX_FILE_BYTES = 4 * 1024 * 1024
# Group or other may read or write: either leaks or lets someone redirect our credentials.
_LOOSE_MODE_BITS = 0o066
_Fail = Callable[[str], KubeconfigError]
# The two settings that remove the API server's authentication: say what each means and the fix.
_HTTP_WARNING = (
    "{where}: server {server} uses plain http: requests and the token travel unencrypted "
    "and the API server is not authenticated, so anyone on the path can read the token or "
    "answer in its place; use the https:// address (Talos KubePrism: https://127.0.0.1:7445) "
    "with the cluster's CA in certificate-authority-data"
)
_INSECURE_WARNING = (
    "{where}: insecure-skip-tls-verify is true: the API server's certificate is not checked, "
    "so anyone on the path can impersonate it and receive the token; remove "
    "insecure-skip-tls-verify and put the cluster's CA in certificate-authority-data "
    "(kubectl config view --raw --minify shows it)"
)

# Fields kubectl understands that spegeld deliberately refuses, with the name to show.
_UNSUPPORTED_USER_FIELDS = {
    "exec": "an exec credential plugin",
    "auth-provider": "an auth-provider",
    "username": "basic auth (username/password)",
    "password": "basic auth (username/password)",
    "as": "impersonation (as)",
    "as-uid": "impersonation (as-uid)",
    "as-groups": "impersonation (as-groups)",
    "as-user-extra": "impersonation (as-user-extra)",
}
_UNSUPPORTED_CLUSTER_FIELDS = {"proxy-url": "a proxy (proxy-url)"}


@dataclass(frozen=True, slots=True)
class Credentials:
    """A validated API endpoint plus credentials; build it with the functions below.

    ``server`` is ``scheme://host[:port][/prefix]`` without a trailing slash; http is
    accepted (some test and proxy setups use it) but draws a warning.
    """

    server: str
    source: str  # for people: where these came from
    ca_pem: bytes | None = field(default=None, repr=False)  # None: the system trust store
    insecure_skip_tls_verify: bool = False
    tls_server_name: str | None = None
    token: str | None = field(default=None, repr=False)
    token_file: Path | None = None  # wins over ``token``; re-read for every request
    client_cert_pem: bytes | None = field(default=None, repr=False)
    client_key_pem: bytes | None = field(default=None, repr=False)
    namespace: str | None = None
    warnings: tuple[str, ...] = ()

    def bearer_token(self) -> str | None:
        """The token to send now: the token file's current content, else the inline token.

        Read synchronously on purpose: it is a small file on a local (usually tmpfs)
        filesystem, and reading it per request is what makes rotation work.
        """
        if self.token_file is not None:
            return _read_token_file(self.token_file)
        return self.token

    @property
    def host(self) -> str:
        """The server's host name or IP address (IPv6 without brackets)."""
        hostname = urlsplit(self.server).hostname
        assert hostname is not None  # validated on construction by _validate_server
        return hostname

    @property
    def port(self) -> int:
        parts = urlsplit(self.server)
        return parts.port or (443 if parts.scheme == "https" else 80)

    @property
    def uses_tls(self) -> bool:
        return self.server.startswith("https://")


def load_kubeconfig(path: Path, context: str | None = None) -> Credentials:
    """Read ``path`` and resolve ``context`` (default: its current-context)."""
    warnings: list[str] = []
    document = _parse(path, _read_file(path, "kubeconfig"))
    _note_loose_mode(path, "kubeconfig", warnings)

    def fail(reason: str) -> KubeconfigError:
        return KubeconfigError(f"kubeconfig {path}: {reason}")

    if context is None:
        context = document.get("current-context")
        if not context or not isinstance(context, str):
            raise fail("no current-context is set; pass a context explicitly")
    ctx = _named(document, "contexts", "context", context, fail)
    cluster_name = _string(ctx, "cluster", f"context {context!r}", fail)
    user_name = _string(ctx, "user", f"context {context!r}", fail)
    namespace = _string(ctx, "namespace", f"context {context!r}", fail)
    if not cluster_name:
        raise fail(f"context {context!r} names no cluster")
    cluster = _named(document, "clusters", "cluster", cluster_name, fail)
    user = _named(document, "users", "user", user_name, fail) if user_name else {}

    server, ca_pem, insecure, tls_server_name = _cluster_fields(
        cluster, f"cluster {cluster_name!r}", path, fail, warnings
    )
    who = f"user {user_name!r}" if user_name else f"context {context!r}"
    token, token_file, cert, key = _user_fields(user, who, path.parent, fail, warnings)
    return _finish(
        Credentials(
            server=server,
            source=f"kubeconfig {path}, context {context}",
            ca_pem=ca_pem,
            insecure_skip_tls_verify=insecure,
            tls_server_name=tls_server_name,
            token=token,
            token_file=token_file,
            client_cert_pem=cert,
            client_key_pem=key,
            namespace=namespace or None,
            warnings=tuple(warnings),
        )
    )


def _parse(path: Path, text: bytes) -> dict[str, Any]:
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise KubeconfigError(f"kubeconfig {path}: not valid YAML{where}") from None
    if not isinstance(document, dict):
        raise KubeconfigError(f"kubeconfig {path}: not a kubeconfig (expected a mapping)")
    return document


def _cluster_fields(
    cluster: dict[str, Any], where: str, path: Path, fail: _Fail, warnings: list[str]
) -> tuple[str, bytes | None, bool, str | None]:
    """The server URL, CA, insecure flag and TLS server name of one cluster entry."""
    named = f"kubeconfig {path}, {where}"  # a warning is a log line: it names the file
    for name, feature in _UNSUPPORTED_CLUSTER_FIELDS.items():
        if cluster.get(name):
            raise fail(f"{where} uses {feature}, which spegeld does not support")
    server = _string(cluster, "server", where, fail)
    if not server:
        raise fail(f"{where} has no server")
    server = _validate_server(server, fail)
    if server.startswith("http://"):
        warnings.append(_HTTP_WARNING.format(where=named, server=server))
    insecure = cluster.get("insecure-skip-tls-verify", False)
    if not isinstance(insecure, bool):
        raise fail(f"{where}: insecure-skip-tls-verify must be true or false")
    if insecure:
        warnings.append(_INSECURE_WARNING.format(where=named))
    ca_pem = _data_or_file(
        cluster, "certificate-authority", where, path.parent, fail, warnings=None
    )
    if insecure and ca_pem is not None:
        raise fail(f"{where} sets both insecure-skip-tls-verify and a certificate authority")
    tls_server_name = _string(cluster, "tls-server-name", where, fail) or None
    return server, ca_pem, insecure, tls_server_name


def _user_fields(
    user: dict[str, Any], who: str, base: Path, fail: _Fail, warnings: list[str]
) -> tuple[str | None, Path | None, bytes | None, bytes | None]:
    """The token, token file, client certificate and client key of one user entry."""
    for name, feature in _UNSUPPORTED_USER_FIELDS.items():
        if user.get(name):
            raise fail(
                f"{who} uses {feature}{_feature_detail(user, name)}, which spegeld does not "
                "support; give it a ServiceAccount token or a client certificate instead"
            )
    token = _optional_string(user, "token", who, fail).strip() or None
    token_file: Path | None = None
    token_file_text = _string(user, "tokenFile", who, fail)
    if token_file_text:
        token_file = _resolve(base, token_file_text)
        try:
            _read_token_file(token_file)  # fail now, not at the first request
        except KubeconfigError as exc:
            raise fail(str(exc)) from None
        _note_loose_mode(token_file, "token file", warnings)
    cert = _data_or_file(user, "client-certificate", who, base, fail, warnings=None)
    key = _data_or_file(user, "client-key", who, base, fail, warnings=warnings)
    if (cert is None) != (key is None):
        missing = "client-key" if key is None else "client-certificate"
        raise fail(f"{who} has a client certificate or key without its {missing}")
    if token is None and token_file is None and cert is None:
        warnings.append(f"{who} has no credentials: requests will be anonymous")
    return token, token_file, cert, key


def _feature_detail(user: dict[str, Any], name: str) -> str:
    """Which plugin or provider, so the message points at the right kubeconfig lines."""
    section = user.get(name)
    if not isinstance(section, dict):
        return ""
    value = section.get("command" if name == "exec" else "name")
    if not isinstance(value, str) or name not in {"exec", "auth-provider"}:
        return ""
    return f" (command {value!r})" if name == "exec" else f" ({value!r})"


def in_cluster(
    environ: Mapping[str, str] = os.environ, account_dir: Path = DEFAULT_ACCOUNT_DIR
) -> Credentials:
    """The pod's ServiceAccount: API address from the environment, token/CA from files."""
    host = environ.get("KUBERNETES_SERVICE_HOST", "").strip()
    port = environ.get("KUBERNETES_SERVICE_PORT", "").strip()
    if not host or not port:
        raise KubeconfigError(
            "in-cluster credentials need KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT"
        )

    def fail(reason: str) -> KubeconfigError:
        return KubeconfigError(f"in-cluster credentials: {reason}")

    bracketed = f"[{host}]" if ":" in host and not host.startswith("[") else host
    server = _validate_server(f"https://{bracketed}:{port}", fail)
    token_file = account_dir / "token"
    _read_token_file(token_file)
    ca_pem = _read_file(account_dir / "ca.crt", "service account CA")
    namespace: str | None = None
    namespace_file = account_dir / "namespace"
    if namespace_file.exists():
        raw = _read_file(namespace_file, "service account namespace")
        namespace = raw.decode("utf-8", "replace").strip()
    # No permission warning here: projected tokens are 0644 by design inside the pod.
    return _finish(
        Credentials(
            server=server,
            source="in-cluster service account",
            ca_pem=ca_pem,
            token_file=token_file,
            namespace=namespace or None,
        )
    )


def discover(
    kubeconfig: Path | None,
    context: str | None = None,
    environ: Mapping[str, str] = os.environ,
    account_dir: Path = DEFAULT_ACCOUNT_DIR,
) -> Credentials | None:
    """Explicit kubeconfig, else ``$KUBECONFIG``, else in-cluster in a pod, else ``None``."""
    if kubeconfig is None and environ.get("KUBECONFIG"):
        kubeconfig = pick_from_env(environ["KUBECONFIG"], context)
    if kubeconfig is not None:
        return load_kubeconfig(kubeconfig, context)
    if context is not None:
        raise KubeconfigError(f"a kubeconfig context ({context}) needs a kubeconfig")
    if environ.get("KUBERNETES_SERVICE_HOST"):
        return in_cluster(environ, account_dir)
    return None


def pick_from_env(value: str, context: str | None) -> Path:
    """The file of a ``KUBECONFIG`` list (``os.pathsep``-separated, like kubectl) to use.

    kubectl merges the files, the first to set a value winning; spegeld does not merge:
    it takes the first existing file that defines ``context`` or, with none given, that
    sets a current-context. Missing files are skipped, as kubectl does. A context whose
    cluster or user lives in another file of the list is therefore not found; the error
    from load_kubeconfig names the file, and ``--kubeconfig`` picks one explicitly.
    """
    paths = [Path(item) for item in value.split(os.pathsep) if item]
    existing = [path for path in paths if path.exists()]
    if not existing:
        raise KubeconfigError(f"KUBECONFIG={value}: none of its files exists")
    for path in existing:
        document = _parse(path, _read_file(path, "kubeconfig"))
        if context is None and document.get("current-context"):
            return path
        contexts = document.get("contexts")
        names = (
            [c.get("name") for c in contexts if isinstance(c, dict)]
            if isinstance(contexts, list)
            else []
        )
        if context is not None and context in names:
            return path
    wanted = f"defines context {context!r}" if context else "sets a current-context"
    raise KubeconfigError(f"KUBECONFIG={value}: no file {wanted}")


def jwt_claims(token: str) -> dict[str, Any]:
    """The payload of a JWT, unverified (for diagnosis only); ``{}`` otherwise. Never raises."""
    try:
        parts = token.split(".")
        if len(parts) != 3:
            return {}
        payload = parts[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (ValueError, TypeError, AttributeError, RecursionError):
        # binascii.Error, UnicodeDecodeError and JSONDecodeError are ValueErrors.
        return {}
    return claims if isinstance(claims, dict) else {}


def jwt_expiry(token: str) -> datetime | None:
    """The ``exp`` claim of a JWT as an aware UTC time, unverified; ``None`` if absent."""
    exp = jwt_claims(token).get("exp")
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        return None
    try:
        return datetime.fromtimestamp(exp, UTC)
    except (ValueError, OverflowError, OSError):  # out of range, NaN or inf
        return None


def _finish(credentials: Credentials) -> Credentials:
    for warning in credentials.warnings:
        logger.warning("%s", warning)
    return credentials


def _validate_server(server: str, fail: _Fail) -> str:
    try:
        parts = urlsplit(server.strip())
        port = parts.port
    except ValueError:
        raise fail("server is not a valid URL") from None
    if parts.username is not None or parts.password is not None:
        raise fail("server URL must not contain credentials")
    if parts.scheme not in {"https", "http"}:
        raise fail(f"server {server!r} must start with https://")
    if not parts.hostname:
        raise fail(f"server {server!r} has no host")
    if parts.query or parts.fragment:
        raise fail(f"server {server!r} must not have a query or fragment")
    if port == 0:
        raise fail(f"server {server!r} has port 0")
    return f"{parts.scheme}://{parts.netloc}{parts.path}".rstrip("/")


def _named(
    document: dict[str, Any], section: str, kind: str, name: str, fail: _Fail
) -> dict[str, Any]:
    entries = document.get(section) or []
    if not isinstance(entries, list):
        raise fail(f"{section} must be a list")
    for entry in entries:
        if isinstance(entry, dict) and entry.get("name") == name:
            body = entry.get(kind) or {}
            if not isinstance(body, dict):
                raise fail(f"{kind} {name!r} must be a mapping")
            return body
    raise fail(f"no {kind} named {name!r}")


def _optional_string(mapping: dict[str, Any], key: str, where: str, fail: _Fail) -> str:
    value = mapping.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise fail(f"{where}: {key} must be a string")
    return value


def _string(mapping: dict[str, Any], key: str, where: str, fail: _Fail) -> str:
    return _optional_string(mapping, key, where, fail).strip()


def _data_or_file(
    mapping: dict[str, Any],
    key: str,
    where: str,
    base: Path,
    fail: _Fail,
    *,
    warnings: list[str] | None,
) -> bytes | None:
    """``key-data`` (base64) or ``key`` (a path relative to the kubeconfig), not both.

    ``warnings`` is given for secret files (the client key), which must not be loose.
    """
    data = _optional_string(mapping, f"{key}-data", where, fail)
    file = _optional_string(mapping, key, where, fail)
    if data and file:
        raise fail(f"{where} sets both {key} and {key}-data")
    if data:
        try:
            return base64.b64decode("".join(data.split()), validate=True)
        except (binascii.Error, ValueError):
            raise fail(f"{where}: {key}-data is not valid base64") from None
    if file:
        resolved = _resolve(base, file)
        try:
            content = _read_file(resolved, key)
        except KubeconfigError as exc:
            raise fail(str(exc)) from None
        if warnings is not None:
            _note_loose_mode(resolved, key, warnings)
        return content
    return None


def _resolve(base: Path, name: str) -> Path:
    path = Path(name).expanduser()
    return path if path.is_absolute() else base / path


def _read_file(path: Path, what: str) -> bytes:
    try:
        with path.open("rb") as file:
            content = file.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise KubeconfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if len(content) > MAX_FILE_BYTES:
        raise KubeconfigError(f"{what} {path} is larger than {MAX_FILE_BYTES} bytes")
    return content


def _read_token_file(path: Path) -> str:
    try:
        token = _read_file(path, "token file").decode("utf-8").strip()
    except UnicodeDecodeError:
        raise KubeconfigError(f"token file {path} is not UTF-8 text") from None
    if not token:
        raise KubeconfigError(f"token file {path} is empty")
    return token


def _note_loose_mode(path: Path, what: str, warnings: list[str]) -> None:
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if stat.S_ISREG(mode) and mode & _LOOSE_MODE_BITS:
        access = "readable" if mode & 0o044 else "writable"
        warnings.append(
            f"{what} {path} is {access} by other users (mode {stat.S_IMODE(mode):04o}); "
            "chmod 600 it"
        )
