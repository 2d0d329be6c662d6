"""The registry mirror: the OCI distribution pull API containerd asks first."""

from spegeld.mirror._http import Limits
from spegeld.mirror._proxy import ProxySettings
from spegeld.mirror._server import MirrorServer, MirrorSettings

__all__ = ["Limits", "ProxySettings", "MirrorServer", "MirrorSettings"]
