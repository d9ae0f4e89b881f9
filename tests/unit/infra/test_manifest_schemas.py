"""Every Kubernetes manifest in infra/k8s validated offline against its API schema.

Built-in kinds (Deployment, Service, NetworkPolicy, ...) go through ``kubernetes-validate``'s strict
schemas of the Kubernetes version below; RayCluster and RayJob through KubeRay's CRD schemas,
vendored in infra/k8s/schemas/ (see its README), made strict the same way: an object schema that
lists its properties rejects any other, as ``kubectl apply`` (field validation "Strict", kubectl's
default) and the API server do for a field the CRD does not define. So a misspelt or misplaced field
fails here instead of being dropped by the cluster.
"""

from __future__ import annotations

import copy
import gzip
import json
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

K8S = Path(__file__).resolve().parents[3] / "infra" / "k8s"
KUBERNETES_VERSION = "1.33"
CRD_SCHEMAS = {("ray.io/v1", "RayCluster"), ("ray.io/v1", "RayJob")}


def manifests() -> list[tuple[str, dict]]:
    found = []
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] not in ("Kustomization", "Component"):
                found.append((f"{path.relative_to(K8S)}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return found


def _strict(schema):
    """A copy of an OpenAPI v3 schema in which every object with ``properties`` allows no others
    (unless it says ``additionalProperties`` or ``x-kubernetes-preserve-unknown-fields`` itself)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@cache
def crd_validator(kind: str) -> jsonschema.Validator:
    raw = (K8S / "schemas" / f"ray.io_v1_{kind.lower()}.json.gz").read_bytes()
    schema = _strict(json.loads(gzip.decompress(raw)))
    # A structural schema's top level may leave out apiVersion/kind/metadata; they are always allowed.
    for key in ("apiVersion", "kind", "metadata"):
        schema["properties"].setdefault(key, {})
    return jsonschema.Draft7Validator(schema)


def validate(doc: dict) -> None:
    """Raise a ``jsonschema.ValidationError`` (or kubernetes-validate's subclass) if ``doc`` does not fit."""
    if (doc["apiVersion"], doc["kind"]) in CRD_SCHEMAS:
        crd_validator(doc["kind"]).validate(doc)
    else:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


MANIFESTS = manifests()


@pytest.mark.parametrize("name, doc", MANIFESTS, ids=[n for n, _ in MANIFESTS])
def test_manifest_fits_its_schema(name, doc):
    validate(doc)


def test_every_kind_we_ship_is_checked():
    kinds = {doc["kind"] for _, doc in MANIFESTS}
    assert {"RayCluster", "RayJob", "Deployment", "NetworkPolicy"} <= kinds


def _first_container(doc: dict) -> dict:
    spec = doc["spec"]
    if doc["kind"] == "RayJob":
        spec = spec["rayClusterSpec"]
    if doc["kind"] in ("RayJob", "RayCluster"):
        return spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    return spec["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("kind", ["RayJob", "RayCluster", "Deployment"])
def test_an_unknown_field_fails_validation(kind):
    (doc,) = [d for _, d in MANIFESTS if d["kind"] == kind and d["metadata"]["name"] != "postgres"][:1]
    validate(doc)
    for where in ("spec", "container"):
        broken = copy.deepcopy(doc)
        target = broken["spec"] if where == "spec" else _first_container(broken)
        target["imagePullPolicyy"] = "Always"  # a typo the cluster would otherwise drop silently
        with pytest.raises(jsonschema.ValidationError, match="imagePullPolicyy"):
            validate(broken)


def test_a_wrong_type_fails_validation():
    (doc,) = [d for _, d in MANIFESTS if d["kind"] == "RayJob"]
    broken = copy.deepcopy(doc)
    broken["spec"]["shutdownAfterJobFinishes"] = "yes"
    with pytest.raises(jsonschema.ValidationError, match="is not of type 'boolean'"):
        validate(broken)
