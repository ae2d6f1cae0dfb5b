"""Distilled student training on a real local Ray cluster (2 CPUs, gloo DDP, 2 workers) with soft
labels streamed from real ``stkd serve`` processes on 127.0.0.1, a label cache, Ray-actor replicas.

The data and models are tiny (a 400-step, 6-node store; LSTM teachers; the STID student) so each
run takes seconds; the Ray cluster is shared by the module.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import ray

from stkd_dist.checkpoint import (
    list_checkpoints,
    load_checkpoint_state,
    read_best,
)
from stkd_dist.cli import main
from stkd_dist.config import load_config
from stkd_dist.labels.teachers import TeacherSpec, parse_labels
from stkd_dist.serving.precompute import precompute_labels
from stkd_dist.serving.teacher import load_teacher, safe_version
from stkd_dist.storage import open_store
from stkd_dist.testing import kill_rank_after, last_weights
from stkd_dist.train.loop import build_reader
from stkd_dist.train.ray_session import read_history
from stkd_dist.train.student import StudentRequest, train_student
from tests.train.student_env import (
    EPOCHS,
    OPTIONS,
    Env,
    Server,
    assert_same_weights,
    config,
    deliveries,
    final_weights,
    signal_first_sender,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_killed_replica_cache_and_stream_give_identical_students(
    ray_local: None, env: Env, spawn: Callable[..., Server], tmp_path: Path
) -> None:
    root = tmp_path / "storage"
    # a batch of 512 never fills, so every teacher batch waits 150 ms: a rank's stream of an
    # epoch (about 10 chunks) takes over a second; the first replica to send labels is killed
    # as soon as its byte counter shows a sent chunk, mid-stream
    slow = ("--batch-size", "512", "--batch-wait-ms", "150", "--metrics-port", "0")
    a1, a2 = spawn(env.ckpt["a"], *slow), spawn(env.ckpt["a"], *slow)
    killed, thread = signal_first_sender((a1, a2), signal.SIGKILL)
    cfg = config(env, "killed")
    request = StudentRequest(
        teachers=(TeacherSpec("stream", f"{a1.address},{a2.address}"),), client=OPTIONS
    )
    lines: list[str] = []
    out = train_student(cfg, request, storage=root, echo=lines.append)
    thread.join(5)
    assert out.trained and out.epochs_done == EPOCHS
    assert len(killed) == 1, "no replica sent labels: nothing was killed"
    victim = killed[0]
    assert victim.proc.wait(10) == -signal.SIGKILL
    experiment = root / "runs" / "killed" / "student_kd"
    assert out.experiment == experiment
    records = deliveries(experiment, cfg)
    # the kill hit epoch 0 mid-stream: a rank lost its replica and resumed on the other one
    first = [t for rec in records[0] for t in rec["teachers"]]
    assert sum(t["reconnects"] for t in first) >= 1
    assert any(victim.address in t["endpoints"] and len(t["endpoints"]) == 2 for t in first)
    assert any(f"teacher {env.version['a']}" in line for line in lines)
    teachers = json.loads((experiment / "teachers.json").read_text())
    assert [t["version"] for t in teachers["teachers"]] == [env.version["a"]]
    best = read_best(experiment)
    assert best is not None and best["epoch"] in range(EPOCHS)

    # the same student without any failure: streamed from the surviving replica alone
    survivor = a2 if victim is a1 else a1
    calm_cfg = config(env, "calm")
    calm = train_student(
        calm_cfg,
        StudentRequest(teachers=(TeacherSpec("stream", survivor.address),), client=OPTIONS),
        storage=root,
        echo=lines.append,
    )
    calm_first = [t for rec in deliveries(calm.experiment, calm_cfg)[0] for t in rec["teachers"]]
    assert sum(t["reconnects"] for t in calm_first) == 0
    assert_same_weights(final_weights(experiment), final_weights(calm.experiment))
    history = [h["param_digests"] for h in read_history(experiment)]
    assert history == [h["param_digests"] for h in read_history(calm.experiment)]

    # the same labels from a precomputed cache: the same student again
    cache = tmp_path / "labels-a.zarr"
    precompute_labels(load_teacher(env.ckpt["a"], env.store), cache, ["train"])
    cached = train_student(
        config(env, "cached"),
        StudentRequest(teachers=(parse_labels(f"cache:{cache}"),)),
        storage=root,
        echo=lines.append,
    )
    assert_same_weights(final_weights(experiment), final_weights(cached.experiment))

    # a finished run is reported, not trained again
    again = train_student(cfg, request, storage=root, echo=lines.append)
    assert not again.trained and again.best.path == out.best.path
    assert any("is complete" in line for line in lines)


def test_no_distill_trains_the_baseline_without_a_teacher(
    ray_local: None, env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    root = tmp_path / "storage"
    monkeypatch.setenv("STKD_STORAGE", str(root))  # restored afterwards (main() exports it)
    args = ["--config", str(env.config), "--run-name", "base"]
    assert main(["--storage", str(root), "train-student", "--no-distill", *args]) == 0
    printed = capsys.readouterr().out
    experiment = root / "runs" / "base" / "student_scratch"
    assert "student 'base' (student_scratch): 2 epoch(s) (trained)" in printed
    assert [h["epoch"] for h in read_history(experiment)] == [0, 1]
    best = read_best(experiment)
    assert best is not None and str(experiment / best["checkpoint"]) in printed
    assert not (experiment / "teachers.json").exists() and not (experiment / "labels").exists()
    assert not (root / "runs" / "base" / "student_kd").exists()
    # a teacher and --no-distill contradict each other: one clear error, nothing trained
    code = main(
        ["--storage", str(root), "train-student", "--no-distill", "--teacher", "127.0.0.1:9", *args]
    )
    assert code == 2
    assert "stkd: error: --no-distill:" in capsys.readouterr().err


def test_ensemble_of_two_teacher_versions_with_ray_replicas(
    ray_local: None,
    env: Env,
    spawn: Callable[..., Server],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = tmp_path / "storage"
    monkeypatch.setenv("STKD_STORAGE", str(root))
    a = spawn(env.ckpt["a"])
    args = ["--config", str(env.config), "--run-name", "ens"]
    code = main(
        [
            "--storage", str(root), "train-student", *args,
            "--set", "distill.ensemble=mean",
            "--teacher", a.address,  # teacher A: a stkd serve process
            "--teacher", "ray:1", "--checkpoint", str(env.ckpt["b"]),  # B: a Ray actor replica
            "--label-chunk-bytes", "65536",
        ]
    )  # fmt: skip
    assert code == 0
    experiment = root / "runs" / "ens" / "student_kd"
    teachers = json.loads((experiment / "teachers.json").read_text())
    assert teachers["ensemble"] == "mean"
    assert [t["version"] for t in teachers["teachers"]] == [env.version["a"], env.version["b"]]
    assert [t["weight"] for t in teachers["teachers"]] == [0.5, 0.5]
    assert [t["val_mae"] for t in teachers["teachers"]] == [2.0, 4.0]  # from Describe
    records = deliveries(experiment, config(env, "ens"), teachers=2)
    for rec in records[0]:
        ta, tb = rec["teachers"]
        assert ta["endpoints"] == [a.address]
        assert tb["teacher"].startswith("ray:stkd-teacher-ens-") and len(tb["endpoints"]) == 1
        assert tb["endpoints"] != [a.address]
    # the ray:1 replica wrote through to the run's label cache: over both epochs its teacher
    # computed each training window once (counted on the data side: the split's windows)
    distinct = len(build_reader(config(env, "ens"), open_store(env.store)).windows("train"))
    use = json.loads((experiment / "label_use.json").read_text())
    assert use["distinct_windows"] == distinct
    assert use["teacher_windows_computed"] == distinct, use
    assert sum(r["forward_windows"] for r in use["replicas"]) == distinct
    cache = root / "runs" / "ens" / "labels" / f"{safe_version(env.version['b'])}.zarr"
    assert use["cache"] == str(cache) and cache.is_dir()
    # the replicas started for the run are gone with it
    names = [x["name"] for x in ray.util.list_named_actors(all_namespaces=True)]
    assert not [n for n in names if n.startswith("stkd-teacher-")]
    assert os.environ["STKD_STORAGE"] == str(root)


def forward_windows(server: Server) -> float:
    """Windows the server's teacher ran on (its Prometheus counter, read over HTTP)."""
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    values = [
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("stkd_serve_forward_windows_total ")
    ]
    assert len(values) == 1, text
    return values[0]


