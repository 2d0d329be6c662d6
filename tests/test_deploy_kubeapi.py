"""deploy/rbac.yaml and deploy/daemonset.yaml through the real kube-apiserver (issue 16 item 6).

The official schema is the API server's own: ``kubectl apply --dry-run=server
--validate=strict`` runs decoding (unknown or duplicate fields fail), defaulting,
validation and admission on the server, and stores nothing. One etcd + kube-apiserver
(tests/realkube, on 127.0.0.1) serves the whole module.

The server has no controller-manager, so no DaemonSet controller makes pods: the pod it
would make (the template on a node) is dry-run created as well, which runs the pod
admission a node's pod meets (ServiceAccount, Priority, PodSecurity).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.realkube._apiserver import RealKubeApi

pytestmark = [pytest.mark.slow, pytest.mark.kubeapiserver]

REPO = Path(__file__).resolve().parent.parent
RBAC = REPO / "deploy" / "rbac.yaml"
DAEMONSET = REPO / "deploy" / "daemonset.yaml"
NAMESPACE = "spegeld"
SYSTEM_NODE_CRITICAL = 2000001000  # the built-in class's value (scheduling/types.go)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealKubeApi]:
    server = RealKubeApi(tmp_path_factory.mktemp("deploy-kubeapi"))
    server.start()  # waits for /readyz, READY_TIMEOUT at most
    try:
        # A dry run stores nothing, so the namespaced objects need the namespace to exist;
        # --save-config so that `apply` finds it as if applied (no warning about it).
        server.kubectl("create", "namespace", NAMESPACE, "--save-config")
        yield server
    finally:
        server.stop()


def _daemonset() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(DAEMONSET.read_text())
    return document


def _node_pod(daemonset: dict[str, Any]) -> dict[str, Any]:
    """The pod the DaemonSet controller would create on node-1."""
    template = copy.deepcopy(daemonset["spec"]["template"])
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "spegeld-node-1", "namespace": NAMESPACE, **template["metadata"]},
        "spec": {**template["spec"], "nodeName": "node-1"},
    }


def _dry_run(api: RealKubeApi, verb: str, document: dict[str, Any]) -> Any:
    return api.kubectl_run(
        verb, "--dry-run=server", "--validate=strict", "-o", "json", "-f", "-",
        stdin=json.dumps(document),
    )  # fmt: skip


def test_manifests_apply_with_server_side_dry_run(api: RealKubeApi) -> None:
    done = api.kubectl_run(
        "apply", "--dry-run=server", "--validate=strict", "-f", str(RBAC), "-f", str(DAEMONSET)
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no warning either (deprecated fields, probe hosts, ...)
    # "created", or "unchanged" once another test of the module applied rbac.yaml for real.
    assert [re.sub(r" (created|unchanged|configured) ", " applied ", line)
            for line in done.stdout.splitlines()] == [
        "namespace/spegeld applied (server dry run)",
        "serviceaccount/spegeld applied (server dry run)",
        "role.rbac.authorization.k8s.io/spegeld-leases applied (server dry run)",
        "rolebinding.rbac.authorization.k8s.io/spegeld-leases applied (server dry run)",
        "daemonset.apps/spegeld applied (server dry run)",
    ]  # fmt: skip
    assert "daemonset.apps/spegeld created (server dry run)" in done.stdout
    # What the server would store keeps the pod spec as written (nothing dropped as unknown).
    stored = json.loads(_dry_run(api, "create", _daemonset()).stdout)
    pod = stored["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["priorityClassName"] == "system-node-critical"
    assert pod["containers"][0]["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_the_node_pod_passes_pod_admission(api: RealKubeApi) -> None:
    """With rbac.yaml applied for real: the ServiceAccount admission mounts its token (the
    in-cluster credentials) and the Priority admission resolves system-node-critical."""
    api.kubectl("apply", "-f", str(RBAC))
    done = _dry_run(api, "create", _node_pod(_daemonset()))
    assert done.returncode == 0, done.stderr
    pod = json.loads(done.stdout)
    assert pod["spec"]["priority"] == SYSTEM_NODE_CRITICAL
    mounts = {m["mountPath"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
    assert "/var/run/secrets/kubernetes.io/serviceaccount" in mounts


def test_the_api_server_refuses_what_is_wrong(api: RealKubeApi) -> None:
    """The dry run can fail: an unknown field, a wrong type, a namespace that enforces the
    baseline Pod Security level (host network and host paths need it privileged)."""
    api.kubectl("apply", "-f", str(RBAC))
    typo = _daemonset()
    typo["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    done = _dry_run(api, "create", typo)
    assert done.returncode != 0
    assert 'unknown field "spec.template.spec.containers[0].readinesProbe"' in done.stderr

    wrong = _daemonset()
    wrong["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"] = 1  # ports are the host's
    done = _dry_run(api, "create", wrong)
    assert done.returncode != 0
    assert "maxSurge" in done.stderr

    api.kubectl("label", "namespace", NAMESPACE, "pod-security.kubernetes.io/enforce=baseline")
    try:
        done = _dry_run(api, "create", _node_pod(_daemonset()))
        assert done.returncode != 0
        assert 'violates PodSecurity "baseline:latest"' in done.stderr
        assert "host namespaces" in done.stderr and "hostPath volumes" in done.stderr
    finally:
        api.kubectl("label", "namespace", NAMESPACE, "pod-security.kubernetes.io/enforce-")
