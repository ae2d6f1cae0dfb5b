"""Policy checks on the rendered overlays: security, probes, selectors, GPUs, README commands."""

from __future__ import annotations

import shlex
from collections.abc import Iterator
from typing import Any

import yaml

from stkd_dist.config import config_from_text

Rendered = tuple[str, list[dict[str, Any]]]
TEACHER_PORT = 50051


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in by_kind(objects, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def ray_cluster_specs(objects: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, RayCluster spec) of the RayCluster and of every RayJob's own cluster."""
    for obj in by_kind(objects, "RayCluster"):
        yield f"RayCluster/{obj['metadata']['name']}", obj["spec"]
    for obj in by_kind(objects, "RayJob"):
        yield f"RayJob/{obj['metadata']['name']}", obj["spec"]["rayClusterSpec"]


def pod_templates(objects: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod template) of every workload: Deployments, Ray heads/workers, submitters."""
    for obj in by_kind(objects, "Deployment"):
        yield f"Deployment/{obj['metadata']['name']}", obj["spec"]["template"]
    for where, spec in ray_cluster_specs(objects):
        yield f"{where}/head", spec["headGroupSpec"]["template"]
        for group in spec["workerGroupSpecs"]:
            yield f"{where}/{group['groupName']}", group["template"]
    for obj in by_kind(objects, "RayJob"):
        if "submitterPodTemplate" in obj["spec"]:
            yield f"RayJob/{obj['metadata']['name']}/submitter", obj["spec"]["submitterPodTemplate"]


def containers(template: dict[str, Any]) -> list[dict[str, Any]]:
    spec = template["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# ----------------------------------------------------------------------------- security


def test_every_container_is_non_root_with_requests_and_limits(overlay: Rendered) -> None:
    name, objects = overlay
    seen = 0
    for where, template in pod_templates(objects):
        pod_sc = template["spec"].get("securityContext", {})
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        assert template["spec"].get("automountServiceAccountToken") is False, where
        for c in containers(template):
            seen += 1
            at = f"{name}: {where}/{c['name']}"
            sc = {**pod_sc, **c.get("securityContext", {})}
            assert sc.get("runAsNonRoot") is True, at
            assert sc.get("runAsUser", 0) != 0, at
            assert sc.get("allowPrivilegeEscalation") is False, at
            assert "ALL" in sc.get("capabilities", {}).get("drop", []), at
            assert sc.get("readOnlyRootFilesystem") is True, at
            assert not sc.get("privileged", False), at
            res = c.get("resources", {})
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(part, {})), f"{at}: {part}"
            image = c["image"]
            assert image.split("/")[-1].startswith("stkd-dist:"), at
            assert not image.endswith(":latest"), at
    assert seen >= 8


def test_the_autoscaler_sidecar_is_bounded_and_non_root(overlay: Rendered) -> None:
    _, objects = overlay
    spec = one(objects, "RayCluster")["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    opts = spec["autoscalerOptions"]
    assert {"cpu", "memory"} <= set(opts["resources"]["limits"])
    assert opts["securityContext"]["runAsNonRoot"] is True
    assert opts["securityContext"]["allowPrivilegeEscalation"] is False
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["minReplicas"] < group["maxReplicas"]


def test_secrets_are_referenced_never_defined(overlay: Rendered) -> None:
    _, objects = overlay
    assert not by_kind(objects, "Secret")
    teacher = one(objects, "Deployment", "stkd-teacher")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in teacher["volumes"]}
    tls_mount = next(
        m["mountPath"] for m in teacher["containers"][0]["volumeMounts"] if m["name"] == "tls"
    )
    assert volumes["tls"]["secret"]["secretName"] == "stkd-teacher-tls"
    env = {e["name"]: e for e in teacher["containers"][0]["env"]}
    assert env["STKD_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "stkd-teacher-token",
        "key": "token",
    }
    args = teacher["containers"][0]["args"]
    for flag in ("--tls-cert", "--tls-key"):
        value = next(a.split("=", 1)[1] for a in args if a.startswith(f"{flag}="))
        assert value.startswith(tls_mount + "/"), flag
    for where, spec in ray_cluster_specs(objects):
        assert spec["authOptions"]["mode"] == "token", where


# ----------------------------------------------------------------------------- teacher service


def teacher_pod(objects: list[dict[str, Any]]) -> tuple[dict[str, str], dict[str, Any]]:
    deploy = one(objects, "Deployment", "stkd-teacher")
    template = deploy["spec"]["template"]
    assert matches(deploy["spec"]["selector"]["matchLabels"], template["metadata"]["labels"])
    return template["metadata"]["labels"], template["spec"]["containers"][0]


def test_teacher_serves_grpc_with_health_probes(overlay: Rendered) -> None:
    _, objects = overlay
    _, container = teacher_pod(objects)
    assert container["args"][0] == "serve"
    args = dict(a.split("=", 1) for a in container["args"][1:])
    assert args["--port"] == str(TEACHER_PORT) and args["--host"] == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == TEACHER_PORT
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        grpc = container[probe]["grpc"]
        assert grpc["port"] == TEACHER_PORT, probe
        # the server speaks TLS: a plaintext probe would never succeed
        assert grpc.get("mode") == "TLS", probe


def test_headless_service_selects_the_teacher_pods(overlay: Rendered) -> None:
    _, objects = overlay
    labels, _ = teacher_pod(objects)
    svc = one(objects, "Service", "stkd-teacher")
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"] and matches(svc["spec"]["selector"], labels)
    assert [p["port"] for p in svc["spec"]["ports"]] == [TEACHER_PORT]
    pdb = one(objects, "PodDisruptionBudget", "stkd-teacher")
    assert matches(pdb["spec"]["selector"]["matchLabels"], labels)
    replicas = one(objects, "Deployment", "stkd-teacher")["spec"]["replicas"]
    assert 1 <= pdb["spec"]["minAvailable"] < replicas


def test_network_policy_admits_only_grpc_from_students_and_ray(overlay: Rendered) -> None:
    _, objects = overlay
    labels, _ = teacher_pod(objects)
    policy = one(objects, "NetworkPolicy", "stkd-teacher")["spec"]
    assert matches(policy["podSelector"]["matchLabels"], labels)
    assert policy["policyTypes"] == ["Ingress"]
    peers = []
    for rule in policy["ingress"]:
        assert rule["ports"] == [{"protocol": "TCP", "port": TEACHER_PORT}]
        for peer in rule["from"]:
            assert set(peer) == {"podSelector"}, "only pods of this namespace"
            selector = peer["podSelector"]
            assert set(selector) == {"matchLabels"}
            assert selector["matchLabels"].get("stkd.io/role") in {"student", "ray"}
            peers.append(selector["matchLabels"])
    assert {p["stkd.io/role"] for p in peers} == {"student", "ray"}
    # the Ray pods that train students are admitted; the submitters and teachers are not
    for where, template in pod_templates(objects):
        pod_labels = template.get("metadata", {}).get("labels", {})
        admitted = any(matches(p, pod_labels) for p in peers)
        assert admitted == (where.startswith("Ray") and not where.endswith("submitter")), where


# ----------------------------------------------------------------------------- storage, config


def test_every_ray_and_teacher_pod_reaches_the_storage_root(overlay: Rendered) -> None:
    """A shared volume mounted at STKD_STORAGE, or (object-store overlay) a bucket URL with the
    credentials from a Secret and no volume claim anywhere."""
    name, objects = overlay
    remote = name == "object-store"
    claims = by_kind(objects, "PersistentVolumeClaim")
    if remote:
        assert claims == []
    else:
        claim = one(objects, "PersistentVolumeClaim", "stkd-storage")
        assert claim["spec"]["resources"]["requests"]["storage"]
    for where, template in pod_templates(objects):
        if where.endswith("submitter"):
            continue
        volumes = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in template["spec"]["volumes"]
            if "persistentVolumeClaim" in v
        }
        c = template["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in c["env"]}
        if remote:
            assert env["STKD_STORAGE"].startswith("s3://") and not volumes, where
            secrets = [e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e]
            assert secrets == ["stkd-object-store"], where
            continue
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert volumes.get(mounts.get(env["STKD_STORAGE"], "")) == "stkd-storage", where


def test_run_config_is_valid_and_matches_the_cluster(overlay: Rendered) -> None:
    name, objects = overlay
    cm = one(objects, "ConfigMap", "stkd-run-config")
    cfg = config_from_text(cm["data"]["run.yaml"], f"{name}/run.yaml")
    for obj in by_kind(objects, "RayJob"):
        spec = obj["spec"]["rayClusterSpec"]
        workers = spec["workerGroupSpecs"][0]
        assert workers["replicas"] == cfg.cluster.max_workers, obj["metadata"]["name"]
        gpus = workers["template"]["spec"]["containers"][0]["resources"]["limits"].get(
            "nvidia.com/gpu", 0
        )
        assert cfg.cluster.use_gpu == (int(gpus) > 0)
        head = spec["headGroupSpec"]["template"]["spec"]
        assert any(
            v.get("configMap", {}).get("name") == cm["metadata"]["name"] for v in head["volumes"]
        )
    # the teacher serves the run the RayJobs train
    _, teacher = teacher_pod(objects)
    args = dict(a.split("=", 1) for a in teacher["args"][1:])
    assert args["--checkpoint"] == cfg.run.name
    assert args["--data"] == cfg.data.dataset


# ----------------------------------------------------------------------------- GPUs, jobs


def test_only_the_gpu_overlay_requests_gpus(overlay: Rendered) -> None:
    name, objects = overlay
    gpu_workers = []
    for where, spec in ray_cluster_specs(objects):
        for group in spec["workerGroupSpecs"]:
            res = group["template"]["spec"]["containers"][0]["resources"]
            limit = int(res["limits"].get("nvidia.com/gpu", 0))
            assert limit == int(res["requests"].get("nvidia.com/gpu", 0)), where
            gpu_workers.append(limit)
            if limit:
                tolerations = group["template"]["spec"].get("tolerations", [])
                assert any(t["key"] == "nvidia.com/gpu" for t in tolerations), where
    if name == "gpu":
        assert gpu_workers and all(n >= 1 for n in gpu_workers)
        images = {c["image"] for _, t in pod_templates(objects) for c in containers(t)}
        assert all(i.endswith("-cuda") for i in images)
    else:
        assert not any(gpu_workers)


def test_rayjobs_run_the_commands_readme_documents(
    overlay: Rendered, readme_code_lines: list[str]
) -> None:
    _, objects = overlay
    documented = {
        line
        for line in readme_code_lines
        if line.startswith(("stkd distill", "stkd sweep", "stkd train-student"))
    }
    jobs = {o["metadata"]["name"]: o["spec"] for o in by_kind(objects, "RayJob")}
    assert set(jobs) == {"stkd-distill", "stkd-sweep", "stkd-train-student"}
    for name, spec in jobs.items():
        entrypoint = " ".join(shlex.split(spec["entrypoint"]))
        assert entrypoint in documented, f"{name}: {entrypoint!r} is not in README.md"
        assert entrypoint.split()[:2] == ["stkd", name.removeprefix("stkd-")]
        assert "--config /config/run.yaml" in entrypoint
        assert spec["shutdownAfterJobFinishes"] is True
        assert spec["ttlSecondsAfterFinished"] > 0
        assert spec["backoffLimit"] >= 0
        assert spec["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_rendered_yaml_round_trips(overlay: Rendered) -> None:
    _, objects = overlay
    text = yaml.safe_dump_all(objects)
    assert list(yaml.safe_load_all(text)) == objects
