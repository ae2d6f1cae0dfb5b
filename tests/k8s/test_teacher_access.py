"""Who reaches the teachers, and how: the teacher Deployment behind its headless Service (TLS and
a token from Secrets), its students in the Ray pods (the token and the CA mounted), and the
teacher replicas a run starts as Ray actors on its own pods (ephemeral ports, NetworkPolicy).

Command lines (the Deployment's ``stkd serve`` args, the RayJobs' entrypoints) are parsed with
the real ``stkd`` argument parser, so a flag that does not exist fails here, not in the cluster.
"""

from __future__ import annotations

import argparse
import math
import posixpath
import shlex
from typing import Any

import pytest

from stkd_dist.cli import build_parser
from stkd_dist.config import Config, config_from_text

from .test_policies import by_kind, matches, one, pod_templates, ray_cluster_specs

Rendered = tuple[str, list[dict[str, Any]]]
Obj = dict[str, Any]
TLS_SECRET_KEYS = {"tls.crt", "tls.key"}  # what a kubernetes.io/tls Secret holds (plus ca.crt)


# ----------------------------------------------------------------------------- helpers


def parse_stkd(words: list[str]) -> argparse.Namespace:
    """``stkd <command> ...`` parsed by the CLI's own parser (argparse exits on an unknown flag)."""
    assert words and words[0] != "stkd", "pass the words after `stkd`"
    try:
        return build_parser(words[0]).parse_args(words)
    except SystemExit:
        pytest.fail(f"`stkd {shlex.join(words)}` does not parse")


def teacher(objects: list[Obj]) -> tuple[Obj, dict[str, Any], argparse.Namespace]:
    """(pod template, teacher container, its parsed ``stkd serve`` args)."""
    deploy = one(objects, "Deployment", "stkd-teacher")
    template = deploy["spec"]["template"]
    assert matches(deploy["spec"]["selector"]["matchLabels"], template["metadata"]["labels"])
    container = template["spec"]["containers"][0]
    args = parse_stkd(container["args"])
    assert args.command == "serve"
    return template, container, args


def grpc_port(container: dict[str, Any]) -> int:
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    return ports["grpc"]


def headless_service(objects: list[Obj]) -> Obj:
    """The one Service selecting the teacher pods."""
    template, _, _ = teacher(objects)
    labels = template["metadata"]["labels"]
    found = [
        s
        for s in by_kind(objects, "Service")
        if s["spec"].get("selector") and matches(s["spec"]["selector"], labels)
    ]
    assert len(found) == 1, f"expected one Service of the teacher pods, found {len(found)}"
    return found[0]


