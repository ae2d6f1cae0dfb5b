"""``stkd distill`` end to end, in real processes, on a small store.

One module-scoped run trains a tiny teacher with 2 DDP workers on a local Ray cluster (started by
the command itself), streams soft labels from 2 teacher replicas (Ray actors) to 2 student
workers, trains the baseline student, evaluates and writes the report. The tests then read its run
directory and re-run the command to check that completed stages are skipped.

Some tests change what the run left (they delete outputs, rewrite the store, run the command
again): each test therefore gets the storage and the store exactly as the first run left them,
restored from a copy made right after it, and no test depends on which ran before it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

from stkd_dist.checkpoint import list_checkpoints, load_forecaster
from stkd_dist.config import load_config, read_config
from stkd_dist.storage import open_store

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RUN = "e2e"
HORIZON = 6  # not the default 12: the per-horizon lists must follow the config
ENTRIES = ("teacher", "student_kd", "student_scratch", "last_value", "historical_average")
MODELS = ENTRIES[:3]
METRIC_KEYS = {"mae", "rmse", "mape", "mae_per_horizon", "rmse_per_horizon", "mape_per_horizon"}
TRAINING = ("teacher", "student_kd", "student_scratch")


@dataclass(frozen=True)
class Run:
    root: Path
    storage: Path
    config: Path
    store: Path
    first: subprocess.CompletedProcess[str]
    seconds: float
    saved: Path  # copies of ``storage`` and ``store`` as the first run left them

    @property
    def run_dir(self) -> Path:
        return self.storage / "runs" / RUN

    def restore(self) -> None:
        """Put back the storage and the store as the first run left them (same paths: stage
        keys digest the config, which names the store's path)."""
        for live in (self.storage, self.store):
            shutil.rmtree(live, ignore_errors=True)
            shutil.copytree(self.saved / live.name, live, symlinks=True)


def stkd(storage: Path, *args: str, timeout: float = 420) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "STKD_STORAGE": str(storage), "COLUMNS": "200"}
    env.pop("RAY_ADDRESS", None)  # always the command's own local cluster
    return subprocess.run(
        [sys.executable, "-m", "stkd_dist.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def write_config(path: Path, store: Path) -> Path:
    cfg = {
        "run": {"seed": 0},
        "data": {
            "dataset": str(store),
            "horizon": HORIZON,
            "batch_size": 16,
            "eval_batch_size": 64,
        },
        "teacher": {
            "model": "stgnn",
            "kwargs": {
                "residual_channels": 8,
                "dilation_channels": 8,
                "skip_channels": 16,
                "end_channels": 16,
                "blocks": 1,
            },
            "schedule": {"epochs": 2, "warmup_epochs": 1},
        },
        "student": {
            "model": "mlp",
            "kwargs": {"embed_dim": 8, "node_dim": 4, "tod_dim": 4, "dow_dim": 4, "num_layers": 1},
            "schedule": {"epochs": 2, "warmup_epochs": 1},
        },
        "serve": {"mode": "stream", "replicas": 2, "cpus_per_replica": 0.5},
        "evaluate": {"latency_batch_size": 16, "latency_repeats": 5, "forecast_sensors": 3},
        "cluster": {"num_workers": 2, "cpus_per_worker": 1},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The expensive artefact, made once for the module: the first ``stkd distill`` run, and a
    copy of what it left."""
    from tests.conftest import random_store

    root = tmp_path_factory.mktemp("distill")
    store = random_store(root / "tiny.zarr", steps=600, nodes=6, chunk_steps=64)
    config = write_config(root / "tiny.yaml", store)
    storage = root / "storage"
    t0 = time.perf_counter()
    first = stkd(storage, "distill", "--config", str(config), "--run-name", RUN)
    seconds = time.perf_counter() - t0
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    saved = root / "saved"
    for path in (storage, store):
        shutil.copytree(path, saved / path.name, symlinks=True)
    return Run(root, storage, config, store, first, seconds, saved)


@pytest.fixture
def run(first_run: Run) -> Run:
    """The first run, its storage and store as it left them, whatever earlier tests did."""
    first_run.restore()
    return first_run


def test_metrics_json_has_every_model_and_baseline(run: Run) -> None:
    metrics = json.loads((run.run_dir / "metrics.json").read_text())
    store = open_store(run.store)
    assert metrics["dataset"] == {
        "name": store.name,
        "fingerprint": store.fingerprint,
        "nodes": 6,
        "steps": 600,
    }
    for name in ENTRIES:
        entry = metrics[name]
        assert set(entry) >= METRIC_KEYS, name
        for key in ("mae_per_horizon", "rmse_per_horizon", "mape_per_horizon"):
            assert len(entry[key]) == HORIZON, (name, key)
        assert len(entry["mae_per_node"]) == 6
        assert entry["mae"] > 0 and entry["rmse"] >= entry["mae"]
        # the overall MAE is the count-weighted mean of the per-step MAEs
        assert min(entry["mae_per_horizon"]) <= entry["mae"] <= max(entry["mae_per_horizon"])
    for name in MODELS:
        entry = metrics[name]
        model, _ = load_forecaster(run.run_dir / name, role=name)
        assert entry["params"] == model.num_params() > 0
        assert entry["latency_ms"] > 0 and entry["latency_batch_size"] == 16
        assert entry["latency_threads"] == 1
    for name in ENTRIES[3:]:
        assert "params" not in metrics[name] and "latency_ms" not in metrics[name]
    # the two students have the same architecture
    assert metrics["student_kd"]["params"] == metrics["student_scratch"]["params"]
    # headroom: the best validation MAEs of the teacher and the scratch student, as their
    # training histories logged them epoch by epoch, and said in one line
    best = {}
    for name in ("teacher", "student_scratch"):
        lines = (run.run_dir / name / "history.jsonl").read_text().splitlines()
        best[name] = min(json.loads(line)["val_mae"] for line in lines if line.strip())
    headroom = metrics["headroom"]
    assert headroom["validation_mae"] == pytest.approx(best, rel=1e-12)
    gap = (best["student_scratch"] - best["teacher"]) / best["student_scratch"]
    assert headroom["relative_gap"] == pytest.approx(gap) and headroom["worth_distilling"] == (
        gap >= 0.02
    )
    assert headroom["message"] in run.first.stdout


def test_run_directory_holds_config_checkpoints_report(run: Run) -> None:
    d = run.run_dir
    resolved = read_config(d / "config.yaml")
    assert resolved == load_config(str(run.config), [f"run.name={RUN}"])
    for name in TRAINING:
        best = json.loads((d / name / "best.json").read_text())
        assert (d / name / best["checkpoint"] / "meta.json").is_file()
        assert len(list_checkpoints(d / name)) == 2  # one per epoch, both kept (keep_best=2)
    history = json.loads((d / "history.json").read_text())
    assert set(history) == set(TRAINING)
    for name in TRAINING:
        assert [h["epoch"] for h in history[name]] == [0, 1]
        assert all(h["val_mae"] > 0 and h["train_loss"] > 0 for h in history[name])
    with np.load(d / "forecasts.npz") as f:
        assert f["truth"].shape == f["pred_teacher"].shape == (f["time"].shape[0], 3)
        assert {f"pred_{m}" for m in ENTRIES} <= set(f.files)
    md = (d / "report.md").read_text()
    assert "student (distilled)" in md and "historical average" in md
    assert (d / "report.html").read_text().startswith("<!doctype html>")
    stages = json.loads((d / "stages.json").read_text())["stages"]
    assert set(stages) == {
        "teacher", "student_kd", "student_scratch", "evaluate", "statistics", "report"
    }  # fmt: skip
    assert list((d / "logs").glob("distill-*.log"))
    # one progress line per epoch of each training (read from the runs' history files)
    assert run.first.stdout.count("epoch   2/2  train_loss") == 3
    # stdout ends with the summary and the report's path
    assert "student (distilled)" in run.first.stdout
    assert f"report: {d / 'report.html'}" in run.first.stdout


def test_student_streamed_its_labels_from_teacher_replicas(run: Run) -> None:
    d = run.run_dir / "student_kd"
    teachers = json.loads((d / "teachers.json").read_text())["teachers"]
    assert len(teachers) == 1 and teachers[0]["kind"] == "stream"
    assert teachers[0]["location"].startswith("ray:")  # replicas found as Ray actors
    teacher_best = json.loads((run.run_dir / "teacher" / "best.json").read_text())
    assert teachers[0]["version"] == teacher_best["version"]
    assert "2 teacher replica(s)" in run.first.stdout
    train = load_config(str(run.config)).data
    from stkd_dist.data.windows import split_windows

    n_train = len(split_windows(600, train.window(), train.splits(), "train"))
    for epoch in (0, 1):
        records = [
            json.loads((d / "labels" / f"epoch_{epoch:04d}" / f"rank_{r}.json").read_text())
            for r in (0, 1)
        ]
        delivered = [rec["teachers"][0]["delivered"] for rec in records]
        # each rank got exactly its own shard; together every training window once
        assert delivered == [rec["plan_windows"] for rec in records]
        assert sum(delivered) == n_train
        for rec in records:
            # serve.secure (the default): the replicas bind the node's address, not loopback
            assert not any(ep.startswith("127.") for ep in rec["teachers"][0]["endpoints"])
    use = json.loads((d / "label_use.json").read_text())
    assert len(use["replicas"]) == 2 and all(r["secured"] for r in use["replicas"])
    # the 2 replicas wrote through to the run's label cache: over 2 epochs of 2 ranks the
    # teacher computed each training window once (counted from the split, on the data side)
    labels = json.loads((run.run_dir / "metrics.json").read_text())["labels"]
    assert labels["mode"] == "stream"
    assert labels["distinct_windows"] == n_train
    assert labels["teacher_windows_computed"] == n_train, labels
    assert (run.run_dir / "labels" / f"{teachers[0]['version']}.zarr").is_dir()


def test_label_cache_is_filled_once_and_reused(run: Run, tmp_path: Path) -> None:
    from stkd_dist.pipeline.stages import ensure_label_cache

    best = run.run_dir / "teacher"
    dest = tmp_path / "labels.zarr"
    seen: list[int] = []
    first = ensure_label_cache(
        best, run.store, dest, ("train",), batch_size=32, on_start=seen.append
    )
    train = load_config(str(run.config)).data
    from stkd_dist.data.windows import split_windows

    n_train = len(split_windows(600, train.window(), train.splits(), "train"))
    assert first.computed and first.windows == {"train": n_train}
    assert first.forward_windows == n_train == seen[0]
    again = ensure_label_cache(best, run.store, dest, ("train",), batch_size=32)
    assert not again.computed and again.forward_windows == n_train


def test_rerun_skips_completed_stages(run: Run) -> None:
    d = run.run_dir
    before = (d / "stages.json").read_text()
    checkpoints = {name: sorted(p.name for p in (d / name).glob("epoch_*")) for name in TRAINING}
    history_lines = {name: (d / name / "history.jsonl").read_text() for name in TRAINING}
    t0 = time.perf_counter()
    again = stkd(run.storage, "distill", "--config", str(run.config), "--run-name", RUN)
    seconds = time.perf_counter() - t0
    assert again.returncode == 0, again.stderr[-3000:]
    for stage in ("teacher", "student_kd", "student_scratch", "evaluate", "report"):
        assert f"{stage} (skipped: already complete)" in again.stdout
    assert "stages run: none" in again.stdout
    assert "Ray:" not in again.stdout  # no cluster started: nothing to train
    assert (d / "stages.json").read_text() == before
    for name in TRAINING:
        assert sorted(p.name for p in (d / name).glob("epoch_*")) == checkpoints[name]
        assert (d / name / "history.jsonl").read_text() == history_lines[name]
    assert seconds < run.seconds / 2


def test_stage_with_missing_outputs_is_redone_alone(run: Run) -> None:
    d = run.run_dir
    metrics = json.loads((d / "metrics.json").read_text())
    (d / "metrics.json").unlink()
    (d / "report.html").unlink()
    again = stkd(run.storage, "distill", "--config", str(run.config), "--run-name", RUN)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "evaluate (output missing: metrics.json)" in again.stdout
    for stage in ("teacher", "student_kd", "student_scratch"):
        assert f"{stage} (skipped: already complete)" in again.stdout
    assert "stages run: evaluate, statistics, report" in again.stdout
    redone = json.loads((d / "metrics.json").read_text())
    for name in ENTRIES:  # the same checkpoints on the same windows: the same errors
        assert redone[name]["mae"] == pytest.approx(metrics[name]["mae"], rel=1e-9)
    assert (d / "report.html").is_file()


def test_locations_added_later_redo_evaluation_and_report(run: Run) -> None:
    # It rewrites the store (the next test gets the first run's back). Locations are not part of
    # the data fingerprint, so the trained models stay valid; only the evaluation (which writes
    # locations.npz for the per-sensor error map) and the report run again.
    from tests.conftest import random_store

    d = run.run_dir
    fingerprint = open_store(run.store).fingerprint
    assert not (d / "locations.npz").exists()
    random_store(run.store, steps=600, nodes=6, chunk_steps=64, locations=True, overwrite=True)
    assert open_store(run.store).fingerprint == fingerprint
    again = stkd(run.storage, "distill", "--config", str(run.config), "--run-name", RUN)
    assert again.returncode == 0, again.stderr[-3000:]
    for stage in ("teacher", "student_kd", "student_scratch"):
        assert f"{stage} (skipped: already complete)" in again.stdout
    assert "evaluate (inputs changed)" in again.stdout
    assert "stages run: evaluate, statistics, report" in again.stdout
    locations = np.load(d / "locations.npz")
    assert locations["latitude"].shape == (6,)
    assert (d / "report" / "error_map.png").is_file()


def test_students_whose_inputs_changed_train_again_from_scratch(run: Run) -> None:
    # a complete experiment of other inputs must not pass for this stage's training: the
    # students are trained anew (the same epochs, other losses), the teacher is reused, and the
    # earlier trainings are kept under superseded/
    d = run.run_dir
    before = {n: (d / n / "history.jsonl").read_text() for n in ("student_kd", "student_scratch")}
    again = stkd(
        run.storage,
        "distill",
        "--config",
        str(run.config),
        "--run-name",
        RUN,
        "--set",
        "student.optim.lr=0.004",
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "teacher (skipped: already complete)" in again.stdout
    assert "student_kd (inputs changed)" in again.stdout
    assert "stages run: student_kd, student_scratch, evaluate, statistics, report" in again.stdout
    for name, old in before.items():
        new = [json.loads(line) for line in (d / name / "history.jsonl").read_text().splitlines()]
        assert [h["epoch"] for h in new] == [0, 1]  # trained from epoch 0, not resumed
        old_rows = [json.loads(line) for line in old.splitlines()]
        assert new[0]["train_loss"] != old_rows[0]["train_loss"]
        moved = list((d / "superseded").glob(f"{name}-*"))
        assert len(moved) == 1
        assert (moved[0] / "history.jsonl").read_text() == old
    assert read_config(d / name / "config.yaml").student.optim.lr == 0.004
