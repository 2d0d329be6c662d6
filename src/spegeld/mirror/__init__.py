"""The registry mirror: the OCI distribution pull API containerd asks first."""

from spegeld.mirror._auth import (
    AUTH_KEY_LABEL,
    NonceMemory,
    PeerKeys,
    Refused,
    Verified,
    sign,
    verify,
)
from spegeld.mirror._auth import HEADER as AUTH_HEADER
from spegeld.mirror._auth import TOLERANCE as AUTH_TOLERANCE
from spegeld.mirror._http import Limits
from spegeld.mirror._private import endpoint_of as private_endpoint
from spegeld.mirror._proxy import ProxySettings
from spegeld.mirror._server import Listen, MirrorServer, MirrorSettings

__all__ = [
    "AUTH_HEADER",
    "AUTH_KEY_LABEL",
    "AUTH_TOLERANCE",
    "Limits",
    "Listen",
    "MirrorServer",
    "MirrorSettings",
    "NonceMemory",
    "PeerKeys",
    "ProxySettings",
    "Refused",
    "Verified",
    "sign",
    "private_endpoint",
    "verify",
]
