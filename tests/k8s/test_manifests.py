"""Every object of every overlay renders and validates against its schema.

Core kinds: the Kubernetes OpenAPI schemas shipped by ``kubernetes-validate`` (strict: unknown
fields are errors). KubeRay kinds: the CRDs' ``openAPIV3Schema`` with ``jsonschema``, made strict
the way the API server prunes (``additionalProperties: false`` unless a node preserves unknown
fields), with OpenAPI's ``nullable`` and Kubernetes' int-or-string translated to JSON Schema.
CEL rules (``x-kubernetes-validations``) are not evaluated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from .conftest import KUBE_VERSION, OVERLAYS

Rendered = tuple[str, list[dict[str, Any]]]
KUBERAY_GROUP = "ray.io"


def test_there_are_the_three_overlays() -> None:
    assert {"cpu-dev", "gpu", "object-store"} <= set(OVERLAYS)


def test_core_objects_validate_strictly(overlay: Rendered) -> None:
    name, objects = overlay
    core = [o for o in objects if not o["apiVersion"].startswith(f"{KUBERAY_GROUP}/")]
    kinds = {o["kind"] for o in core}
    assert {"Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy"} <= kinds
    assert {"ConfigMap", "Namespace"} <= kinds
    # the object-store overlay keeps its storage root in a bucket: no volume claim at all
    assert ("PersistentVolumeClaim" in kinds) == (name != "object-store")
    for obj in core:
        try:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{name}: {obj['kind']}/{obj['metadata']['name']}: {e.message}")


def strict(schema: Any) -> Any:
    """A CRD schema turned into a strict JSON Schema (see the module docstring)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    node = {k: strict(v) if k != "enum" else v for k, v in schema.items()}
    if (
        "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        node["additionalProperties"] = False
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in node and "type" not in node:
        node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and isinstance(node.get("type"), str):
        node["type"] = [node["type"], "null"]
    return node


@pytest.fixture(scope="session")
def kuberay_validators(shared_data: Path) -> dict[tuple[str, str], jsonschema.Validator]:
    """(apiVersion, kind) -> validator, from the KubeRay CRDs in ../shared/schemas/kuberay."""
    folder = shared_data.parent / "schemas" / "kuberay"
    if not folder.is_dir():
        pytest.skip(f"KubeRay CRD schemas not present ({folder} is absent)")
    validators = {}
    for path in sorted(folder.glob("*.yaml")):
        # the CRDs are megabytes of YAML: the C loader reads them in a fraction of the time
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema = strict(version["schema"]["openAPIV3Schema"])
            validators[(f"{group}/{version['name']}", kind)] = jsonschema.Draft7Validator(schema)
    return validators


def test_kuberay_objects_validate_against_the_crds(
    overlay: Rendered, kuberay_validators: dict[tuple[str, str], jsonschema.Validator]
) -> None:
    name, objects = overlay
    ray_objects = [o for o in objects if o["apiVersion"].startswith(f"{KUBERAY_GROUP}/")]
    assert sorted(o["kind"] for o in ray_objects) == ["RayCluster", *["RayJob"] * 3]
    for obj in ray_objects:
        validator = kuberay_validators.get((obj["apiVersion"], obj["kind"]))
        assert validator is not None, f"no CRD for {obj['apiVersion']} {obj['kind']}"
        errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
        assert not errors, f"{name}: {obj['kind']}/{obj['metadata']['name']}: " + "; ".join(
            f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:5]
        )


def test_the_strict_crd_validation_catches_mistakes(
    kuberay_validators: dict[tuple[str, str], jsonschema.Validator],
) -> None:
    validator = kuberay_validators[("ray.io/v1", "RayJob")]
    good = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": "x"},
        "spec": {"entrypoint": "stkd distill", "shutdownAfterJobFinishes": True},
    }
    assert not list(validator.iter_errors(good))
    typo = {**good, "spec": {**good["spec"], "shutdownAfterJobFinish": True}}
    wrong_type = {**good, "spec": {**good["spec"], "backoffLimit": "two"}}
    for bad in (typo, wrong_type):
        assert list(validator.iter_errors(bad))
