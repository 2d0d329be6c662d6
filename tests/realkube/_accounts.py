"""RBAC from deploy/rbac.yaml and kubeconfigs minted the way deploy/README.md says.

``follow_readme`` runs the README's own shell blocks (apply the RBAC, ``kubectl create
token``, write the kubeconfig) as the admin, so a test that uses the kubeconfig it
yields also tests the instructions users follow. Further ServiceAccounts (one without
``update``, one whose Role spans every namespace) are made with kubectl beside it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from ._apiserver import ISSUER, RealKubeApi

REPO = Path(__file__).resolve().parent.parent.parent
README = REPO / "deploy" / "README.md"
NAMESPACE = "spegeld"
ACCOUNT = "spegeld"


def readme_blocks() -> list[str]:
    """The ```sh blocks of deploy/README.md, in order."""
    return re.findall(r"```sh\n(.*?)```", README.read_text(), flags=re.DOTALL)


def follow_readme(api: RealKubeApi, workdir: Path, account: str = ACCOUNT) -> Path:
    """Steps 1-3 of deploy/README.md in ``workdir``; the kubeconfig they write.

    For an ``account`` other than the README's, step 2 mints that ServiceAccount's token
    instead (the account must exist already).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "deploy").unlink(missing_ok=True)
    (workdir / "deploy").symlink_to(REPO / "deploy")
    apply, token, kubeconfig = readme_blocks()[:3]
    assert apply.strip() == "kubectl apply -f deploy/rbac.yaml", apply
    assert f"create token {ACCOUNT} " in token, token
    token = token.replace(f"create token {ACCOUNT} ", f"create token {account} ")
    api.shell(apply + token + kubeconfig, cwd=workdir)
    path = workdir / "kubeconfig"
    assert path.stat().st_mode & 0o777 == 0o600
    return path


def add_account(api: RealKubeApi, name: str, verbs: tuple[str, ...], *,
                cluster_wide: bool = False) -> None:  # fmt: skip
    """A ServiceAccount in the spegeld namespace allowed ``verbs`` on Leases.

    ``cluster_wide`` binds a ClusterRole (every namespace, including missing ones), so
    that a missing namespace shows as the 404 it is instead of as a 403.
    """
    kind = "ClusterRole" if cluster_wide else "Role"
    binding = "ClusterRoleBinding" if cluster_wide else "RoleBinding"
    scope = "" if cluster_wide else f"\n  namespace: {NAMESPACE}"
    api.kubectl(
        "apply",
        "-f",
        "-",
        stdin=f"""
apiVersion: v1
kind: ServiceAccount
metadata:
  name: {name}
  namespace: {NAMESPACE}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: {kind}
metadata:
  name: spegeld-test-{name}{scope}
rules:
  - apiGroups: ["coordination.k8s.io"]
    resources: ["leases"]
    verbs: [{", ".join(f'"{v}"' for v in verbs)}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: {binding}
metadata:
  name: spegeld-test-{name}{scope}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: {kind}
  name: spegeld-test-{name}
subjects:
  - kind: ServiceAccount
    name: {name}
    namespace: {NAMESPACE}
""",
    )


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def signed_expired_token(api: RealKubeApi, account: str, expired_at: float) -> str:
    """A ServiceAccount token signed with the apiserver's own key, expired at ``expired_at``.

    TokenRequest will not mint a token that is already expired (its minimum is 10 min), so
    this signs one with the same key and the same claims a bound token carries; the real
    server then rejects it for its expiry alone.
    """
    uid = api.kubectl("-n", NAMESPACE, "get", "serviceaccount", account,
                      "-o", "jsonpath={.metadata.uid}")  # fmt: skip
    key = serialization.load_pem_private_key(api.pki.sa_private.read_bytes(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # kube-apiserver's key id: unpadded base64url of the SHA-256 of the DER public key.
    header = {"alg": "RS256", "kid": _b64url(hashlib.sha256(der).digest())}
    issued = int(expired_at) - 3600
    claims = {
        "aud": [ISSUER], "iss": ISSUER, "iat": issued, "nbf": issued, "exp": int(expired_at),
        "sub": f"system:serviceaccount:{NAMESPACE}:{account}",
        "kubernetes.io": {"namespace": NAMESPACE,
                          "serviceaccount": {"name": account, "uid": uid}},
    }  # fmt: skip
    signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
    signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{_b64url(signature)}"
