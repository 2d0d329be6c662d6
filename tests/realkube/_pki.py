"""Certificates and keys a real kube-apiserver needs, made by the test (trustme + cryptography).

One CA signs the apiserver's serving certificate, the admin's client certificate (in
``system:masters``, so the admin credential bypasses RBAC as a cluster-admin does) and,
on request, an already expired serving certificate. The service-account signing key is
a separate RSA pair: the apiserver signs TokenRequest tokens with it.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

SA_KEY_BITS = 2048  # what kubeadm generates for sa.key
EXPIRED_FOR = datetime.timedelta(days=1)  # far past any clock-skew tolerance


@dataclass(frozen=True)
class Pki:
    ca_pem: Path
    serving_cert: Path
    serving_key: Path
    expired_cert: Path
    expired_key: Path
    admin_cert: Path
    admin_key: Path
    sa_public: Path
    sa_private: Path


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def make_pki(directory: Path, addresses: list[str]) -> Pki:
    """A CA plus everything signed by it, for a server reachable at ``addresses``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="spegeld-test")
    # The names kubeadm puts in apiserver.crt, plus the addresses the tests dial.
    names = ["kubernetes", "kubernetes.default", "kubernetes.default.svc", *addresses]
    serving = ca.issue_cert(*names, common_name="kube-apiserver")
    now = datetime.datetime.now(datetime.UTC)
    expired = ca.issue_cert(
        *names,
        common_name="kube-apiserver",
        not_before=now - 2 * EXPIRED_FOR,
        not_after=now - EXPIRED_FOR,
    )
    # A DNS name as well: trustme marks the SAN critical, and Go rejects an empty critical SAN.
    admin = ca.issue_cert(
        "spegeld-test-admin", common_name="spegeld-test-admin", organization_name="system:masters"
    )
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=SA_KEY_BITS)
    return Pki(
        ca_pem=_write(directory / "ca.pem", ca.cert_pem.bytes()),
        serving_cert=_write(directory / "apiserver.pem", b"".join(
            blob.bytes() for blob in serving.cert_chain_pems)),
        serving_key=_write(directory / "apiserver-key.pem", serving.private_key_pem.bytes()),
        expired_cert=_write(directory / "expired.pem", b"".join(
            blob.bytes() for blob in expired.cert_chain_pems)),
        expired_key=_write(directory / "expired-key.pem", expired.private_key_pem.bytes()),
        admin_cert=_write(directory / "admin.pem", admin.cert_chain_pems[0].bytes()),
        admin_key=_write(directory / "admin-key.pem", admin.private_key_pem.bytes()),
        sa_public=_write(directory / "sa.pub", sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)),
        sa_private=_write(directory / "sa.key", sa_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())),
    )  # fmt: skip
