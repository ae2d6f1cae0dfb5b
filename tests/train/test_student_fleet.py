"""A student's teacher fleet on a real local Ray cluster: autoscaling from the students' label
wait, and admission when there are more ranks than one replica admits."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from stkd_dist.config import load_config
from stkd_dist.config.pipeline import AutoscaleSection
from stkd_dist.labels.replicas import ReplicaCompute
from stkd_dist.labels.started import ReplicaPlan
from stkd_dist.labels.teachers import TeacherSpec
from stkd_dist.serving.client import ClientOptions
from stkd_dist.serving.server import ServerConfig
from stkd_dist.train.student import StudentRequest, train_student
from tests.train.student_env import OPTIONS, WORLD, Env, Server, save_teacher

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _records(experiment: Path, epoch: int) -> list[dict]:
    return [
        json.loads((experiment / "labels" / f"epoch_{epoch:04d}" / f"rank_{r}.json").read_text())
        for r in range(WORLD)
    ]


def _wait_s(experiment: Path, epoch: int) -> float:
    """The label wait of the slowest rank in ``epoch`` (the ranks' delivery records): in DDP
    lockstep the group waits for it, the others wait in the gradient all-reduce instead."""
    return max(sum(t["wait_s"] for t in rec["teachers"]) for rec in _records(experiment, epoch))


def _epoch_times(experiment: Path) -> list[float]:
    lines = (experiment / "history.jsonl").read_text().splitlines()
    return [m["epoch_time_s"] for m in map(json.loads, lines) if m.get("rank", 0) == 0]


@pytest.mark.long  # about 90 s: a student run long enough for the autoscaler to act
def test_a_slow_teacher_scales_out_under_the_students_backlog(
    ray_local: None, env: Env, tmp_path: Path
) -> None:
    epochs = 3
    # a deliberately slow teacher: a wide LSTM on one thread, about 50 ms a window; no label
    # cache and no recent-batch memory, so every epoch asks the teacher again
    slow = save_teacher(tmp_path, env.store, "slow", seed=3, val_mae=1.0, hidden=1024)
    cfg = load_config(env.config, ["run.name=autoscale", f"student.schedule.epochs={epochs}"])
    plan = ReplicaPlan(
        config=ServerConfig(batch_size=32, recent_bytes=0),
        compute=ReplicaCompute(threads=1),
        num_cpus=0.0,
        secure=True,
        autoscale=AutoscaleSection(min=1, max=2, target_wait=0.3, interval_s=1.0, idle_s=600),
    )
    request = StudentRequest(
        teachers=(TeacherSpec("replicas", replicas=1),),
        checkpoint=str(slow.path),
        # whole batches per chunk: a replica serving one rank fills its batches (small chunks
        # would leave them mostly padding, which costs the same as labels)
        client=ClientOptions(),
        replicas=plan,
        write_through=False,
    )
    lines: list[str] = []
    out = train_student(cfg, request, storage=tmp_path / "storage", echo=lines.append)
    assert out.trained and out.epochs_done == epochs
    use = json.loads((out.experiment / "label_use.json").read_text())
    timeline = use["replicas_timeline"]
    assert timeline[0]["action"] == "start" and timeline[0]["replicas"] == 1
    adds = [d for d in timeline if d["action"] == "add"]
    assert adds and adds[0]["replicas"] == 2 and adds[0]["wait_share"] > 0.3, timeline
    # the added replica was found while streaming and got streams, without any failure
    served = {r["name"]: r["streams_served"] for r in use["replicas"]}
    assert len(served) == 2 and all(n >= 1 for n in served.values()), served
    records = [_records(out.experiment, e) for e in range(epochs)]
    assert sum(t["reconnects"] for recs in records for rec in recs for t in rec["teachers"]) == 0
    last = [t["endpoints"] for rec in records[-1] for t in rec["teachers"]]
    assert len({e for eps in last for e in eps}) == 2, last  # the ranks on different replicas
    # and the students waited less once there were two
    first_wait, last_wait = _wait_s(out.experiment, 0), _wait_s(out.experiment, epochs - 1)
    assert last_wait < 0.8 * first_wait, (first_wait, last_wait, timeline)
    times = _epoch_times(out.experiment)
    assert times[-1] < 0.9 * times[0], times


def _served_streams(server: Server) -> tuple[float, float]:
    """(streams admitted, streams refused as full) of a ``stkd serve`` (its metrics)."""
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    total = refused = 0.0
    for line in text.splitlines():
        if line.startswith("stkd_serve_streams_total "):
            total = float(line.split()[-1])
        if line.startswith('stkd_serve_stream_errors_total{code="RESOURCE_EXHAUSTED"}'):
            refused = float(line.split()[-1])
    return total, refused


def test_more_ranks_than_one_replica_admits_finish_without_an_error(
    ray_local: None, env: Env, spawn: Callable[..., Server], tmp_path: Path
) -> None:
    # each replica admits one stream; the two ranks stream at the same time
    flags = ("--max-streams", "1", "--metrics-port", "0")
    a1, a2 = spawn(env.ckpt["a"], *flags), spawn(env.ckpt["a"], *flags)
    cfg = load_config(env.config, ["run.name=admission"])
    request = StudentRequest(
        teachers=(TeacherSpec("stream", f"{a1.address},{a2.address}"),), client=OPTIONS
    )
    out = train_student(cfg, request, storage=tmp_path / "storage", echo=lambda _: None)
    assert out.trained
    for epoch in range(cfg.student.schedule.epochs):
        teachers = [t for rec in _records(out.experiment, epoch) for t in rec["teachers"]]
        assert all(t["requested"] == t["delivered"] for t in teachers)
        assert sum(t["reconnects"] for t in teachers) == 0
        # one rank on each replica: the full one was never the only choice
        assert sorted(e for t in teachers for e in t["endpoints"]) == sorted(
            [a1.address, a2.address]
        )
