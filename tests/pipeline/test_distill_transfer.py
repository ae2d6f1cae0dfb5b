"""``stkd distill --teacher-data SOURCE --data TARGET``: a teacher trained on one network
teaches the students of another, end to end in a real process (local Ray cluster)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from stkd_dist.checkpoint import list_checkpoints, load_forecaster, read_checkpoint
from stkd_dist.serving.cache import LabelCache
from stkd_dist.storage import open_store
from stkd_dist.testing import random_store
from tests.pipeline.test_distill import stkd
from tests.pipeline.tiny_run import tiny_run_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.long
def test_a_teacher_of_another_network_teaches_the_targets_students(tmp_path: Path) -> None:
    source = Path(random_store(tmp_path / "source.zarr", steps=600, nodes=6, seed=0))
    target = Path(random_store(tmp_path / "target.zarr", steps=600, nodes=9, seed=3))
    storage = tmp_path / "storage"
    done = stkd(
        storage, "distill", "--config", str(tiny_run_config(tmp_path / "t.yaml", teacher_model="stgnn_inductive")),
        "--teacher-data", str(source), "--data", str(target), "--run-name", "xfer",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = storage / "runs" / "xfer"
    src_fp, tgt_fp = open_store(source).fingerprint, open_store(target).fingerprint

    # the teacher trained on the source ...
    trained = list_checkpoints(run / "teacher")
    assert trained and {c.fingerprint for c in trained} == {src_fp}
    assert all(c.spec["dims"]["nodes"] == 6 for c in trained)
    # ... and was written as a teacher of the target, with the source's weights
    moved = read_checkpoint(run / "teacher_transfer" / "checkpoint")
    assert moved.fingerprint == tgt_fp and moved.spec["dims"]["nodes"] == 9
    origin = moved.metrics["transferred_from"]
    best = json.loads((run / "teacher" / "best.json").read_text())
    assert origin["version"] == best["version"] and origin["fingerprint"] == src_fp
    src_model, _ = load_forecaster(run / "teacher" / best["checkpoint"])
    tgt_model, _ = load_forecaster(moved.path)
    ours, theirs = src_model.network.state_dict(), tgt_model.network.state_dict()
    assert all(np.array_equal(ours[k], theirs[k]) for k in ours if k != "adjacency")

    # the labels the students learned from are the transferred teacher's, of the target's windows
    caches = list((run / "labels").glob("*.zarr"))
    assert len(caches) == 1
    cache = LabelCache(caches[0])
    assert cache.forward_windows > 0
    stages = json.loads((run / "stages.json").read_text())
    assert "transfer" in json.dumps(stages)
    # evaluated on the target: the teacher row is the transferred teacher's
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["dataset"]["fingerprint"] == tgt_fp and metrics["dataset"]["nodes"] == 9
    for name in ("teacher", "student_kd", "student_scratch"):
        assert len(metrics[name]["mae_per_node"]) == 9 and metrics[name]["mae"] > 0, name
    assert "transferred teacher" in done.stdout + done.stderr


def test_a_teacher_that_cannot_transfer_is_refused_before_any_training(tmp_path: Path) -> None:
    source = Path(random_store(tmp_path / "source.zarr", steps=300, nodes=6, seed=0))
    target = Path(random_store(tmp_path / "target.zarr", steps=300, nodes=9, seed=3))
    done = stkd(
        tmp_path / "storage", "distill", "--config", str(tiny_run_config(tmp_path / "t.yaml", teacher_model="stgnn_inductive")),
        "--teacher-data", str(source), "--data", str(target), "--set", "teacher.model=stgnn",
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("stkd: error:")]
    assert len(errors) == 1 and "teacher.model" in errors[0] and "stgnn_inductive" in errors[0]
    assert not (tmp_path / "storage" / "runs").exists() or not any(
        (tmp_path / "storage" / "runs").rglob("*.pt")
    )
