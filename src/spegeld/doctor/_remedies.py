"""The remedies the doctor prints: commands and manifests a person can apply as they are."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

LEASE_VERBS = ("get", "create", "update")


def dns(host: str, servers: Sequence[str]) -> str:
    used = ", ".join(servers) or "none found in /etc/resolv.conf"
    return (
        f"Make {host!r} resolvable (resolvers: {used}), or put the API server's IP in the "
        "kubeconfig's cluster.server. In a pod, check CoreDNS: "
        "kubectl -n kube-system get pods -l k8s-app=kube-dns"
    )


def refused(host: str, port: int) -> str:
    return (
        f"Nothing accepts connections on {host}:{port}: check that the API server runs and "
        "that the port is right (6443; on Talos, KubePrism https://127.0.0.1:7445), or "
        "remove the REJECT rule in front of it (nft list ruleset; iptables -S)."
    )


def dropped(ip: str, port: int, namespace: str) -> str:
    return f"""\
Allow egress from this node (or the spegeld pods) to the API server at {ip}:{port}.
Host firewall: look for a DROP on that port (nft list ruleset; iptables -S OUTPUT).
Kubernetes NetworkPolicy (pods):
  apiVersion: networking.k8s.io/v1
  kind: NetworkPolicy
  metadata: {{name: spegeld-to-apiserver, namespace: {namespace}}}
  spec:
    podSelector: {{}}
    policyTypes: [Egress]
    egress:
    - to: [{{ipBlock: {{cidr: {ip}/{128 if ":" in ip else 32}}}}}]
      ports: [{{protocol: TCP, port: {port}}}]
Cilium (the API server is an entity; a service VIP is translated before policy):
  apiVersion: cilium.io/v2
  kind: CiliumNetworkPolicy
  metadata: {{name: spegeld-to-apiserver, namespace: {namespace}}}
  spec:
    endpointSelector: {{}}
    egress:
    - toEntities: [kube-apiserver]
"""


def unreachable(ip: str, port: int, routed: bool, route: str) -> str:
    if routed:
        return (
            f"This node routes {ip} ({route}), but the answer was ICMP unreachable: a router "
            "on the way has no route onward, or a REJECT rule answers with ICMP, on the path "
            "or on the API server's host (nft list ruleset; iptables -S). Check that "
            f"network's routes and firewall; traceroute -T -p {port} {ip} shows where it stops."
        )
    return (
        f"This node's kernel refuses to send to {ip} ({route or 'no answer'}): a route is "
        "missing, or an unreachable, prohibit or blackhole route covers it. Check "
        f"ip route get {ip}, ip route show table all and ip rule; add or fix the route "
        "to the API server's network (or the default route)."
    )


def unauthorized(source: str) -> str:
    return (
        f"The API server rejects the credentials from {source}. Mint a new token for the "
        "ServiceAccount and put it in the kubeconfig: "
        "kubectl -n spegeld create token spegeld --duration=8760h "
        "(see deploy/README.md)."
    )


def _binding_name(kind: str, name: str) -> str:
    """deploy/rbac.yaml's binding for its own ServiceAccount; one of its own for any other
    subject, so applying this never moves rbac.yaml's binding away from ``spegeld``."""
    if (kind, name) == ("ServiceAccount", "spegeld"):
        return "spegeld-leases"
    slug = re.sub(r"[^a-z0-9.-]+", "-", f"{kind}-{name}".lower()).strip("-.")
    return f"spegeld-leases-{slug}"[:253].rstrip("-.")


def forbidden(namespace: str, subject: tuple[str, str, str | None]) -> str:
    kind, name, subject_ns = subject
    ns_line = f"\n  namespace: {subject_ns}" if subject_ns else ""
    binding = _binding_name(kind, name)
    return f"""\
Grant the Lease verbs (kubectl apply -f - <<'EOF', or deploy/rbac.yaml):
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: spegeld-leases
  namespace: {namespace}
rules:
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  verbs: ["get", "create", "update"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: {binding}
  namespace: {namespace}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: Role
  name: spegeld-leases
subjects:
- kind: {kind}
  name: {name}{ns_line}
"""


def missing_namespace(namespace: str) -> str:
    return f"kubectl create namespace {namespace}   (or kubectl apply -f deploy/rbac.yaml)"


def clock() -> str:
    return (
        "Synchronise this node's clock (timedatectl; chronyc tracking; on Talos, "
        "machine.time.servers). Tokens and certificates are judged by wall time."
    )


READYZ_VERBOSE = "kubectl get --raw '/readyz?verbose'"
ETCD_HEALTH = (
    "etcdctl endpoint health; kubeadm: the etcd pod in kube-system; Talos: "
    "talosctl service etcd and talosctl etcd status"
)


def unhealthy(failing: Sequence[str]) -> str:
    if any(name.startswith("etcd") for name in failing):
        return (
            f"The API server answers but cannot use its etcd ({', '.join(failing)} failed): "
            f"check etcd ({ETCD_HEALTH}), its disk and its logs, then {READYZ_VERBOSE}."
        )
    named = f" ({', '.join(failing)} failed)" if failing else ""
    return f"The API server answers but is not ready{named}: check {READYZ_VERBOSE} and its logs."


def silent(waited: float) -> str:
    return (
        "The API server took the connection and TLS, then gave no HTTP answer (doctor "
        f"waited up to {waited:.1f} s): it is stuck, most often waiting on etcd (its "
        "/readyz waits up to 2 s for each etcd check). "
        f"Check etcd ({ETCD_HEALTH}), the API server's logs and load, then "
        f"{READYZ_VERBOSE}; a larger --timeout lets doctor wait for its answer."
    )


def content_unreadable(path: Path, source: str) -> str:
    return (
        f"Give spegeld read access to {path} ({source}): run it as root or in a group that "
        "may read it; in a container or on Talos, mount that directory read-only at the "
        "same path. If containerd keeps its content elsewhere, set --containerd-content-path."
    )


def content_path_disagrees(path: Path, reported: Path | None) -> str:
    return (
        f"Drop --containerd-content-path to follow containerd ({reported}), unless that "
        f"directory is mounted here at {path}."
    )
