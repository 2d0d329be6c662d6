"""deploy/rbac.yaml, deploy/daemonset.yaml and the Role YAML the doctor prints, against the
official schemas; the DaemonSet's flags, paths and names against the CLI and rbac.yaml.

The real API server's server-side dry run: tests/test_deploy_kubeapi.py; the image the
DaemonSet runs: tests/test_deploy_image.py."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from spegeld import config
from spegeld.cli import cli as cli_main
from spegeld.doctor._remedies import LEASE_VERBS, forbidden
from tests._talos_bundle import load_talos_module

REPO = Path(__file__).resolve().parent.parent
RBAC = REPO / "deploy" / "rbac.yaml"
DAEMONSET = REPO / "deploy" / "daemonset.yaml"
KUBERNETES_VERSION = "1.32"


def _validate(document: dict[str, Any]) -> None:
    kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_rbac_yaml_is_valid_and_grants_exactly_the_lease_verbs() -> None:
    documents = [d for d in yaml.safe_load_all(RBAC.read_text()) if d]
    for document in documents:
        _validate(document)
    by_kind = {d["kind"]: d for d in documents}
    assert set(by_kind) == {"Namespace", "ServiceAccount", "Role", "RoleBinding"}
    namespace = by_kind["Namespace"]["metadata"]["name"]
    assert namespace == "spegeld"
    (rule,) = by_kind["Role"]["rules"]
    assert rule == {
        "apiGroups": ["coordination.k8s.io"],
        "resources": ["leases"],
        "verbs": list(LEASE_VERBS),
    }
    binding = by_kind["RoleBinding"]
    assert binding["roleRef"]["name"] == by_kind["Role"]["metadata"]["name"]
    (subject,) = binding["subjects"]
    assert subject == {
        "kind": "ServiceAccount",
        "name": by_kind["ServiceAccount"]["metadata"]["name"],
        "namespace": namespace,
    }
    for kind in ("ServiceAccount", "Role", "RoleBinding"):
        assert by_kind[kind]["metadata"]["namespace"] == namespace


@pytest.mark.parametrize(
    "subject",
    [("ServiceAccount", "spegeld", "spegeld"), ("User", "system:node:worker-1", None)],
)
def test_the_doctors_role_yaml_is_valid(subject: tuple[str, str, str | None]) -> None:
    text = forbidden("spegeld", subject)
    _, _, manifest = text.partition("\n")  # the first line says how to apply it
    documents = [d for d in yaml.safe_load_all(manifest) if d]
    assert [d["kind"] for d in documents] == ["Role", "RoleBinding"]
    for document in documents:
        _validate(document)
    assert documents[0]["rules"][0]["verbs"] == list(LEASE_VERBS)
    assert documents[1]["subjects"][0]["name"] == subject[1]
    # Another subject's binding never replaces deploy/rbac.yaml's (spegeld's) binding.
    own = subject[:2] == ("ServiceAccount", "spegeld")
    assert (documents[1]["metadata"]["name"] == "spegeld-leases") is own


def test_a_bad_manifest_is_caught_by_the_same_validation() -> None:
    documents = [d for d in yaml.safe_load_all(RBAC.read_text()) if d]
    role = next(d for d in documents if d["kind"] == "Role")
    role["rules"][0]["verbs"] = "get"  # a string where the schema wants a list
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(role)


# --- deploy/daemonset.yaml ------------------------------------------------------------------


def _daemonset() -> dict[str, Any]:
    (document,) = [d for d in yaml.safe_load_all(DAEMONSET.read_text()) if d]
    return dict(document)


def _envvars(command: Any) -> dict[str, Any]:
    return {p.envvar: p for p in command.params if isinstance(p.envvar, str)}


def test_daemonset_is_valid_against_the_schema() -> None:
    _validate(_daemonset())


def test_daemonset_runs_as_rbac_yaml_allows_on_every_node() -> None:
    daemonset = _daemonset()
    rbac = {d["kind"]: d for d in yaml.safe_load_all(RBAC.read_text()) if d}
    assert daemonset["metadata"]["namespace"] == rbac["Namespace"]["metadata"]["name"]
    assert daemonset["metadata"]["namespace"] == config.DEFAULT_LEASE_NAMESPACE
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == rbac["ServiceAccount"]["metadata"]["name"]
    assert pod.get("automountServiceAccountToken", True)  # in-cluster credentials
    assert pod["hostNetwork"] is True
    assert pod["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in pod["tolerations"]  # every taint, every effect
    strategy = daemonset["spec"]["updateStrategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxSurge"] == 0  # host ports: one pod per node
    assert pod["terminationGracePeriodSeconds"] > config.DEFAULT_GRACE_PERIOD
    selector = daemonset["spec"]["selector"]["matchLabels"]
    assert selector.items() <= daemonset["spec"]["template"]["metadata"]["labels"].items()


def test_daemonset_flags_and_environment_are_spegelds() -> None:
    """Every flag and SPEGELD_* variable the pod passes exists on the command it runs."""
    pod = _daemonset()["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    (main,) = pod["containers"]
    configure = cli_main.commands["configure"].commands["containerd"]  # type: ignore[attr-defined]
    run = cli_main.commands["run"]
    assert init["args"][:2] == ["configure", "containerd"]
    known = {opt for p in configure.params for opt in p.opts}
    given = dict(a.split("=", 1) for a in init["args"][2:])
    assert set(given) <= known
    assert main["args"] == ["run"]
    env = {e["name"]: e for e in main["env"]}
    assert set(env) <= set(_envvars(run)), set(env) - set(_envvars(run))
    assert env["SPEGELD_NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["SPEGELD_ADVERTISE_ADDR"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    assert "SPEGELD_KUBECONFIG" not in env  # the ServiceAccount, in-cluster

    # The init step points containerd where the daemon listens and the probes look.
    assert given["--mirror-target"] == f"http://{config.DEFAULT_MIRROR_ADDR}"
    assert "SPEGELD_REGISTRY_ADDR" not in env
    host, port = config.DEFAULT_MIRROR_ADDR.rsplit(":", 1)
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        assert main[probe]["httpGet"] == {"host": host, "port": int(port), "path": path}
    ports = {(p["containerPort"], p["protocol"]) for p in main["ports"]}
    assert ports == {
        (int(config.DEFAULT_PEER_ADDR.rsplit(":", 1)[1]), "TCP"),
        (int(config.DEFAULT_GOSSIP_ADDR.rsplit(":", 1)[1]), "UDP"),
    }


def test_daemonset_mounts_what_the_defaults_read() -> None:
    pod = _daemonset()["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    (main,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}

    def mounts(container: dict[str, Any]) -> dict[str, tuple[str, bool]]:
        """mountPath: (the volume's host path or secret name, read-only)."""
        found = {}
        for m in container["volumeMounts"]:
            volume = volumes[m["name"]]
            source = volume["hostPath"]["path"] if "hostPath" in volume else volume["secret"]
            found[m["mountPath"]] = (source if isinstance(source, str) else source["secretName"],
                                     m.get("readOnly", False))  # fmt: skip
        return found

    # Each host path at the same path in the pod: containerd names its paths as the host sees them.
    assert mounts(main) == {
        str(config.DEFAULT_CONTAINERD_SOCK.parent): (
            str(config.DEFAULT_CONTAINERD_SOCK.parent),
            True,
        ),
        str(config.DEFAULT_CONTENT_PATH): (str(config.DEFAULT_CONTENT_PATH), True),
        str(config.DEFAULT_STATE_DIR): (str(config.DEFAULT_STATE_DIR), False),
        "/etc/spegeld/gossip": ("spegeld-gossip-key", True),
    }
    init_args = dict(a.split("=", 1) for a in init["args"][2:])
    assert mounts(init) == {init_args["--config-path"]: (init_args["--config-path"], False)}
    env = {e["name"]: e.get("value") for e in main["env"]}
    key_dir, _, key_name = env["SPEGELD_CLUSTER_KEY_FILE"].rpartition("/")
    assert key_dir == "/etc/spegeld/gossip"
    assert volumes["gossip-key"]["secret"]["defaultMode"] == 0o400  # no warning at start
    assert key_name == "key"


def test_daemonset_security_context_is_tight() -> None:
    """Root only as the owner of containerd's files; no capability, no privilege, read-only
    root (tests/test_deploy_image.py runs the image under exactly this)."""
    pod = _daemonset()["spec"]["template"]["spec"]
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in (*pod["initContainers"], *pod["containers"]):
        assert container["securityContext"] == {
            "runAsUser": 0,
            "runAsGroup": 0,
            "runAsNonRoot": False,
            "privileged": False,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        }
        assert "memory" in container["resources"]["limits"]
        assert "cpu" not in container["resources"]["limits"]
        assert set(container["resources"]["requests"]) == {"cpu", "memory"}


def test_daemonset_names_the_image_the_build_writes() -> None:
    image_module = load_talos_module("talos_container_image", "container_image.py")
    with (REPO / "pyproject.toml").open("rb") as f:
        version = tomllib.load(f)["project"]["version"]
    expected = f"{image_module.DEFAULT_REPOSITORY}:v{version}"
    pod = _daemonset()["spec"]["template"]["spec"]
    for container in (*pod["initContainers"], *pod["containers"]):
        assert container["image"] == expected
        assert container["imagePullPolicy"] == "IfNotPresent"  # imported on the node, or pushed


def test_a_bad_daemonset_is_caught_by_the_same_validation() -> None:
    daemonset = _daemonset()
    daemonset["spec"]["template"]["spec"]["hostNetwork"] = "yes"
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(daemonset)
    daemonset = _daemonset()
    daemonset["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(daemonset)
