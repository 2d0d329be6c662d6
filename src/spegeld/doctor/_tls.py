"""The TLS step: handshake as the client will, and say what is wrong with the certificate.

When verification fails the handshake gives no certificate, so a second, unverified
handshake fetches it: its issuer, names and validity dates are the evidence.
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
from dataclasses import dataclass

import trio
from cryptography import x509
from cryptography.x509.oid import NameOID

# OpenSSL verify codes (x509_vfy.h) the doctor explains
X509_V_ERR_CERT_NOT_YET_VALID = 9
X509_V_ERR_CERT_HAS_EXPIRED = 10
X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT = 18
X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN = 19
X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY = 20
X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE = 21
X509_V_ERR_HOSTNAME_MISMATCH = 62
X509_V_ERR_IP_ADDRESS_MISMATCH = 64

_UNKNOWN_CA = {
    X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT,
    X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN,
    X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY,
    X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE,
}


@dataclass(frozen=True, slots=True)
class Certificate:
    subject: str
    issuer: str
    names: tuple[str, ...]
    not_before: dt.datetime
    not_after: dt.datetime

    def evidence(self) -> tuple[str, ...]:
        return (
            f"server certificate: subject {self.subject}, issued by {self.issuer}",
            f"names: {', '.join(self.names) or 'none'}",
            f"valid {self.not_before:%Y-%m-%d %H:%M} to {self.not_after:%Y-%m-%d %H:%M} UTC",
        )


@dataclass(frozen=True, slots=True)
class TlsResult:
    ok: bool
    kind: str  # "ok", "unknown-ca", "name-mismatch", "expired", "not-yet-valid", "handshake"
    detail: str
    certificate: Certificate | None


def _name(name: x509.Name) -> str:
    cns = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return f"CN={cns[0].value!s}" if cns else name.rfc4514_string() or "(empty)"


def describe(der: bytes) -> Certificate | None:
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = tuple(
            [str(n) for n in san.get_values_for_type(x509.DNSName)]
            + [str(n) for n in san.get_values_for_type(x509.IPAddress)]
        )
    except x509.ExtensionNotFound:
        names = ()
    return Certificate(
        _name(cert.subject),
        _name(cert.issuer),
        names,
        cert.not_valid_before_utc,
        cert.not_valid_after_utc,
    )


async def _handshake(
    ip: str, port: int, context: ssl.SSLContext, server_name: str, timeout: float
) -> trio.SSLStream[trio.SocketStream]:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        with trio.fail_after(timeout):
            await sock.connect((ip, port))
            stream = trio.SSLStream(trio.SocketStream(sock), context, server_hostname=server_name)
            await stream.do_handshake()
    except BaseException:
        sock.close()
        raise
    return stream


async def fetch_certificate(ip: str, port: int, server_name: str, timeout: float) -> bytes | None:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        stream = await _handshake(ip, port, context, server_name, timeout)
    except (OSError, ssl.SSLError, trio.TooSlowError, trio.BrokenResourceError):
        return None
    try:
        der: bytes | None = stream.getpeercert(binary_form=True)
        return der
    finally:
        await trio.aclose_forcefully(stream)


async def check_tls(
    ip: str, port: int, context: ssl.SSLContext, server_name: str, timeout: float
) -> TlsResult:
    try:
        stream = await _handshake(ip, port, context, server_name, timeout)
    except ssl.SSLCertVerificationError as exc:
        der = await fetch_certificate(ip, port, server_name, timeout)
        cert = describe(der) if der else None
        return TlsResult(False, _kind(exc.verify_code), exc.verify_message or str(exc), cert)
    except (ssl.SSLError, trio.BrokenResourceError) as exc:
        cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
        if isinstance(cause, ssl.SSLCertVerificationError):
            der = await fetch_certificate(ip, port, server_name, timeout)
            cert = describe(der) if der else None
            return TlsResult(
                False, _kind(cause.verify_code), cause.verify_message or str(cause), cert
            )
        return TlsResult(False, "handshake", str(cause), None)
    except trio.TooSlowError:
        return TlsResult(False, "handshake", f"no TLS handshake in {timeout:.1f} s", None)
    except OSError as exc:
        return TlsResult(False, "handshake", exc.strerror or str(exc), None)
    try:
        der = stream.getpeercert(binary_form=True)
    finally:
        await trio.aclose_forcefully(stream)
    return TlsResult(True, "ok", "verified", describe(der) if der else None)


def _kind(code: int) -> str:
    if code in _UNKNOWN_CA:
        return "unknown-ca"
    if code in (X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH):
        return "name-mismatch"
    if code == X509_V_ERR_CERT_HAS_EXPIRED:
        return "expired"
    if code == X509_V_ERR_CERT_NOT_YET_VALID:
        return "not-yet-valid"
    return "handshake"
