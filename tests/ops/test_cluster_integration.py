"""A real local multi-node Ray cluster (head + 2 worker raylets) and real jobs through the Jobs API.

Uses the shared ``local_ray_cluster`` fixture (tests/conftest.py), which starts the cluster with
``stkd cluster local start`` and stops it in teardown even on failure.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from grpc import StatusCode

from stkd_dist.cli import main
from stkd_dist.storage import open_store
from tests.conftest import random_store
from tests.serving.tls_refusals import CLOSED_BY_SERVER, assert_rpc_refused

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def json_objects(text: str) -> list[Any]:
    """Every JSON object that starts at the beginning of a line of ``text`` (job logs mix them)."""
    decoder = json.JSONDecoder()
    found, pos = [], 0
    while (pos := text.find("{", pos)) != -1:
        if pos == 0 or text[pos - 1] == "\n":
            try:
                obj, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError:
                pos += 1
                continue
            found.append(obj)
            pos = end
        else:
            pos += 1
    return found


def test_submitted_job_runs_on_the_worker_nodes(
    local_ray_cluster: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster = local_ray_cluster
    storage = tmp_path / "storage"
    command = (
        "cluster probe --json && stkd synth --nodes 5 --steps 300 --name j1 && stkd info j1 --json"
    )
    done = cluster.stkd(
        "--storage", storage, "submit", "--address", cluster.dashboard_url,
        "--job-id", "j1-synth", "--", command,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "j1-synth" in done.stderr and "SUCCEEDED" in done.stderr

    objects = json_objects(done.stdout)
    # placement: one task pinned to every node ran there; the workers are distinct nodes and are
    # exactly the nodes that carry the per-worker resources
    probe = next(o["probe"] for o in objects if "probe" in o)
    assert all(p["ran_on"] == p["node_id"] for p in probe)
    by_node = {p["node_id"]: p for p in probe}
    assert set(by_node) == {cluster.head_node_id, *cluster.worker_node_ids.values()}
    assert by_node[cluster.head_node_id]["is_head"]
    for i, node_id in cluster.worker_node_ids.items():
        assert by_node[node_id]["custom_resources"] == {f"stkd_worker_{i}": 1.0}
    assert len(set(cluster.worker_node_ids.values())) == 2

    # the job's output and its effect on the (shared) storage root
    info = next(o for o in objects if o.get("name") == "j1")
    assert (info["steps"], info["nodes"], info["channels"]) == (300, 5, ["flow"])
    store = open_store(storage / "datasets" / "j1.zarr")
    assert store.shape == (300, 5, 1)
    assert store.fingerprint == info["fingerprint"]

    # a failing job: its exit status comes back, the Ray message tail is not repeated
    failed = cluster.stkd("submit", "--address", cluster.dashboard_url, "--", "info", "no-such-ds")
    assert failed.returncode == 2, failed.stdout + failed.stderr
    assert "no-such-ds" in failed.stdout  # the job's own one-line error, streamed
    assert "FAILED (exit status 2)" in failed.stderr

    # jobs, logs and unknown ids through the same API, in this process
    assert main(["jobs", "--address", cluster.dashboard_url, "--json"]) == 0
    listed = {j["job_id"]: j for j in json.loads(capsys.readouterr().out)}
    assert listed["j1-synth"]["status"] == "SUCCEEDED"
    assert listed["j1-synth"]["entrypoint"] == f"stkd {command}"
    assert sorted(j["status"] for j in listed.values()) == ["FAILED", "SUCCEEDED"]
    assert main(["logs", "j1-synth", "--address", cluster.dashboard_url]) == 0
    assert "synthesised 'j1'" in capsys.readouterr().out
    assert main(["logs", "nope", "--address", cluster.dashboard_url]) == 2
    assert "nope: no such job" in capsys.readouterr().err

    # the shell script is the same implementation
    status = subprocess.run(
        [
            str(REPO / "cluster" / "local.sh"),
            "status",
            "--state-dir",
            str(cluster.state_dir),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["running"] and report["dashboard_url"] == cluster.dashboard_url
    alive = {n["node_id"] for n in report["nodes"] if n["state"] == "ALIVE"}
    assert alive == set(by_node)


def small_distill_config(path: Path, store: Path) -> Path:
    """A distillation run small enough for the 2 one-CPU worker nodes of the local cluster.

    Each DDP worker reserves 1 CPU, so the 2 teacher workers cannot share a node; labels go
    through the label cache because stream mode's replicas would need CPUs of their own.
    """
    tiny = {"schedule": {"epochs": 1, "warmup_epochs": 0}}
    cfg = {
        "data": {"dataset": str(store), "horizon": 3, "batch_size": 16, "eval_batch_size": 64},
        "teacher": {
            "model": "stgnn",
            "kwargs": {
                "residual_channels": 4,
                "dilation_channels": 4,
                "skip_channels": 8,
                "end_channels": 8,
                "blocks": 1,
            },
            **tiny,
        },
        "student": {"model": "linear", **tiny},
        "serve": {"mode": "cache"},
        "evaluate": {"latency_batch_size": 8, "latency_repeats": 3, "forecast_sensors": 2},
        "cluster": {"num_workers": 2, "cpus_per_worker": 1, "max_failures": 0},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_submitted_distill_trains_the_teacher_on_two_nodes(
    local_ray_cluster: Any, tmp_path: Path
) -> None:
    cluster = local_ray_cluster
    storage = tmp_path / "storage"
    store = random_store(tmp_path / "tiny.zarr", steps=400, nodes=5, chunk_steps=64)
    config = small_distill_config(tmp_path / "small.yaml", store)
    done = cluster.stkd(
        "--storage", storage, "submit", "--address", cluster.dashboard_url,
        "--job-id", "distill-2n", "--", f"distill --config {config} --run-name two-nodes",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "SUCCEEDED" in done.stderr
    assert "Ray: the Ray cluster at" in done.stdout  # the job's driver joined the cluster

    run = storage / "runs" / "two-nodes"
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"teacher", "student_kd", "student_scratch"} <= set(metrics)
    assert len(metrics["teacher"]["mae_per_horizon"]) == 3

    # where the teacher's DDP ranks ran: one per worker node, none on the (0-CPU) head
    ranks = [
        json.loads(f.read_text()) for f in sorted((run / "teacher" / "workers").glob("*.json"))
    ]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["world_size"] == 2 for r in ranks)
    nodes = [r["node_id"] for r in ranks]
    assert len(set(nodes)) == 2, nodes
    assert set(nodes) == set(cluster.worker_node_ids.values())
    assert cluster.head_node_id not in nodes


@pytest.mark.long
def test_submitted_distill_with_an_s3_root_on_two_nodes(
    local_ray_cluster: Any, s3_server: Any, shared_data: Path, tmp_path: Path
) -> None:
    """The whole run's storage is a bucket: the nodes share nothing else (no common folder).

    The credentials and endpoint travel in the job's runtime environment (``stkd submit`` passes
    the standard variables), never on the entrypoint's command line.
    """
    cluster = local_ray_cluster
    bucket = s3_server.make_bucket()
    root = f"s3://{bucket}/root"
    los = shared_data / "los-loop"
    config = small_distill_config(tmp_path / "small.yaml", Path("los"))  # a dataset name
    command = (
        f"ingest {los / 'los_speed.csv'} --adjacency {los / 'los_adj.csv'} --name los "
        f"&& stkd distill --config {config} --run-name s3-two-nodes"
    )
    done = cluster.stkd(
        "--storage", root, "submit", "--address", cluster.dashboard_url,
        "--job-id", "distill-s3", "--", command,
        env=s3_server.env(),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "SUCCEEDED" in done.stderr
    secret = s3_server.env()["AWS_SECRET_ACCESS_KEY"]
    assert secret not in done.stdout + done.stderr  # neither logged nor echoed

    prefix = "root/runs/s3-two-nodes/"
    keys = s3_server.objects(bucket, prefix)
    assert prefix + "metrics.json" in keys and prefix + "report.html" in keys
    assert any(k.startswith(prefix + "labels/") for k in keys)  # the label cache too

    def get(key: str) -> Any:
        return json.loads(s3_server.client.get_object(Bucket=bucket, Key=key)["Body"].read())

    metrics = get(prefix + "metrics.json")
    assert {"teacher", "student_kd", "student_scratch"} <= set(metrics)
    assert metrics["dataset"]["nodes"] == 207
    ranks = [get(prefix + f"teacher/workers/rank-{r}.json") for r in (0, 1)]
    nodes = [r["node_id"] for r in ranks]
    assert set(nodes) == set(cluster.worker_node_ids.values()), nodes
    # nothing under a local storage root of the submitting side
    assert not (tmp_path / "storage").exists()
    listed = json.loads(cluster.stkd("jobs", "--address", cluster.dashboard_url, "--json").stdout)
    entry = next(j for j in listed if j["job_id"] == "distill-s3")
    assert secret not in json.dumps(entry["entrypoint"])


# Runs in its own process (a driver of the cluster, with the cluster's token auth): watches the
# run's teacher replicas, checks that the first one streaming refuses plaintext, SIGKILLs it and
# writes what it killed to argv[2].
KILLER = r"""
import json, os, signal, sys, time
import grpc, ray

