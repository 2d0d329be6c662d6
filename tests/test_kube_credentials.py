"""Kubeconfig and in-cluster credentials: every supported form, every refusal, no leaks."""

from __future__ import annotations

import base64
import json
import logging
import ssl
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml

from spegeld.errors import ConfigError, KubeconfigError
from spegeld.kube import (
    Credentials,
    discover,
    in_cluster,
    jwt_claims,
    jwt_expiry,
    load_kubeconfig,
    ssl_context,
)

TOKEN = "s3cr3t-token-value-0123456789"
ROTATED = "r0tated-token-value-9876543210"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def client_cert(ca: trustme.CA) -> trustme.LeafCert:
    return ca.issue_cert("node-1.spegeld.test", common_name="spegeld")


def b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def kubeconfig(
    cluster: dict[str, Any] | None = None,
    user: dict[str, Any] | None = None,
    *,
    context: dict[str, Any] | None = None,
    current: str | None = "admin@talos",
) -> dict[str, Any]:
    document: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "other", "cluster": {"server": "https://wrong.example:1"}},
            {"name": "talos", "cluster": cluster or {"server": "https://127.0.0.1:7445"}},
        ],
        "users": [{"name": "admin", "user": user if user is not None else {"token": TOKEN}}],
        "contexts": [
            {"name": "admin@talos", "context": context or {"cluster": "talos", "user": "admin"}},
            {"name": "elsewhere", "context": {"cluster": "other", "user": "admin"}},
        ],
    }
    if current is not None:
        document["current-context"] = current
    return document


def write(path: Path, content: dict[str, Any] | str | bytes, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, dict):
        content = yaml.safe_dump(content)
    if isinstance(content, str):
        content = content.encode()
    path.write_bytes(content)
    path.chmod(mode)
    return path


def load(tmp_path: Path, document: dict[str, Any] | str, context: str | None = None) -> Credentials:
    return load_kubeconfig(write(tmp_path / "kubeconfig", document), context)


def assert_no_secrets(*texts: str) -> None:
    for text in texts:
        assert TOKEN not in text
        assert ROTATED not in text
        assert "PRIVATE KEY" not in text


# Supported forms