def test_two_replicas_sharing_a_write_through_cache_compute_each_window_once(
    ray_local: None, env: Env, spawn: Callable[..., Server], tmp_path: Path
) -> None:
    epochs = 3
    root, cache = tmp_path / "storage", tmp_path / "shared-labels.zarr"
    # small batches: each rank's epoch stream is many teacher batches, spread over both replicas
    flags = ("--cache", str(cache), "--write-through", "--metrics-port", "0", "--batch-size", "16")
    a1, a2 = spawn(env.ckpt["a"], *flags), spawn(env.ckpt["a"], *flags)
    overrides = [f"student.schedule.epochs={epochs}"]
    cfg = load_config(env.config, ["run.name=shared", *overrides])
    # one client per rank and epoch; each client starts at a random replica, so both serve
    out = train_student(
        cfg,
        StudentRequest(
            teachers=(TeacherSpec("stream", f"{a1.address},{a2.address}"),), client=OPTIONS
        ),
        storage=root,
        echo=lambda _: None,
    )
    assert out.trained and out.epochs_done == epochs
    # the data side: the distinct windows every epoch's shard plan deals out
    distinct = len(build_reader(cfg, open_store(env.store)).windows("train"))
    counts = [forward_windows(a1), forward_windows(a2)]
    assert sum(counts) == distinct, counts  # not epochs x distinct: each window computed once

    # the same student fed from a label cache precomputed by the teacher in this process
    precomputed = tmp_path / "precomputed.zarr"
    precompute_labels(load_teacher(env.ckpt["a"], env.store), precomputed, ["train"])
    cached = train_student(
        load_config(env.config, ["run.name=precomputed", *overrides]),
        StudentRequest(teachers=(parse_labels(f"cache:{precomputed}"),)),
        storage=root,
        echo=lambda _: None,
    )
    a, b = (list_checkpoints(e)[-1] for e in (out.experiment, cached.experiment))
    assert a.epoch == b.epoch == epochs - 1
    assert_same_weights(
        load_checkpoint_state(a.path)["model"], load_checkpoint_state(b.path)["model"]
    )