ray.init(address=sys.argv[1])
deadline = time.monotonic() + 900
while time.monotonic() < deadline:
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if not str(entry["name"]).startswith("stkd-teacher-"):
            continue
        try:
            actor = ray.get_actor(entry["name"], namespace=entry["namespace"])
            info = ray.get(actor.info.remote(), timeout=10)
            endpoint = ray.get(actor.endpoint.remote(), timeout=10)
        except Exception:
            continue
        if info.active_streams < 1 or info.forward_windows < 1:
            continue
        with grpc.insecure_channel(endpoint.address) as channel:
            stub = channel.unary_unary("/stkd.v1.TeacherService/Describe")
            refusal = details = None
            try:
                stub(b"", timeout=3)
                plaintext = True
            except grpc.RpcError as e:
                plaintext = False
                refusal, details = e.code().name, e.details()
        os.kill(info.pid, signal.SIGKILL)  # mid-epoch: it is streaming
        record = {"name": info.name, "pid": info.pid, "address": endpoint.address,
                  "plaintext": plaintext, "refusal": refusal, "details": details}
        with open(sys.argv[2], "w") as f:
            json.dump(record, f)
        sys.exit(0)
    time.sleep(0.05)
sys.exit(1)
"""


@pytest.mark.long
def test_stream_distill_on_two_nodes_survives_a_killed_replica_bitwise(
    local_ray_cluster: Any, tmp_path: Path
) -> None:
    """``stkd distill`` in stream mode: one replica per worker node, TLS and a token generated by
    the run; a replica SIGKILLed while streaming is restarted by Ray, and the student's weights
    are bitwise those of an uninterrupted run from the same teacher."""
    import sys

    import torch

    from stkd_dist.checkpoint import list_checkpoints, load_checkpoint_state

    cluster = local_ray_cluster
    storage = tmp_path / "storage"
    store = random_store(tmp_path / "tiny.zarr", steps=400, nodes=5, chunk_steps=64)
    config = small_distill_config(tmp_path / "small.yaml", store)
    cfg = yaml.safe_load(config.read_text())
    cfg["student"]["schedule"] = {"epochs": 2, "warmup_epochs": 0}
    # the workers' CPUs go to the DDP ranks: replicas share them (0 CPUs), one on each worker
    # one window per batch and chunk: a rank's stream takes long enough to be killed in
    cfg["serve"] = {
        "mode": "stream",
        "replicas_per_node": 1,
        "cpus_per_replica": 0,
        "batch_size": 1,
        "micro_batch": 1,
    }
    config.write_text(yaml.safe_dump(cfg))
    env = {"RAY_AUTH_MODE": "token", "STKD_TOKEN": ""}
    victim_file = tmp_path / "killed.json"
    killer = subprocess.Popen(
        [sys.executable, "-c", KILLER, cluster.gcs_address, str(victim_file)],
        env={**os.environ, **env},
    )
    try:
        done = cluster.stkd(
            "--storage", storage, "distill", "--config", config, "--run-name", "fleet",
            "--address", cluster.gcs_address, env=env,
        )  # fmt: skip
    finally:
        if killer.poll() is None:
            killer.kill()
        killer.wait(30)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    run = storage / "runs" / "fleet"
    use = json.loads((run / "student_kd" / "label_use.json").read_text())
    replicas = use["replicas"]
    workers = set(cluster.worker_node_ids.values())
    assert {r["node_id"] for r in replicas} == workers  # one replica on each worker node
    assert all(r["secured"] for r in replicas)
    assert victim_file.exists(), "no replica was streaming: nothing was killed"
    victim = json.loads(victim_file.read_text())
    # TLS only: the replica, alive and streaming, ended the plaintext probe in the handshake
    assert not victim["plaintext"]
    assert_rpc_refused(StatusCode[victim["refusal"]], victim["details"], CLOSED_BY_SERVER)
    assert not victim["address"].startswith("127.")  # the node's address
    again = next(r for r in replicas if r["name"] == victim["name"])
    assert again["pid"] != victim["pid"]  # Ray started it again
    # the ranks' deliveries: every window once, resumed after the kill
    rank_files = sorted((run / "student_kd" / "labels").glob("epoch_*/rank_*.json"))
    records = [json.loads(f.read_text()) for f in rank_files]
    assert len(records) == 4
    assert all(t["requested"] == t["delivered"] for r in records for t in r["teachers"])
    assert sum(t["reconnects"] for r in records for t in r["teachers"]) >= 1

    # the same student from the same teacher, nothing killed
    ref = cluster.stkd(
        "--storage", storage, "train-student", "--config", config, "--run-name", "fleet-ref",
        "--teacher", "ray:2", "--checkpoint", "fleet", "--address", cluster.gcs_address, env=env,
    )  # fmt: skip
    assert ref.returncode == 0, ref.stdout[-4000:] + ref.stderr[-2000:]
    a = list_checkpoints(run / "student_kd")[-1]
    b = list_checkpoints(storage / "runs" / "fleet-ref" / "student_kd")[-1]
    assert a.epoch == b.epoch == 1
    wa, wb = (load_checkpoint_state(c.path)["model"] for c in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.long
def test_submitted_sweep_runs_every_trial_on_both_worker_nodes(
    local_ray_cluster: Any, tmp_path: Path
) -> None:
    """``sweep.trial_workers: 2`` on two 1-CPU worker nodes: each trial's Ray Train run puts one
    worker on each node, and the nodes share no path but the storage root."""
    from tests.pipeline.sweep_env import make_env

    cluster = local_ray_cluster
    storage = tmp_path / "storage"
    env = make_env(tmp_path / "env", run="sweep-2n", samples=2, max_epochs=2, trial_workers=2)
    config = tmp_path / "env" / "sweep.yaml"
    done = cluster.stkd(
        "--storage", storage, "submit", "--address", cluster.dashboard_url,
        "--job-id", "sweep-2n", "--", f"sweep --config {config} --checkpoint {env.teacher}",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "SUCCEEDED" in done.stderr

    summary = json.loads((storage / "runs" / "sweep-2n" / "sweep" / "summary.json").read_text())
    assert summary["trials"] == 2 and summary["errored"] == 0
    workers = set(cluster.worker_node_ids.values())
    for record in summary["trial_records"]:
        ranks = record["workers"]
        assert sorted(w["rank"] for w in ranks) == [0, 1]
        assert {w["node_id"] for w in ranks} == workers, record
    # the ranks on both nodes streamed from the sweep's teacher replica over gRPC, which
    # computed each distinct training window once for both trials
    labels = summary["labels"]
    assert labels["mode"] == "stream" and labels["replicas"] == 1
    assert labels["replica_forward_windows"] == summary["distinct_windows"]
    assert summary["teacher_windows_computed"] == summary["distinct_windows"]