def test_inline_token_and_current_context(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    creds = load(tmp_path, kubeconfig())
    assert creds.server == "https://127.0.0.1:7445"
    assert (creds.host, creds.port) == ("127.0.0.1", 7445)
    assert creds.bearer_token() == TOKEN
    assert creds.source == f"kubeconfig {tmp_path / 'kubeconfig'}, context admin@talos"
    assert creds.ca_pem is None and not creds.insecure_skip_tls_verify
    assert creds.warnings == ()
    assert_no_secrets(repr(creds), caplog.text)


def test_explicit_context_overrides_current(tmp_path: Path) -> None:
    creds = load(tmp_path, kubeconfig(current=None), context="elsewhere")
    assert creds.server == "https://wrong.example:1"
    assert creds.source.endswith("context elsewhere")


def test_context_namespace(tmp_path: Path) -> None:
    doc = kubeconfig(context={"cluster": "talos", "user": "admin", "namespace": "spegeld"})
    assert load(tmp_path, doc).namespace == "spegeld"
    assert load(tmp_path, kubeconfig()).namespace is None


def test_ca_data_and_client_cert_data(
    tmp_path: Path, ca: trustme.CA, client_cert: trustme.LeafCert
) -> None:
    cert_pem = client_cert.cert_chain_pems[0].bytes()
    key_pem = client_cert.private_key_pem.bytes()
    doc = kubeconfig(
        {
            "server": "https://kube.local:6443",
            "certificate-authority-data": b64(ca.cert_pem.bytes()),
        },
        {"client-certificate-data": b64(cert_pem), "client-key-data": b64(key_pem)},
    )
    creds = load(tmp_path, doc)
    assert creds.ca_pem == ca.cert_pem.bytes()
    assert (creds.client_cert_pem, creds.client_key_pem) == (cert_pem, key_pem)
    assert creds.bearer_token() is None
    assert_no_secrets(repr(creds))
    assert key_pem.decode() not in repr(creds) and "BEGIN CERTIFICATE" not in repr(creds)
    context = ssl_context(creds)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert len(context.get_ca_certs()) == 1  # the kubeconfig CA replaces the system store


def test_relative_paths_resolve_against_the_kubeconfig_directory(
    tmp_path: Path, ca: trustme.CA, client_cert: trustme.LeafCert, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "etc" / "spegeld"
    write(conf / "pki" / "ca.crt", ca.cert_pem.bytes(), 0o644)
    write(conf / "pki" / "client.crt", client_cert.cert_chain_pems[0].bytes(), 0o644)
    write(conf / "pki" / "client.key", client_cert.private_key_pem.bytes())
    write(conf / "token", TOKEN + "\n")
    doc = kubeconfig(
        {"server": "https://kube.local", "certificate-authority": "pki/ca.crt"},
        {
            "client-certificate": "pki/client.crt",
            "client-key": str(conf / "pki" / "client.key"),  # absolute works too
            "tokenFile": "token",
        },
    )
    monkeypatch.chdir(tmp_path)  # the working directory must not matter
    creds = load_kubeconfig(write(conf / "kubeconfig", doc))
    assert creds.ca_pem == ca.cert_pem.bytes()
    assert creds.client_key_pem == client_cert.private_key_pem.bytes()
    assert creds.token_file == conf / "token"
    assert creds.bearer_token() == TOKEN
    assert creds.port == 443
    assert creds.warnings == ()
    ssl_context(creds)


def test_token_file_is_reread_for_rotation(tmp_path: Path) -> None:
    token_file = write(tmp_path / "token", TOKEN)
    creds = load(tmp_path, kubeconfig(user={"tokenFile": str(token_file), "token": "ignored"}))
    assert creds.bearer_token() == TOKEN
    write(token_file, f"  {ROTATED}\n")
    assert creds.bearer_token() == ROTATED
    token_file.unlink()
    with pytest.raises(KubeconfigError, match=r"cannot read token file .*token: No such file") as e:
        creds.bearer_token()
    assert_no_secrets(str(e.value))


def test_insecure_skip_tls_verify(tmp_path: Path) -> None:
    doc = kubeconfig({"server": "https://10.0.0.1:6443", "insecure-skip-tls-verify": True})
    creds = load(tmp_path, doc)
    assert creds.insecure_skip_tls_verify
    context = ssl_context(creds)
    assert context.verify_mode == ssl.CERT_NONE and not context.check_hostname


def test_tls_server_name(tmp_path: Path) -> None:
    doc = kubeconfig({"server": "https://127.0.0.1:7445", "tls-server-name": "kubernetes"})
    assert load(tmp_path, doc).tls_server_name == "kubernetes"


@pytest.mark.parametrize(
    ("server", "host", "port", "normal"),
    [
        ("https://[::1]:6443", "::1", 6443, "https://[::1]:6443"),
        ("https://[fd00::10]/", "fd00::10", 443, "https://[fd00::10]"),
        ("HTTPS://kube.example:8443/", "kube.example", 8443, "https://kube.example:8443"),
        ("https://rancher.example/k8s/clusters/c-1/", "rancher.example", 443, None),
    ],
)
def test_server_urls(tmp_path: Path, server: str, host: str, port: int, normal: str | None) -> None:
    creds = load(tmp_path, kubeconfig({"server": server}))
    assert (creds.host, creds.port) == (host, port)
    assert creds.server == (normal or server.rstrip("/"))
    assert not creds.server.endswith("/")


def test_plain_http_is_allowed_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    creds = load(tmp_path, kubeconfig({"server": "http://127.0.0.1:8080"}))
    assert creds.port == 8080 and not creds.uses_tls
    assert any("plain http" in w for w in creds.warnings)
    assert "plain http" in caplog.text


def test_no_credentials_is_anonymous_with_a_warning(tmp_path: Path) -> None:
    creds = load(tmp_path, kubeconfig(user={}))
    assert creds.bearer_token() is None
    assert creds.warnings == ("user 'admin' has no credentials: requests will be anonymous",)
    no_user = load(tmp_path, kubeconfig(context={"cluster": "talos"}))
    assert "context 'admin@talos' has no credentials" in no_user.warnings[0]


# Permission warnings (DESIGN §12)


def test_loose_kubeconfig_and_token_file_draw_warnings(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, client_cert: trustme.LeafCert
) -> None:
    caplog.set_level(logging.DEBUG)
    token_file = write(tmp_path / "token", TOKEN, 0o644)
    key_file = write(tmp_path / "client.key", client_cert.private_key_pem.bytes(), 0o640)
    cert_file = write(tmp_path / "client.crt", client_cert.cert_chain_pems[0].bytes(), 0o644)
    doc = kubeconfig(
        user={"tokenFile": "token", "client-certificate": "client.crt", "client-key": "client.key"}
    )
    path = write(tmp_path / "kubeconfig", doc, 0o604)
    creds = load_kubeconfig(path)
    assert creds.warnings == (
        f"kubeconfig {path} is readable by other users (mode 0604); chmod 600 it",
        f"token file {token_file} is readable by other users (mode 0644); chmod 600 it",
        f"client-key {key_file} is readable by other users (mode 0640); chmod 600 it",
    )
    assert str(cert_file) not in " ".join(creds.warnings)  # a certificate is public
    for warning in creds.warnings:
        assert warning in caplog.text
    assert_no_secrets(caplog.text, repr(creds))


def test_group_writable_kubeconfig_draws_a_warning(tmp_path: Path) -> None:
    path = write(tmp_path / "kubeconfig", kubeconfig(), 0o620)
    assert load_kubeconfig(path).warnings == (
        f"kubeconfig {path} is writable by other users (mode 0620); chmod 600 it",
    )


# Refusals: one line, naming the problem, never the secret


def _error(tmp_path: Path, document: dict[str, Any] | str, context: str | None = None) -> str:
    with pytest.raises(KubeconfigError) as info:
        load(tmp_path, document, context)
    assert info.value.exit_code == 2
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"kubeconfig {tmp_path / 'kubeconfig'}: ")
    assert_no_secrets(message)
    return message.split(": ", 1)[1]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(KubeconfigError) as info:
        load_kubeconfig(tmp_path / "nope")
    assert (
        str(info.value) == f"cannot read kubeconfig {tmp_path / 'nope'}: No such file or directory"
    )


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(KubeconfigError, match=r"cannot read kubeconfig .*: Is a directory"):
        load_kubeconfig(tmp_path)


@pytest.mark.parametrize(
    ("document", "reason"),
    [
        ("apiVersion: v1\nkind: Config\n  bad: x\n", "not valid YAML at line 3"),
        ("- just\n- a list\n", "not a kubeconfig (expected a mapping)"),
        ("", "not a kubeconfig (expected a mapping)"),
    ],
)
def test_bad_yaml(tmp_path: Path, document: str, reason: str) -> None:
    assert _error(tmp_path, document) == reason


def test_no_current_context(tmp_path: Path) -> None:
    assert _error(tmp_path, kubeconfig(current=None)) == (
        "no current-context is set; pass a context explicitly"
    )


def test_unknown_context_cluster_user(tmp_path: Path) -> None:
    assert _error(tmp_path, kubeconfig(), context="prod") == "no context named 'prod'"
    doc = kubeconfig(context={"cluster": "gone", "user": "admin"})
    assert _error(tmp_path, doc) == "no cluster named 'gone'"
    doc = kubeconfig(context={"cluster": "talos", "user": "ghost"})
    assert _error(tmp_path, doc) == "no user named 'ghost'"
    doc = kubeconfig(context={"user": "admin"})
    assert _error(tmp_path, doc) == "context 'admin@talos' names no cluster"


def test_missing_or_bad_server(tmp_path: Path) -> None:
    assert _error(tmp_path, kubeconfig({"certificate-authority-data": ""})) == (
        "cluster 'talos' has no server"
    )
    assert _error(tmp_path, kubeconfig({"server": "ftp://x"})) == (
        "server 'ftp://x' must start with https://"
    )
    assert _error(tmp_path, kubeconfig({"server": "https://x:99999"})) == (
        "server is not a valid URL"
    )
    assert _error(tmp_path, kubeconfig({"server": "https://"})) == "server 'https://' has no host"
    message = _error(tmp_path, kubeconfig({"server": f"https://admin:{TOKEN}@kube:6443"}))
    assert message == "server URL must not contain credentials"
    assert (
        _error(tmp_path, kubeconfig({"server": 6443})) == "cluster 'talos': server must be a string"
    )


@pytest.mark.parametrize(
    ("user", "reason"),
    [
        (
            {"exec": {"command": "aws", "args": ["eks", "get-token"], "apiVersion": "x"}},
            "user 'admin' uses an exec credential plugin (command 'aws')",
        ),
        (
            {"auth-provider": {"name": "oidc", "config": {"id-token": TOKEN}}},
            "user 'admin' uses an auth-provider ('oidc')",
        ),
        (
            {"username": "admin", "password": TOKEN},
            "user 'admin' uses basic auth (username/password)",
        ),
        ({"token": TOKEN, "as": "system:admin"}, "user 'admin' uses impersonation (as)"),
    ],
)
def test_unsupported_user_features_are_named(
    tmp_path: Path, user: dict[str, Any], reason: str
) -> None:
    message = _error(tmp_path, kubeconfig(user=user))
    assert message.startswith(reason + ", which spegeld does not support; ")


def test_proxy_url_is_refused(tmp_path: Path) -> None:
    doc = kubeconfig({"server": "https://k:6443", "proxy-url": "http://proxy:3128"})
    assert (
        _error(tmp_path, doc)
        == "cluster 'talos' uses a proxy (proxy-url), which spegeld does not support"
    )


def test_unreadable_referenced_files(tmp_path: Path) -> None:
    doc = kubeconfig({"server": "https://k", "certificate-authority": "missing-ca.crt"})
    assert _error(tmp_path, doc) == (
        f"cannot read certificate-authority {tmp_path / 'missing-ca.crt'}: No such file or directory"
    )
    for user, what, name in [
        ({"tokenFile": "nope"}, "token file", "nope"),
        (
            {"client-certificate": "c.crt", "client-key-data": b64("k")},
            "client-certificate",
            "c.crt",
        ),
        ({"client-certificate-data": b64("c"), "client-key": "k.key"}, "client-key", "k.key"),
    ]:
        assert _error(tmp_path, kubeconfig(user=user)) == (
            f"cannot read {what} {tmp_path / name}: No such file or directory"
        )


def test_empty_token_file(tmp_path: Path) -> None:
    write(tmp_path / "token", "\n")
    message = _error(tmp_path, kubeconfig(user={"tokenFile": "token"}))
    assert message == f"token file {tmp_path / 'token'} is empty"


def test_bad_base64(tmp_path: Path) -> None:
    doc = kubeconfig({"server": "https://k", "certificate-authority-data": "not base64!"})
    assert (
        _error(tmp_path, doc) == "cluster 'talos': certificate-authority-data is not valid base64"
    )
    doc = kubeconfig(user={"client-certificate-data": b64("c"), "client-key-data": TOKEN + "%"})
    assert _error(tmp_path, doc) == "user 'admin': client-key-data is not valid base64"


def test_conflicting_fields(tmp_path: Path, ca: trustme.CA) -> None:
    ca_data = b64(ca.cert_pem.bytes())
    doc = kubeconfig(
        {
            "server": "https://k",
            "certificate-authority": "ca.crt",
            "certificate-authority-data": ca_data,
        }
    )
    assert _error(tmp_path, doc) == (
        "cluster 'talos' sets both certificate-authority and certificate-authority-data"
    )
    doc = kubeconfig(
        {
            "server": "https://k",
            "insecure-skip-tls-verify": True,
            "certificate-authority-data": ca_data,
        }
    )
    assert _error(tmp_path, doc) == (
        "cluster 'talos' sets both insecure-skip-tls-verify and a certificate authority"
    )
    doc = kubeconfig({"server": "https://k", "insecure-skip-tls-verify": "yes please"})
    assert (
        _error(tmp_path, doc) == "cluster 'talos': insecure-skip-tls-verify must be true or false"
    )
    doc = kubeconfig(user={"client-certificate-data": ca_data})
    assert _error(tmp_path, doc) == (
        "user 'admin' has a client certificate or key without its client-key"
    )


def test_malformed_sections(tmp_path: Path) -> None:
    doc = kubeconfig()
    doc["clusters"] = {"talos": {}}
    assert _error(tmp_path, doc) == "clusters must be a list"
    doc = kubeconfig()
    doc["users"] = [{"name": "admin", "user": "token"}]
    assert _error(tmp_path, doc) == "user 'admin' must be a mapping"
    assert (
        _error(tmp_path, kubeconfig(user={"token": 12345}))
        == "user 'admin': token must be a string"
    )


def test_bad_pem_is_a_config_error_at_ssl_context(
    tmp_path: Path, client_cert: trustme.LeafCert
) -> None:
    creds = load(
        tmp_path, kubeconfig({"server": "https://k", "certificate-authority-data": b64("junk")})
    )
    with pytest.raises(KubeconfigError, match="the certificate authority is not a PEM certificate"):
        ssl_context(creds)
    wrong_key = trustme.CA().issue_cert("x").private_key_pem.bytes()
    doc = kubeconfig(
        user={
            "client-certificate-data": b64(client_cert.cert_chain_pems[0].bytes()),
            "client-key-data": b64(wrong_key),
        }
    )
    with pytest.raises(
        KubeconfigError, match="not a matching PEM certificate and private key"
    ) as info:
        ssl_context(load(tmp_path, doc))
    assert "PRIVATE" not in str(info.value)


# In-cluster


def account(tmp_path: Path, ca: trustme.CA, namespace: str | None = "spegeld\n") -> Path:
    directory = tmp_path / "serviceaccount"
    write(directory / "token", TOKEN, 0o644)
    write(directory / "ca.crt", ca.cert_pem.bytes(), 0o644)
    if namespace is not None:
        write(directory / "namespace", namespace, 0o644)
    return directory


ENV = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}


