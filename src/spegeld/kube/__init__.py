"""The Kubernetes API: credentials from a kubeconfig or the pod, and a small httpx client."""

from spegeld.kube._client import VERBS, KubeClient
from spegeld.kube._credentials import (
    DEFAULT_ACCOUNT_DIR,
    Credentials,
    discover,
    in_cluster,
    jwt_claims,
    jwt_expiry,
    load_kubeconfig,
)
from spegeld.kube._tls import ssl_context

__all__ = [
    "DEFAULT_ACCOUNT_DIR",
    "VERBS",
    "Credentials",
    "KubeClient",
    "discover",
    "in_cluster",
    "jwt_claims",
    "jwt_expiry",
    "load_kubeconfig",
    "ssl_context",
]
