"""The registry mirror: the OCI distribution pull API containerd asks first."""

from spegeld.registry._http import Limits
from spegeld.registry._proxy import ProxySettings
from spegeld.registry._server import Registry, RegistrySettings

__all__ = ["Limits", "ProxySettings", "Registry", "RegistrySettings"]