def test_in_cluster(tmp_path: Path, ca: trustme.CA, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    directory = account(tmp_path, ca)
    creds = in_cluster(ENV, directory)
    assert creds.server == "https://10.96.0.1:443"
    assert creds.source == "in-cluster service account"
    assert creds.namespace == "spegeld"
    assert creds.ca_pem == ca.cert_pem.bytes()
    assert creds.token_file == directory / "token"
    assert creds.warnings == ()  # projected tokens are 0644 by design
    assert creds.bearer_token() == TOKEN
    write(directory / "token", ROTATED, 0o644)
    assert creds.bearer_token() == ROTATED
    assert_no_secrets(repr(creds), caplog.text)
    ssl_context(creds)


def test_in_cluster_ipv6_and_no_namespace(tmp_path: Path, ca: trustme.CA) -> None:
    env = {"KUBERNETES_SERVICE_HOST": "fd00:10:96::1", "KUBERNETES_SERVICE_PORT": "6443"}
    creds = in_cluster(env, account(tmp_path, ca, namespace=None))
    assert creds.server == "https://[fd00:10:96::1]:6443"
    assert (creds.host, creds.port) == ("fd00:10:96::1", 6443)
    assert creds.namespace is None


def test_in_cluster_errors(tmp_path: Path, ca: trustme.CA) -> None:
    directory = account(tmp_path, ca)
    with pytest.raises(
        KubeconfigError, match="need KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT"
    ):
        in_cluster({"KUBERNETES_SERVICE_HOST": "10.96.0.1"}, directory)
    with pytest.raises(KubeconfigError, match="in-cluster credentials: server is not a valid URL"):
        in_cluster({**ENV, "KUBERNETES_SERVICE_PORT": "https"}, directory)
    (directory / "ca.crt").unlink()
    with pytest.raises(KubeconfigError, match=r"cannot read service account CA .*ca\.crt"):
        in_cluster(ENV, directory)
    with pytest.raises(KubeconfigError, match=r"cannot read token file .*nowhere/token"):
        in_cluster(ENV, tmp_path / "nowhere")


# Discovery order


def test_discovery_order(tmp_path: Path, ca: trustme.CA) -> None:
    directory = account(tmp_path, ca)
    path = write(tmp_path / "kubeconfig", kubeconfig())
    explicit = discover(path, None, ENV, directory)
    assert explicit is not None and explicit.source.startswith("kubeconfig ")
    chosen = discover(path, "elsewhere", ENV, directory)
    assert chosen is not None and chosen.server == "https://wrong.example:1"
    pod = discover(None, None, ENV, directory)
    assert pod is not None and pod.source == "in-cluster service account"
    assert discover(None, None, {}, directory) is None
    with pytest.raises(KubeconfigError, match="context"):
        discover(None, "elsewhere", {}, directory)
    with pytest.raises(KubeconfigError):  # an explicit but broken kubeconfig never falls back
        discover(tmp_path / "missing", None, ENV, directory)


def test_kubeconfig_error_is_a_config_error() -> None:
    assert issubclass(KubeconfigError, ConfigError)


# JWT expiry (for the doctor's 401 diagnosis)


def jwt(claims: Any, header: dict[str, str] | None = None) -> str:
    def part(value: Any) -> str:
        raw = value if isinstance(value, bytes) else json.dumps(value).encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    return f"{part(header or {'alg': 'RS256', 'kid': 'k1'})}.{part(claims)}.c2lnbmF0dXJl"


def test_jwt_expiry_of_a_service_account_token() -> None:
    exp = 1_767_225_600  # 2026-01-01T00:00:00Z
    token = jwt(
        {
            "aud": ["https://kubernetes.default.svc"],
            "exp": exp,
            "iat": exp - 3600,
            "iss": "https://kubernetes.default.svc",
            "kubernetes.io": {"namespace": "spegeld", "serviceaccount": {"name": "spegeld"}},
            "sub": "system:serviceaccount:spegeld:spegeld",
        }
    )
    assert jwt_expiry(token) == datetime(2026, 1, 1, tzinfo=UTC)
    assert jwt_expiry(token).tzinfo is UTC  # type: ignore[union-attr]
    assert jwt_claims(token)["sub"] == "system:serviceaccount:spegeld:spegeld"
    assert jwt_expiry(jwt({"exp": 1.5e9})) == datetime.fromtimestamp(1.5e9, UTC)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "not-a-jwt",
        "a.b",
        "a.b.c.d",
        "x.!!!.y",
        jwt({"sub": "no exp"}),
        jwt({"exp": "tomorrow"}),
        jwt({"exp": True}),
        jwt({"exp": 10**30}),
        jwt({"exp": -(10**30)}),
        jwt(["exp", 1]),
        jwt(b"\xff\xfe not utf-8"),
        jwt(b"{not json"),
        jwt(b"[" * 100_000 + b"]" * 100_000),
        "a." + base64.urlsafe_b64encode(b'{"exp": NaN}').decode() + ".c",
        "a." + base64.urlsafe_b64encode(b'{"exp": Infinity}').decode() + ".c",
    ],
)
def test_jwt_expiry_of_garbage_is_none(token: str) -> None:
    assert jwt_expiry(token) is None
    assert isinstance(jwt_claims(token), dict)
