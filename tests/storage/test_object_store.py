"""An object-store storage root, end to end, against a real S3-compatible HTTP server.

The server (``s3_server`` in tests/conftest.py) runs in its own process with IAM authentication on;
the commands under test only see the standard AWS variables and ``STKD_STORAGE=s3://…``. Every
check reads the bucket through its own S3 client (boto3), not through the code under test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

pytestmark = [pytest.mark.integration]

ENTRIES = ("teacher", "student_kd", "student_scratch", "last_value", "historical_average")


def stkd(
    *args: object, env: dict[str, str], cwd: Path, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, **env, "COLUMNS": "200"}
    full.pop("RAY_ADDRESS", None)  # the command's own local Ray cluster
    return subprocess.run(
        [sys.executable, "-m", "stkd_dist.cli", *map(str, args)],
        env=full,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ingest_los(
    shared_data: Path, env: dict[str, str], cwd: Path
) -> subprocess.CompletedProcess[str]:
    los = shared_data / "los-loop"
    return stkd(
        "ingest", los / "los_speed.csv", "--adjacency", los / "los_adj.csv",
        "--name", "los", "--freq", "5min", env=env, cwd=cwd,
    )  # fmt: skip


def distill_config(path: Path) -> Path:
    tiny = {"epochs": 1, "warmup_epochs": 0}
    cfg = {
        "run": {"seed": 0},
        "data": {"dataset": "los", "horizon": 6, "batch_size": 32, "eval_batch_size": 128},
        "teacher": {
            "model": "stgnn",
            "kwargs": {
                "residual_channels": 8,
                "dilation_channels": 8,
                "skip_channels": 16,
                "end_channels": 16,
                "blocks": 1,
            },
            "schedule": tiny,
        },
        "student": {
            "model": "mlp",
            "kwargs": {"embed_dim": 8, "node_dim": 4, "tod_dim": 4, "dow_dim": 4, "num_layers": 1},
            "schedule": tiny,
        },
        "serve": {"mode": "stream", "replicas": 1, "cpus_per_replica": 0.5},
        "evaluate": {"latency_batch_size": 16, "latency_repeats": 3, "forecast_sensors": 3},
        "cluster": {"num_workers": 2, "cpus_per_worker": 1},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def local_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.slow
@pytest.mark.long
def test_ingest_info_xarray_and_distill_with_an_s3_root(
    s3_server: Any, shared_data: Path, tmp_path: Path
) -> None:
    bucket = s3_server.make_bucket()
    env = {**s3_server.env(), "STKD_STORAGE": f"s3://{bucket}/root"}
    cwd = tmp_path / "work"
    cwd.mkdir()
    config = distill_config(tmp_path / "los.yaml")  # outside the working directory

    done = ingest_los(shared_data, env, cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"s3://{bucket}/root/datasets/los.zarr" in done.stdout
    keys = s3_server.objects(bucket, "root/datasets/")
    assert "root/datasets/los.zarr/zarr.json" in keys
    # the temporary prefix the store was written under is gone
    assert all(k.startswith("root/datasets/los.zarr/") for k in keys), keys

    info = stkd("info", "los", "--json", env=env, cwd=cwd)
    assert info.returncode == 0, info.stderr[-3000:]
    summary = json.loads(info.stdout)
    assert (summary["steps"], summary["nodes"]) == (2016, 207)

    # anyone's xarray reads the store straight from the bucket, values equal to the source CSV
    import fsspec
    import xarray as xr

    source = pd.read_csv(shared_data / "los-loop" / "los_speed.csv")
    opts = {"endpoint_url": s3_server.endpoint, "key": env["AWS_ACCESS_KEY_ID"], "secret": env["AWS_SECRET_ACCESS_KEY"]}  # fmt: skip
    mapper = fsspec.get_mapper(f"s3://{bucket}/root/datasets/los.zarr", **opts)
    ds = xr.open_zarr(mapper)
    np.testing.assert_array_equal(ds["values"].values[:, :, 0], source.to_numpy(dtype=np.float32))
    assert list(ds["node"].values) == list(source.columns)

    t0 = time.perf_counter()
    run = stkd("distill", "--config", config, "--run-name", "s3run", env=env, cwd=cwd, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    seconds = time.perf_counter() - t0

    prefix = "root/runs/s3run/"
    keys = s3_server.objects(bucket, prefix)
    for name in ("metrics.json", "report.html", "report.md", "stages.json", "config.yaml"):
        assert prefix + name in keys, (name, keys)
    for name in ("teacher", "student_kd", "student_scratch"):
        assert prefix + f"{name}/best.json" in keys
        assert prefix + f"{name}/epoch_0000/meta.json" in keys
        assert prefix + f"{name}/workers/rank-1.json" in keys  # 2 DDP workers
    assert any(k.startswith(prefix + "logs/distill-") for k in keys)
    metrics = json.loads(s3_server.client.get_object(Bucket=bucket, Key=prefix + "metrics.json")["Body"].read())  # fmt: skip
    assert set(ENTRIES) <= set(metrics)
    assert metrics["dataset"]["nodes"] == 207
    stages = json.loads(s3_server.client.get_object(Bucket=bucket, Key=prefix + "stages.json")["Body"].read())  # fmt: skip
    assert set(stages["stages"]) >= {"teacher", "student_kd", "evaluate", "report"}
    # nothing written to the local disk: not the working directory, not a local storage root
    assert local_files(cwd) == []
    assert not (cwd / "storage").exists()
    print(f"distill with an S3 root: {seconds:.0f} s")

    # a re-run reads the bucket's bookkeeping and skips every completed stage
    again = stkd("distill", "--config", config, "--run-name", "s3run", env=env, cwd=cwd)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "stages run: none" in again.stdout or "reused" in again.stdout
    assert local_files(cwd) == []


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = [ln for ln in done.stderr.strip().splitlines() if ln.startswith("stkd: error:")]
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_a_missing_bucket_is_one_clear_error(
    s3_server: Any, shared_data: Path, tmp_path: Path
) -> None:
    env = {**s3_server.env(), "STKD_STORAGE": "s3://no-such-bucket-here/root"}
    line = one_error_line(ingest_los(shared_data, env, tmp_path))
    assert "s3://no-such-bucket-here/root/datasets/los.zarr" in line
    assert "the bucket does not exist" in line
    line = one_error_line(stkd("info", "s3://no-such-bucket-here/x.zarr", env=env, cwd=tmp_path))
    assert "s3://no-such-bucket-here/x.zarr" in line and "bucket does not exist" in line


def test_wrong_credentials_are_one_clear_error(
    s3_server: Any, shared_data: Path, tmp_path: Path
) -> None:
    bucket = s3_server.make_bucket()
    good = {**s3_server.env(), "STKD_STORAGE": f"s3://{bucket}/root"}
    assert ingest_los(shared_data, good, tmp_path).returncode == 0
    bad = {**good, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    line = one_error_line(stkd("info", "los", env=bad, cwd=tmp_path))
    assert f"s3://{bucket}/root" in line and "access denied" in line
    wrong_key = {**good, "AWS_ACCESS_KEY_ID": "AKIANOSUCHKEY0000000"}
    line = one_error_line(ingest_los(shared_data, {**wrong_key, "STKD_STORAGE": f"s3://{bucket}/other"}, tmp_path))  # fmt: skip
    assert "access denied" in line
    # nothing was written with the wrong credentials
    assert s3_server.objects(bucket, "other/") == []


def test_a_killed_ingest_leaves_nothing_a_reader_takes_for_a_store(
    s3_server: Any, tmp_path: Path
) -> None:
    bucket = s3_server.make_bucket()
    env = {**s3_server.env(), "STKD_STORAGE": f"s3://{bucket}/root"}
    source = tmp_path / "big.npy"  # [time, node, channel], ~70 MiB: many chunks to upload
    rng = np.random.default_rng(0)
    np.save(source, rng.normal(50, 10, size=(60_000, 300, 1)).astype(np.float32))
    full = {**os.environ, **env}
    full.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "stkd_dist.cli", "ingest", str(source), "--name", "big",
         "--chunk-steps", "512"],
        env=full, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        # wait for the observable event: chunks landing under the hidden temporary prefix
        deadline = time.monotonic() + 180
        partial: list[str] = []
        while time.monotonic() < deadline:
            partial = [k for k in s3_server.objects(bucket, "root/datasets/") if "/values/c/" in k]
            if partial or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert proc.poll() is None, "ingest finished before it could be killed: make it larger"
        assert partial, "no chunk was written within 180 s"
        os.killpg(proc.pid, signal.SIGKILL)  # the ingest and anything it started
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    keys = s3_server.objects(bucket, "root/datasets/")
    assert keys and all(k.startswith("root/datasets/.big.zarr.tmp-") for k in keys), keys[:5]
    assert s3_server.objects(bucket, "root/datasets/big.zarr/") == []
    line = one_error_line(stkd("info", "big", env=env, cwd=tmp_path))
    assert "no dataset named 'big'" in line and f"s3://{bucket}/root/datasets/big.zarr" in line
    # the same command again succeeds: the leftover temporary prefix is not in its way
    again = stkd("ingest", source, "--name", "big", "--chunk-steps", 512, env=env, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "root/datasets/big.zarr/zarr.json" in s3_server.objects(
        bucket, "root/datasets/big.zarr/"
    )


def test_a_store_interrupted_while_moved_into_place_is_refused(
    s3_server: Any, shared_data: Path, tmp_path: Path
) -> None:
    """The last step on an object store copies the objects, root ``zarr.json`` last: a copy cut
    short leaves objects without it, which readers refuse as incomplete."""
    bucket = s3_server.make_bucket()
    env = {**s3_server.env(), "STKD_STORAGE": f"s3://{bucket}/root"}
    assert ingest_los(shared_data, env, tmp_path).returncode == 0
    s3_server.client.delete_object(Bucket=bucket, Key="root/datasets/los.zarr/zarr.json")
    line = one_error_line(stkd("info", "los", env=env, cwd=tmp_path))
    assert "incomplete store" in line and f"s3://{bucket}/root/datasets/los.zarr" in line


@pytest.mark.slow
def test_sweep_with_an_s3_root(s3_env: Any, tmp_path: Path) -> None:
    """Ray Tune keeps its experiment in the bucket (pyarrow filesystem for the same endpoint);
    the label cache, leaderboard, summary and exported best student land there too."""
    import ray

    from stkd_dist.checkpoint import load_forecaster
    from stkd_dist.pipeline.sweep import run_sweep
    from stkd_dist.pipeline.ui import LinesUI
    from tests.pipeline.sweep_env import make_env

    bucket = s3_env.make_bucket()
    env = make_env(tmp_path / "local", samples=2, max_epochs=2)
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        outcome = run_sweep(
            env.config,
            checkpoint=str(env.teacher),
            storage=f"s3://{bucket}/root",
            ui=LinesUI(),
        )
    finally:
        ray.shutdown()
    prefix = "root/runs/sweep-test/"
    keys = s3_env.objects(bucket, prefix)
    for name in ("leaderboard.csv", "summary.json", "best/meta.json", "best/model.pt", "tune/tuner.pkl"):  # fmt: skip
        assert prefix + "sweep/" + name in keys, name
    assert any(k.startswith(prefix + "labels/") for k in keys)
    assert any("/trial_" in k and k.endswith("/meta.json") for k in keys)  # trial checkpoints
    summary = json.loads(s3_env.client.get_object(Bucket=bucket, Key=prefix + "sweep/summary.json")["Body"].read())  # fmt: skip
    assert summary["evaluated"] == 2
    # the exported best student loads straight from the bucket
    model, _ = load_forecaster(f"s3://{bucket}/{prefix}sweep/best", role="student")
    assert model.num_params() == summary["best"]["params"]
    assert str(outcome.layout.root).startswith("s3://")


def test_append_in_a_bucket_equals_one_ingest_and_a_bad_one_changes_no_object(
    s3_env: Any, tmp_path: Path
) -> None:
    """``stkd ingest --append`` on an ``s3://`` store: the grown store holds what one ingest
    of the whole series holds (fingerprint included); a refused append leaves every object as
    it was (keys and ETags, listed by boto3)."""
    from stkd_dist.storage import open_store

    bucket = s3_env.make_bucket()
    env = {**s3_env.env(), "STKD_STORAGE": f"s3://{bucket}/root"}
    rng = np.random.default_rng(5)
    x = rng.uniform(1, 100, size=(1500, 4, 1)).astype(np.float32)
    for name, part in (("first", x[:900]), ("rest", x[900:]), ("whole", x)):
        np.save(tmp_path / f"{name}.npy", part)
    for name in ("first", "whole"):
        done = stkd("ingest", tmp_path / f"{name}.npy", "--name", name, "--chunk-steps", "128",
                    env=env, cwd=tmp_path)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]

    def etags() -> dict[str, str]:
        pages = s3_env.client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix="root/datasets/first.zarr/"
        )
        return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", [])}

    before = etags()
    bad = stkd("ingest", tmp_path / "rest.npy", "--append", "--name", "first",
               "--start", "2000-01-01 00:00", env=env, cwd=tmp_path)  # fmt: skip
    line = one_error_line(bad)
    assert "rest.npy" in line and "600 step(s) overlap" in line, line
    assert etags() == before

    done = stkd("ingest", tmp_path / "rest.npy", "--append", "--name", "first",
                env=env, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "appended 600 steps" in done.stdout and "900 -> 1500" in done.stdout
    grown = open_store(f"s3://{bucket}/root/datasets/first.zarr")
    whole = open_store(f"s3://{bucket}/root/datasets/whole.zarr")
    assert grown.fingerprint == whole.fingerprint
    assert [h["steps"] for h in grown.attrs["fingerprint_history"]] == [900]
    va, ma = grown.read(0, 1500)
    vb, mb = whole.read(0, 1500)
    np.testing.assert_array_equal(ma, mb)
    np.testing.assert_array_equal(va, vb)