def test_a_stopped_replica_is_abandoned_within_seconds_and_used_again_after(
    ray_local: None, env: Env, spawn: Callable[..., Server], tmp_path: Path
) -> None:
    # slow batches (150 ms each) keep every rank's stream open for a few seconds, so the
    # replica stopped after its first label bytes is stopped in the middle of a stream
    slow = ("--batch-size", "512", "--batch-wait-ms", "150", "--metrics-port", "0")
    a1, a2 = spawn(env.ckpt["a"], *slow), spawn(env.ckpt["a"], *slow)
    # no TCP reset, no error: the process just stops answering
    stopped, thread = signal_first_sender((a1, a2), signal.SIGSTOP)
    cfg = config(env, "sigstop")
    request = StudentRequest(
        teachers=(TeacherSpec("stream", f"{a1.address},{a2.address}"),), client=OPTIONS
    )
    t0 = time.monotonic()
    try:
        out = train_student(cfg, request, storage=tmp_path / "storage", echo=lambda _: None)
        seconds = time.monotonic() - t0
    finally:
        thread.join(5)
        for server in stopped:
            server.proc.send_signal(signal.SIGCONT)
    assert len(stopped) == 1, "no replica sent labels: nothing was stopped"
    victim, survivor = stopped[0], (a2 if stopped[0] is a1 else a1)
    assert out.trained and out.epochs_done == EPOCHS
    records = deliveries(out.experiment, cfg)
    moved = [t for rec in records[0] for t in rec["teachers"] if victim.address in t["endpoints"]]
    assert moved and all(survivor.address in t["endpoints"] for t in moved), moved
    assert sum(t["reconnects"] for t in moved) >= 1
    # after SIGCONT the replica serves again: the same student, from it alone
    before = victim.bytes_sent()
    t0 = time.monotonic()
    again = train_student(
        config(env, "sigcont"),
        StudentRequest(teachers=(TeacherSpec("stream", victim.address),), client=OPTIONS),
        storage=tmp_path / "storage",
        echo=lambda _: None,
    )
    calm = time.monotonic() - t0
    assert again.trained and victim.bytes_sent() > before
    # the stopped replica cost seconds (keepalive pings and a 2 s connection timeout), not the
    # 20 s gRPC spends on every connection attempt to a silent host by default, nor the 300 s
    # call deadline of a stream left hanging on it
    assert seconds < calm + 30, (seconds, calm)
    assert_same_weights(final_weights(out.experiment), final_weights(again.experiment))


MID_EPOCH = ("checkpoint.every_steps=4", "cluster.max_failures=3")