def mount_of(template: dict[str, Any], path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(volume mount, volume) of the first container's mount that holds ``path``."""
    container = template["spec"]["containers"][0]
    volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
    for m in container.get("volumeMounts", []):
        if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/"):
            return m, volumes[m["name"]]
    pytest.fail(f"{path} is on no volume of {container['name']}")


def secret_file(template: dict[str, Any], path: str) -> tuple[str, str]:
    """(Secret name, key) of the file ``path``, which must come from a Secret volume, read-only."""
    mount, volume = mount_of(template, path)
    assert mount.get("readOnly") is True, f"{path}: mount {mount['name']} is writable"
    assert "subPath" not in mount, f"{path}: a subPath mount never sees a renewed certificate"
    assert "secret" in volume, f"{path}: volume {volume['name']} is not a Secret"
    relative = posixpath.relpath(path, mount["mountPath"])
    items = volume["secret"].get("items")
    if items is None:  # the whole Secret: file name = key
        return volume["secret"]["secretName"], relative
    keys = [i["key"] for i in items if i["path"] == relative]
    assert keys, f"{path}: Secret {volume['secret']['secretName']} projects no such file"
    return volume["secret"]["secretName"], keys[0]


def token_ref(container: dict[str, Any]) -> dict[str, Any] | None:
    """The secretKeyRef of ``$STKD_TOKEN`` (None: not set); a literal token is an error."""
    for e in container.get("env", []):
        if e["name"] == "STKD_TOKEN":
            assert "value" not in e, f"{container['name']}: a literal token in the manifest"
            return e["valueFrom"]["secretKeyRef"]
    return None


def ray_pods(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(group, pod template) of a RayCluster spec's head and worker groups."""
    out = [("head", spec["headGroupSpec"]["template"])]
    out += [(g["groupName"], g["template"]) for g in spec["workerGroupSpecs"]]
    return out


def run_configs(objects: list[Obj]) -> dict[str, Config]:
    """``/config/<file>`` -> the run config, for every file of the run-config ConfigMap."""
    cm = one(objects, "ConfigMap", "stkd-run-config")
    return {
        f"/config/{key}": config_from_text(text, key)
        for key, text in cm["data"].items()
        if key.endswith((".yaml", ".yml"))
    }


def job_commands(objects: list[Obj]) -> dict[str, argparse.Namespace]:
    """RayJob name -> its parsed ``stkd`` entrypoint."""
    out = {}
    for job in by_kind(objects, "RayJob"):
        words = shlex.split(job["spec"]["entrypoint"])
        assert words[0] == "stkd", job["metadata"]["name"]
        out[job["metadata"]["name"]] = parse_stkd(words[1:])
    return out


def service_names(service: Obj) -> set[str]:
    """The names a pod of the Service's namespace resolves the Service by."""
    name, namespace = service["metadata"]["name"], service["metadata"]["namespace"]
    return {
        name,
        f"{name}.{namespace}",
        f"{name}.{namespace}.svc",
        f"{name}.{namespace}.svc.cluster.local",
    }


# ----------------------------------------------------------------------------- the teachers


def test_headless_service_lists_every_ready_teacher_pod(overlay: Rendered) -> None:
    name, objects = overlay
    _, container, args = teacher(objects)
    svc = headless_service(objects)
    spec = svc["spec"]
    assert spec["clusterIP"] == "None", "a virtual IP would hide the replicas from the client"
    # a teacher that is still loading (or draining) must not be handed streams
    assert spec.get("publishNotReadyAddresses", False) is False
    assert spec.get("type", "ClusterIP") == "ClusterIP"
    # the Service's namespace is the overlay's, the same as the teachers'
    assert svc["metadata"]["namespace"] == one(objects, "Namespace")["metadata"]["name"]
    # it selects the teachers and nothing else (a Ray pod listed would be handed streams)
    for where, other in pod_templates(objects):
        if not where.startswith("Deployment/stkd-teacher"):
            labels = other.get("metadata", {}).get("labels", {})
            assert not matches(spec["selector"], labels), f"{name}: the Service selects {where}"
    # one port, reaching the server's gRPC port: by name or by number
    (port,) = spec["ports"]
    assert port["protocol"] == "TCP" and port.get("appProtocol") == "grpc"
    target = port.get("targetPort", port["port"])
    by_name = {p["name"]: p["containerPort"] for p in container["ports"]}
    served = by_name[target] if isinstance(target, str) else target
    assert served == grpc_port(container) == args.port, f"{name}: {target} is not the gRPC port"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == args.port, probe
    assert args.host == "0.0.0.0", "the pod IP must be bound for the Service to reach it"


def test_the_teachers_take_tls_and_the_token_from_secrets(overlay: Rendered) -> None:
    name, objects = overlay
    template, container, args = teacher(objects)
    cert = secret_file(template, str(args.tls_cert))
    key = secret_file(template, str(args.tls_key))
    # one kubernetes.io/tls Secret: its tls.crt and tls.key
    assert cert[0] == key[0] == "stkd-teacher-tls", f"{name}: {cert}, {key}"
    assert (cert[1], key[1]) == ("tls.crt", "tls.key")
    assert {cert[1], key[1]} == TLS_SECRET_KEYS
    # the token: from its Secret, never on the command line (it would show in `ps` and the API)
    assert token_ref(container) == {"name": "stkd-teacher-token", "key": "token"}
    assert args.token is None, f"{name}: --token on the command line"
    # no client certificates: the kubelet's gRPC probes have none
    assert args.tls_client_ca is None, f"{name}: --tls-client-ca would fail every probe"
    assert not by_kind(objects, "Secret"), "Secrets are created in the cluster, never shipped"


# ----------------------------------------------------------------------------- the students


def test_every_ray_pod_holds_the_teacher_token_and_ca(overlay: Rendered) -> None:
    """A student's driver (the head, where a RayJob's entrypoint runs) resolves ``$STKD_TOKEN``
    and the ``--tls-ca`` path; its workers read the CA file themselves: every head and worker pod
    has both, from the teachers' Secrets."""
    name, objects = overlay
    template, container, args = teacher(objects)
    token = token_ref(container)
    tls_secret, _ = secret_file(template, str(args.tls_cert))
    seen = 0
    for where, spec in ray_cluster_specs(objects):
        for group, pod in ray_pods(spec):
            at = f"{name}: {where}/{group}"
            assert token_ref(pod["spec"]["containers"][0]) == token, at
            assert secret_file(pod, "/etc/stkd/teacher-ca/ca.crt") == (tls_secret, "ca.crt"), at
            # only the CA: the server's private key stays out of the student pods
            _, volume = mount_of(pod, "/etc/stkd/teacher-ca/ca.crt")
            assert [i["key"] for i in volume["secret"]["items"]] == ["ca.crt"], at
            seen += 1
    assert seen == 8  # RayCluster stkd and three RayJobs, a head and a worker group each


def test_students_of_the_served_teacher_name_the_headless_service(overlay: Rendered) -> None:
    """Every reference to the teacher Deployment, in a run config (``serve.endpoints``) or on a
    RayJob's command line (``--teacher``), is ``dns:///<Service>:<port>`` of the headless Service,
    with TLS verified against the mounted CA; at least one job uses the Deployment."""
    name, objects = overlay
    template, _, serve_args = teacher(objects)
    tls_secret, _ = secret_file(template, str(serve_args.tls_cert))
    svc = headless_service(objects)
    names, port = service_names(svc), svc["spec"]["ports"][0]["port"]

    def check(spec: str, at: str) -> None:
        assert spec.startswith("dns:///"), (
            f"{name}: {at} = {spec!r}: pod IPs change, reach the teachers through the Service"
        )
        host, _, p = spec.removeprefix("dns:///").rpartition(":")
        assert host in names, f"{name}: {at} = {spec!r}: not one of {sorted(names)}"
        assert p == str(port), f"{name}: {at} = {spec!r}: the Service's port is {port}"

    configs = run_configs(objects)
    for path, cfg in configs.items():
        if cfg.serve.endpoints and not cfg.serve.endpoints.startswith("ray:"):
            check(cfg.serve.endpoints, f"{path}: serve.endpoints")
    served = []
    jobs = {j["metadata"]["name"]: j["spec"] for j in by_kind(objects, "RayJob")}
    for job, args in job_commands(objects).items():
        given = getattr(args, "teacher", None) or []  # train-student: a list; distill: one
        given = [given] if isinstance(given, str) else given
        teachers = [t for t in given if not t.startswith("ray:")]  # ray:N starts its own
        if not teachers:
            continue
        served.append(job)
        for spec in teachers:
            check(spec, f"RayJob/{job} --teacher")
        assert args.token is None, f"{name}: RayJob/{job}: --token on the command line"
        # the CA: a file every pod of the job's cluster has (the workers open it themselves)
        assert getattr(args, "tls_ca", None), f"{name}: RayJob/{job}: no --tls-ca, no TLS"
        for group, pod in ray_pods(jobs[job]["rayClusterSpec"]):
            where = f"{name}: RayJob/{job}/{group}: {args.tls_ca}"
            assert secret_file(pod, args.tls_ca) == (tls_secret, "ca.crt"), where
        # the run config it reads exists
        assert args.config in configs, f"{name}: RayJob/{job}: no {args.config}"
    assert served == ["stkd-train-student"], f"{name}: jobs using the teacher Deployment"


def test_the_network_policy_admits_every_client_of_the_teachers(overlay: Rendered) -> None:
    """The pods that hold the teacher's token (its clients) reach the gRPC port the Service
    targets; no other port of the teachers is open to them."""
    name, objects = overlay
    template, container, args = teacher(objects)
    labels = template["metadata"]["labels"]
    token = token_ref(container)
    policies = [
        p["spec"]
        for p in by_kind(objects, "NetworkPolicy")
        if matches(p["spec"]["podSelector"].get("matchLabels", {}), labels)
    ]
    assert policies, f"{name}: the teachers are open to every pod"
    clients = [
        (where, t)
        for where, t in pod_templates(objects)
        if not where.startswith("Deployment/")
        and any(token_ref(c) == token for c in t["spec"]["containers"])
    ]
    assert len(clients) == 8
    for where, client in clients:
        client_labels = client.get("metadata", {}).get("labels", {})
        ports = {
            p["port"]
            for policy in policies
            for rule in policy.get("ingress", [])
            if any(
                matches(peer["podSelector"]["matchLabels"], client_labels) for peer in rule["from"]
            )
            for p in rule["ports"]
        }
        assert ports == {args.port}, f"{name}: {where} reaches the teachers on {ports}"


# ----------------------------------------------------------------------------- started replicas


def selects(policy: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a NetworkPolicy spec applies to pods with ``labels`` (matchExpressions: assumed)."""
    selector = policy.get("podSelector", {})
    if selector.get("matchExpressions"):
        return True  # conservatively: it may
    return matches(selector.get("matchLabels", {}), labels)


def admits_on_every_port(rule: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether an ingress rule admits pods with ``labels`` of this namespace on every port."""
    if rule.get("ports"):
        return False
    peers = rule.get("from")
    return not peers or any(
        set(peer) == {"podSelector"}
        and not peer["podSelector"].get("matchExpressions")
        and matches(peer["podSelector"].get("matchLabels", {}), labels)
        for peer in peers
    )


def ray_pod_isolation(objects: list[Obj]) -> list[str]:
    """Why some Ray pod may not reach another one of its cluster on every port (empty: none).

    The teacher replicas a run starts are Ray actors listening on ephemeral ports of their pods
    (as are Ray's own workers). NetworkPolicies add up: a pod that some policy selects for
    ingress admits only what the rules of all the policies selecting it admit, so together they
    must admit every port from the Ray pods; and no policy may restrict the Ray pods' egress."""
    problems = []
    policies = [(p["metadata"]["name"], p["spec"]) for p in by_kind(objects, "NetworkPolicy")]
    for where, spec in ray_cluster_specs(objects):
        for group, pod in ray_pods(spec):
            labels = pod.get("metadata", {}).get("labels", {})
            ingress_rules, isolated = [], []
            for policy_name, policy in policies:
                if not selects(policy, labels):
                    continue
                types = policy.get("policyTypes") or ["Ingress"]
                if "Egress" in types:
                    problems.append(
                        f"NetworkPolicy/{policy_name} restricts the egress of {where}/{group}"
                    )
                if "Ingress" in types:
                    isolated.append(policy_name)
                    ingress_rules += policy.get("ingress", [])
            if isolated and not any(admits_on_every_port(r, labels) for r in ingress_rules):
                problems.append(
                    f"{where}/{group}: isolated by {isolated}, and no rule admits the Ray pods "
                    "on every port"
                )
    return problems


def test_ray_pods_reach_each_other_on_every_port(overlay: Rendered) -> None:
    name, objects = overlay
    assert ray_pod_isolation(objects) == [], name


def test_the_isolation_check_catches_a_default_deny(overlay: Rendered) -> None:
    _, objects = overlay

    def policy(spec: dict[str, Any]) -> Obj:
        meta = {"name": "x", "namespace": "ns"}
        return {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": meta,
            "spec": spec,
        }

    deny_all = policy({"podSelector": {}, "policyTypes": ["Ingress"]})
    ray_on_one_port = policy(
        {
            "podSelector": {},
            "ingress": [
                {
                    "from": [{"podSelector": {"matchLabels": {"stkd.io/role": "ray"}}}],
                    "ports": [{"port": 6379}],
                }
            ],
        }
    )
    no_egress = policy({"podSelector": {}, "policyTypes": ["Egress"]})
    allow_ray = policy(
        {
            "podSelector": {"matchLabels": {"stkd.io/role": "ray"}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"stkd.io/role": "ray"}}}]}],
        }
    )
    for bad in (deny_all, ray_on_one_port, no_egress):
        assert ray_pod_isolation([*objects, bad])
    assert not ray_pod_isolation([*objects, deny_all, allow_ray])


