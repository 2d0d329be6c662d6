"""An ``ssl.SSLContext`` from :class:`Credentials`, keeping key material off the disk.

``SSLContext.load_cert_chain`` only takes file names. Where the kernel offers it, the
certificate and key go into anonymous memory files (``memfd_create``) read through
``/proc/self/fd``; otherwise into a 0600 temporary file that is deleted at once.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import tempfile
from collections.abc import Iterator
from pathlib import Path

from spegeld.errors import KubeconfigError
from spegeld.kube._credentials import Credentials

__all__ = ["ssl_context"]


def ssl_context(creds: Credentials) -> ssl.SSLContext:
    """Verification against the kubeconfig's CA (or the system store), TLS 1.2 or newer."""
    if creds.ca_pem is None:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    else:
        context = _context_with_ca(creds)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if creds.insecure_skip_tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if creds.client_cert_pem is not None and creds.client_key_pem is not None:
        with _secret_file(creds.client_cert_pem) as cert, _secret_file(creds.client_key_pem) as key:
            try:
                context.load_cert_chain(cert, key)
            except ssl.SSLError:
                raise KubeconfigError(
                    f"{creds.source}: the client certificate and key are not a matching "
                    "PEM certificate and private key"
                ) from None
    return context


def _context_with_ca(creds: Credentials) -> ssl.SSLContext:
    """A kubeconfig CA replaces the system roots, as in kubectl."""
    assert creds.ca_pem is not None
    problem = f"{creds.source}: the certificate authority is not a PEM certificate"
    try:
        text = creds.ca_pem.decode("ascii")
    except UnicodeDecodeError:
        raise KubeconfigError(problem) from None
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise KubeconfigError(problem)
    try:
        return ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=text)
    except (ssl.SSLError, ValueError):
        raise KubeconfigError(problem) from None


@contextlib.contextmanager
def _secret_file(data: bytes) -> Iterator[str]:
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is not None and Path("/proc/self/fd").is_dir():
        fd = memfd_create("spegeld-kube", os.MFD_CLOEXEC)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    fd, name = tempfile.mkstemp(prefix="spegeld-kube-")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        yield name
    finally:
        os.unlink(name)
