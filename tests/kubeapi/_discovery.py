"""Static discovery documents for the groups the test server serves.

Only legacy (unaggregated) discovery is served: kubectl 1.32 asks for the
aggregated ``apidiscovery.k8s.io/v2`` form first and falls back to legacy when the
answer is plain ``application/json``, as it does against older servers.
"""

from __future__ import annotations

from typing import Any

GIT_VERSION = "v1.32.0"
LEASE_VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]


def version_info(platform: str = "linux/amd64") -> dict[str, Any]:
    return {
        "major": "1",
        "minor": "32",
        "gitVersion": GIT_VERSION,
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2024-12-11T17:59:15Z",
        "goVersion": "go1.23.3",
        "compiler": "gc",
        "platform": platform,
    }


def api_versions(server_address: str) -> dict[str, Any]:
    return {
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [
            {"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}
        ],
    }


def core_v1() -> dict[str, Any]:
    return {
        "kind": "APIResourceList",
        "groupVersion": "v1",
        "resources": [
            {
                "name": "namespaces",
                "singularName": "namespace",
                "namespaced": False,
                "kind": "Namespace",
                "verbs": ["get", "list"],
                "shortNames": ["ns"],
            }
        ],
    }


GROUPS: dict[str, list[dict[str, Any]]] = {
    "coordination.k8s.io": [
        {
            "name": "leases",
            "singularName": "lease",
            "namespaced": True,
            "kind": "Lease",
            "verbs": LEASE_VERBS,
            "storageVersionHash": "gqkMMb/YqFM=",
        }
    ],
    "authorization.k8s.io": [
        {
            "name": "selfsubjectaccessreviews",
            "singularName": "selfsubjectaccessreview",
            "namespaced": False,
            "kind": "SelfSubjectAccessReview",
            "verbs": ["create"],
        }
    ],
}


def api_group(name: str) -> dict[str, Any]:
    gv = {"groupVersion": f"{name}/v1", "version": "v1"}
    return {
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": name,
        "versions": [gv],
        "preferredVersion": gv,
    }


def api_group_list() -> dict[str, Any]:
    groups = []
    for name in GROUPS:
        group = api_group(name)
        del group["kind"], group["apiVersion"]
        groups.append(group)
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}


def resource_list(group: str) -> dict[str, Any]:
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": f"{group}/v1",
        "resources": GROUPS[group],
    }


def human_duration(seconds: float) -> str:
    """apimachinery's ``duration.HumanDuration``, for the AGE column."""
    s = int(seconds)
    if s < -1:
        return "<invalid>"
    if s < 0:
        return "0s"
    if s < 120:
        return f"{s}s"
    minutes = s // 60
    if minutes < 10:
        return f"{minutes}m{s % 60}s" if s % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    hours = minutes // 60
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    days = hours // 24
    return f"{days}d{hours % 24}h" if days < 8 and hours % 24 else f"{days}d"


def lease_table(items: list[dict[str, Any]], resource_version: str, age_of: Any) -> dict[str, Any]:
    """A ``meta.k8s.io/v1`` Table with the columns kube-apiserver prints for leases."""
    columns = [
        ("Name", "string", "name", "Name must be unique within a namespace."),
        (
            "Holder",
            "string",
            "",
            "holderIdentity contains the identity of the holder of a current lease.",
        ),
        (
            "Age",
            "string",
            "",
            "CreationTimestamp is a timestamp representing the server time when this object was created.",
        ),
    ]
    rows = []
    for item in items:
        meta = item["metadata"]
        rows.append(
            {
                "cells": [
                    meta["name"],
                    (item.get("spec") or {}).get("holderIdentity") or "",
                    human_duration(age_of(meta["creationTimestamp"])),
                ],
                "object": {
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": meta,
                },
            }
        )
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": resource_version},
        "columnDefinitions": [
            {"name": n, "type": t, "format": f, "description": d, "priority": 0}
            for n, t, f, d in columns
        ],
        "rows": rows,
    }


def openapi_v3_root() -> dict[str, Any]:
    return {
        "paths": {
            f"apis/{group}/v1": {"serverRelativeURL": f"/openapi/v3/apis/{group}/v1"}
            for group in GROUPS
        }
    }


def openapi_v3_group(group: str) -> dict[str, Any]:
    """A skeleton OpenAPI 3 document: the operations with their GVK and query parameters.

    kubectl only reads it to learn that the server validates fields itself
    (``fieldValidation`` on the PATCH operation of the kind); it then skips
    client-side schema validation, as it does against a real 1.32 server.
    """
    params = [
        {"name": n, "in": "query", "schema": {"type": "string", "uniqueItems": True}}
        for n in ("dryRun", "fieldManager", "fieldValidation")
    ]
    paths: dict[str, Any] = {}
    for resource in GROUPS[group]:
        gvk = {"group": group, "version": "v1", "kind": resource["kind"]}
        base = f"/apis/{group}/v1/"
        if resource["namespaced"]:
            base += "namespaces/{namespace}/"
        collection: dict[str, Any] = {}
        item: dict[str, Any] = {}
        for verb in resource["verbs"]:
            op = {
                "x-kubernetes-group-version-kind": gvk,
                "x-kubernetes-action": verb,
                "parameters": params,
            }
            if verb == "create":
                collection["post"] = op
            elif verb == "list":
                collection["get"] = op
            elif verb in ("get", "update", "patch", "delete"):
                item[
                    {"get": "get", "update": "put", "patch": "patch", "delete": "delete"}[verb]
                ] = op
        paths[base + resource["name"]] = collection
        if item:
            paths[base + resource["name"] + "/{name}"] = item
    return {
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": GIT_VERSION},
        "paths": paths,
        "components": {"schemas": {}},
    }