def ray_cpus(quantity: str | int | float) -> int:
    """The CPUs KubeRay tells Ray a pod has, from its CPU limit (rounded up: ``500m`` -> 1)."""
    text = str(quantity)
    return math.ceil(int(text[:-1]) / 1000 if text.endswith("m") else float(text))


def test_started_replicas_are_reachable_and_fit_the_job_clusters(overlay: Rendered) -> None:
    """RayJob stkd-distill starts ``serve.replicas`` teacher replicas (``serve.mode: stream``,
    no endpoints): secured, so each binds its pod's IP (an unsecured one binds 127.0.0.1, out of
    reach of the other pods), and the worker pods' CPUs hold them next to the Train workers."""
    name, objects = overlay
    configs = run_configs(objects)
    jobs = {j["metadata"]["name"]: j["spec"] for j in by_kind(objects, "RayJob")}
    args = job_commands(objects)["stkd-distill"]
    serve, cluster = configs[args.config].serve, configs[args.config].cluster
    # (with serve.endpoints set, `stkd distill` would stream from there, but it has no setting
    # for the client's CA and cannot verify the TLS teacher Deployment: stkd-train-student does)
    assert (serve.mode, serve.endpoints) == ("stream", None), f"{name}: the job starts replicas"
    assert serve.secure is True, f"{name}: unsecured replicas bind 127.0.0.1"
    spec = jobs["stkd-distill"]["rayClusterSpec"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    worker_cpus = 0
    for group in spec["workerGroupSpecs"]:
        limit = group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"]
        cpus = group["rayStartParams"].get("num-cpus", ray_cpus(limit))
        worker_cpus += group["replicas"] * int(cpus)
    needed = cluster.max_workers * cluster.cpus_per_worker + serve.replicas * serve.cpus_per_replica
    assert needed <= worker_cpus, (
        f"{name}: {cluster.max_workers} Train workers x {cluster.cpus_per_worker} CPU + "
        f"{serve.replicas} replicas x {serve.cpus_per_replica} CPU > the workers' {worker_cpus}: "
        "the replicas start first and the Train workers would wait forever"
    )


def test_gpu_replicas_run_on_the_gpu_workers(overlay: Rendered) -> None:
    """``serve.device: cuda`` replicas are Ray actors that reserve no GPU: they must land on a
    GPU worker pod (not the CPU-less head) and Ray must leave that pod's GPU visible to them."""
    name, objects = overlay
    serve = run_configs(objects)["/config/run.yaml"].serve
    if name == "gpu":
        assert (serve.device, serve.precision, serve.secure) == ("cuda", "bf16", True)
    else:
        assert serve.device == "cpu" and serve.precision == "fp32", name
    if not serve.device.startswith("cuda"):
        return
    # 0 CPUs per replica would let Ray place one on the head (num-cpus 0), which has no GPU
    assert serve.cpus_per_replica > 0, name
    for where, spec in ray_cluster_specs(objects):
        for group in spec["workerGroupSpecs"]:
            container = group["template"]["spec"]["containers"][0]
            assert int(container["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1, where
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert env.get("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO") == "0", (
                f"{name}: {where}/{group['groupName']}: with =1 Ray hides the GPU from the "
                "replicas (num_gpus=0 actors); pin Ray 2.60's default"
            )