@pytest.fixture(scope="module")
def label_cache(env: Env, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("cache") / "labels-a.zarr"
    precompute_labels(load_teacher(env.ckpt["a"], env.store), cache, ["train"])
    return cache


@pytest.fixture(scope="module")
def calm_student(ray_local: None, env: Env, label_cache: Path, tmp_path_factory) -> Path:
    """The student of teacher ``a`` (cached labels), trained without any failure."""
    root = tmp_path_factory.mktemp("calm")
    cfg = load_config(env.config, ["run.name=calm", *MID_EPOCH])
    request = StudentRequest(teachers=(parse_labels(f"cache:{label_cache}"),))
    out = train_student(cfg, request, storage=root, echo=lambda s: None)
    assert out.attempts == 0
    return out.experiment


@pytest.mark.parametrize(("labels", "victim"), [("stream", 1), ("cache", 0)])
def test_a_student_worker_killed_mid_epoch_resumes_at_its_step_bitwise(
    calm_student: Path,
    env: Env,
    label_cache: Path,
    spawn: Callable[..., Server],
    tmp_path: Path,
    labels: str,
    victim: int,
) -> None:
    if labels == "stream":
        teacher = TeacherSpec("stream", spawn(env.ckpt["a"]).address)
    else:
        teacher = parse_labels(f"cache:{label_cache}")
    root = tmp_path / "storage"
    cfg = load_config(env.config, ["run.name=killed", *MID_EPOCH])
    experiment = root / "runs" / "killed" / "student_kd"
    killed, thread = kill_rank_after(experiment, "epoch_0001_step_", victim, time.time())
    out = train_student(
        cfg, StudentRequest(teachers=(teacher,), client=OPTIONS), storage=root, echo=print
    )
    thread.join(5)
    assert killed, "no training worker was found to kill"
    assert out.epochs_done == EPOCHS and out.attempts >= 1
    status = json.loads((experiment / "workers" / f"rank-{victim}.json").read_text())
    assert status["resumed_after_epoch"] == 0 and status["resumed_at_step"] > 0
    assert_same_weights(last_weights(experiment), last_weights(calm_student))
    # the resumed epoch asked for the rest of each rank's sequence only, and got it once
    for rank in range(2):
        rec = json.loads((experiment / "labels" / "epoch_0001" / f"rank_{rank}.json").read_text())
        assert rec["start_window"] == status["resumed_at_step"] * cfg.data.batch_size
        for t in rec["teachers"]:
            assert t["requested"] == t["delivered"] == rec["plan_windows"]
    calm = {h["epoch"]: h for h in read_history(calm_student)}
    for h in read_history(experiment):
        assert h["train_loss"] == calm[h["epoch"]]["train_loss"]


@pytest.mark.long  # about a minute: a failed run (health checks notice the dead worker), a resumed one
def test_a_student_resumed_mid_epoch_on_fewer_workers_streams_the_rest_once(
    ray_local: None, env: Env, spawn: Callable[..., Server], tmp_path: Path
) -> None:
    # the first run: two workers and no recovery; rank 1 dies after epoch 1's first mid-epoch
    # checkpoint, so the run fails with the rest of epoch 1 to do
    root = tmp_path / "storage"
    experiment = root / "runs" / "shrunk" / "student_kd"
    first = spawn(env.ckpt["a"], "--metrics-port", "0")
    request = StudentRequest(teachers=(TeacherSpec("stream", first.address),), client=OPTIONS)
    two = load_config(
        env.config, ["run.name=shrunk", "checkpoint.every_steps=4", "cluster.max_failures=0"]
    )
    killed, thread = kill_rank_after(experiment, "epoch_0001_step_", 1, time.time())
    with pytest.raises(Exception, match=r"(?i)worker|actor|died"):
        train_student(two, request, storage=root, echo=lambda s: None)
    thread.join(5)
    assert killed
    # the steps of epoch 1 the two workers had done: the latest checkpoint Ray registered (a
    # later one may lie on disk, written while rank 1 died and never registered)
    snapshot = (experiment / "checkpoint_manager_snapshot.json").read_text()
    step = max(int(m) for m in re.findall(r"epoch_0001_step_(\d+)", snapshot))

    # the same run on one worker: it continues epoch 1 from that step, re-dealt to one rank
    server = spawn(env.ckpt["a"], "--metrics-port", "0")
    request = StudentRequest(teachers=(TeacherSpec("stream", server.address),), client=OPTIONS)
    one = load_config(
        env.config, ["run.name=shrunk", "checkpoint.every_steps=4", "cluster.num_workers=1"]
    )
    lines: list[str] = []
    out = train_student(one, request, storage=root, echo=lines.append)
    assert out.epochs_done == EPOCHS and out.trained
    # what it says is where Ray resumed, not a newer checkpoint Ray never registered
    assert any(f"at step {step} of epoch 2/{EPOCHS}" in line for line in lines), lines
    status = json.loads((experiment / "workers" / "rank-0.json").read_text())
    assert status["world_size"] == 1 and status["regroups"] == [[2, step]]

    # the server side: the new server streamed the windows the two ranks had not reached in
    # epoch 1, each once, and all of every later epoch (counted by the server, not the client)
    store = open_store(env.store)
    n = len(build_reader(two, store).windows("train"))
    batch = two.data.batch_size
    per_rank = [n // 2 + (r < n % 2) for r in range(2)]
    rest = sum(c - min(step * batch, c) for c in per_rank)
    assert server.windows_sent() == rest + n * (EPOCHS - 2)
    history = {h["epoch"]: h for h in read_history(experiment)}
    assert history[1]["samples"] == n and history[1]["world_size"] == 1
