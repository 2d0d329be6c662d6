"""A stand-in Docker token server, for Distribution's ``auth: token`` (tests only).

Why a stand-in: the real one (cesanta/docker_auth) cannot be built here, the Go module
proxy answers ``403`` for it (``go list -m -versions github.com/cesanta/docker_auth/auth_server``).
What it implements is the protocol as Distribution 2.8 verifies it
(``registry/auth/token/token.go`` and ``accesscontroller.go``): a JWT signed ``RS256`` by a
key whose self-signed certificate is the registry's ``rootcertbundle``, found either through
the ``x5c`` header (the certificate chain, standard base64 DER, checked against the bundle)
or through ``kid``, the libtrust key id of that certificate's key (SHA-256 of the DER
``SubjectPublicKeyInfo``, first 240 bits, base32 without padding, in 12 groups of 4 joined by
``:``); claims ``iss`` (the configured issuer), ``aud`` (the service), ``exp``/``nbf``
(checked with 60 s leeway), ``iat``, ``jti``, ``sub`` and ``access``
(``[{"type": "repository", "name": ..., "actions": ["pull"]}]``), which must contain every
access the request needs.

The endpoint answers ``GET /token?service=…&scope=repository:<name>:<actions>`` with
``Authorization: Basic`` (what containerd and spegeld send), and the OAuth2 ``POST`` form
(``grant_type=password``) as docker_auth does. Known user, right secret: ``200`` with a token
that grants ``pull`` on the requested repositories the user may pull, and nothing else (a
repository the user may not pull is left out of ``access``: the registry then answers the
token with ``401 insufficient_scope``). No or wrong credentials, another service: ``401``.

Plain threads and the standard library's HTTP server: the registry (a Go process) and
containerd call it, and the tests' trio code only reads :attr:`TokenServer.seen`.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import secrets
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

SERVICE = "spegeld-test-registry"
ISSUER = "spegeld-test-token-issuer"
TOKEN_TTL = 300  # seconds a token lasts; every test here finishes well within it
CERT_DAYS = 1  # the certificate outlives the test session, no longer
MAX_BODY = 16 * 1024  # bytes of an OAuth2 form; a real one is a few hundred


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def libtrust_key_id(key: rsa.RSAPublicKey) -> str:
    """The ``kid`` Distribution 2.8 gives a trusted certificate's key (libtrust's key id)."""
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    text = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(text[i : i + 4] for i in range(0, len(text), 4))


class TokenIssuer:
    """The signing key, its self-signed certificate (the registry's ``rootcertbundle``), and
    tokens signed by it."""

    def __init__(self, *, issuer: str = ISSUER, service: str = SERVICE) -> None:
        self.issuer = issuer
        self.service = service
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)])
        now = datetime.datetime.now(datetime.UTC)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
            .sign(self._key, hashes.SHA256())
        )
        self.key_id = libtrust_key_id(self._key.public_key())

    def write_bundle(self, path: Path) -> Path:
        path.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))
        return path

    def mint(self, subject: str, pull: Iterable[str], *, header: str = "kid") -> str:
        """A token for ``subject`` granting ``pull`` on the repositories ``pull``; the key is
        named by ``kid`` (as docker_auth does) or carried as ``x5c``."""
        head: dict[str, object] = {"typ": "JWT", "alg": "RS256"}
        if header == "kid":
            head["kid"] = self.key_id
        elif header == "x5c":
            der = self.certificate.public_bytes(serialization.Encoding.DER)
            head["x5c"] = [base64.b64encode(der).decode()]
        else:
            raise ValueError(f"header must be kid or x5c, not {header!r}")
        now = int(time.time())  # the registry checks exp/nbf against its wall clock
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": now + TOKEN_TTL,
            "nbf": now,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": [{"type": "repository", "name": name, "actions": ["pull"]} for name in pull],
        }
        signing_input = (
            _b64url(json.dumps(head).encode()) + "." + _b64url(json.dumps(claims).encode())
        )
        signature = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + _b64url(signature)


@dataclass(frozen=True, slots=True)
class TokenRequest:
    """What the token endpoint received, and what it answered."""

    method: str
    user: str | None  # None: no or malformed credentials
    scopes: tuple[str, ...]
    status: int
    granted: tuple[str, ...]  # repositories the token grants pull on


@dataclass(slots=True)
class _Policy:
    issuer: TokenIssuer
    users: Mapping[str, tuple[str, frozenset[str]]]  # user → (secret, pullable repositories)
    seen: list[TokenRequest] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(
        self, method: str, user: str | None, secret: str | None, service: str, scopes: list[str]
    ) -> tuple[int, bytes]:
        granted: list[str] = []
        entry = self.users.get(user or "")
        if (
            entry is None
            or secret is None
            or not secrets.compare_digest(entry[0], secret)
            or service != self.issuer.service
        ):
            status, body = 401, b'{"errors":[{"code":"UNAUTHORIZED"}]}'
        else:
            for scope in scopes:
                kind, _, rest = scope.partition(":")
                name, _, actions = rest.rpartition(":")
                if kind == "repository" and "pull" in actions.split(",") and name in entry[1]:
                    granted.append(name)
            token = self.issuer.mint(user or "", granted)
            doc = {"token": token, "access_token": token, "expires_in": TOKEN_TTL}
            status, body = 200, json.dumps(doc).encode()
        with self.lock:
            self.seen.append(TokenRequest(method, user, tuple(scopes), status, tuple(granted)))
        return status, body


def _basic(header: str | None) -> tuple[str | None, str | None]:
    scheme, _, value = (header or "").partition(" ")
    if scheme.lower() != "basic":
        return None, None
    try:
        user, sep, secret = base64.b64decode(value, validate=True).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        return None, None
    return (user, secret) if sep else (None, None)


class _Handler(BaseHTTPRequestHandler):
    server: _Server  # HTTP/1.0: one request per connection, so stop() leaves none open

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: what matters is in :attr:`TokenServer.seen`."""

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        if status == HTTPStatus.UNAUTHORIZED:
            self.send_header("www-authenticate", 'Basic realm="token"')
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        if parts.path != "/token":
            self._send(404, b"{}")
            return
        query = parse_qs(parts.query)
        user, secret = _basic(self.headers.get("authorization"))
        service = query.get("service", [""])[0]
        scopes = [s for value in query.get("scope", []) for s in value.split(" ") if s]
        self._send(*self.server.policy.answer("GET", user, secret, service, scopes))

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if urlsplit(self.path).path != "/token" or not 0 <= length <= MAX_BODY:
            self._send(404, b"{}")
            return
        form = parse_qs(self.rfile.read(length).decode(errors="replace"))
        if form.get("grant_type", [""])[0] != "password":
            self._send(400, b'{"error":"unsupported_grant_type"}')
            return
        user, secret = form.get("username", [None])[0], form.get("password", [None])[0]
        service = form.get("service", [""])[0]
        scopes = [s for value in form.get("scope", []) for s in value.split(" ") if s]
        self._send(*self.server.policy.answer("POST", user, secret, service, scopes))


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], policy: _Policy) -> None:
        self.policy = policy
        super().__init__(address, _Handler)


class TokenServer:
    """The token endpoint on ``127.0.0.1``, in a thread; :meth:`stop` and :meth:`start` keep
    the port (the registry's realm names it)."""

    def __init__(self, issuer: TokenIssuer, users: Mapping[str, tuple[str, Iterable[str]]]) -> None:
        self.issuer = issuer
        self._policy = _Policy(issuer, {u: (s, frozenset(r)) for u, (s, r) in users.items()})
        self.port = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    @property
    def seen(self) -> list[TokenRequest]:
        with self._policy.lock:
            return list(self._policy.seen)

    def start(self) -> TokenServer:
        server = _Server(("127.0.0.1", self.port), self._policy)
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop answering and close the port (connections to it are refused)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
