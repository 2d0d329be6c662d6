"""deploy/rbac.yaml, and the Role YAML the doctor prints, against the official schemas."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from spegeld.doctor._remedies import LEASE_VERBS, forbidden

RBAC = Path(__file__).resolve().parent.parent / "deploy" / "rbac.yaml"
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
