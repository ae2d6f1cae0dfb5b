"""``distill.rounds: 2``: teacher → student → the student's predictions → the teacher fine-tuned
on them → a new student, end to end in a real process (local Ray cluster), both rounds recorded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from stkd_dist.checkpoint import load_checkpoint_state, load_forecaster, read_checkpoint
from stkd_dist.config import read_config
from stkd_dist.data.loader import make_loader
from stkd_dist.serving.cache import LabelCache
from stkd_dist.storage import open_store
from stkd_dist.testing import random_store
from stkd_dist.train.loop import build_reader
from tests.pipeline.test_distill import stkd
from tests.pipeline.tiny_run import tiny_run_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROUND_STAGES = ("student_labels_round2", "teacher_round2", "labels_round2", "student_kd_round2")


@pytest.mark.long  # about 90 s: two teachers and two students trained, four label caches
def test_two_rounds_run_end_to_end_and_record_both(tmp_path: Path) -> None:
    store = random_store(tmp_path / "tiny.zarr", steps=600, nodes=6, chunk_steps=64)
    config = tiny_run_config(
        tmp_path / "rounds.yaml",
        store,
        distill={"rounds": 2, "feedback": 0.4, "feedback_epochs": 1},
    )
    storage = tmp_path / "storage"
    out = stkd(storage, "distill", "--config", str(config), "--run-name", "rounds", timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run = storage / "runs" / "rounds"
    stages = json.loads((run / "stages.json").read_text())["stages"]
    assert set(ROUND_STAGES) <= set(stages)

    # the student's predictions, labelled once: the round-1 student's forecasts, computed here
    student = read_checkpoint(run / "student_kd" / json.loads(
        (run / "student_kd" / "best.json").read_text())["checkpoint"])  # fmt: skip
    cache = LabelCache(run / stages["student_labels_round2"]["info"]["path"])
    assert cache.version == student.version
    model, _ = load_forecaster(student.path, role="student")
    reader = build_reader(read_config(run / "config.yaml"), open_store(store))
    batch = next(iter(make_loader(reader, "train", batch_size=8, shuffle=False)))
    with torch.no_grad():
        mine = model(batch.x, batch.time_of_day, batch.day_of_week).numpy()
    hit, cached = cache.lookup("train", batch.index.numpy(), with_spread=False)
    assert hit.all() and cached is not None
    np.testing.assert_allclose(cached.prediction, mine, rtol=1e-5, atol=1e-4)

    # the round-2 teacher: round 1's teacher fine-tuned (1 epoch) against those predictions
    t2 = stages["teacher_round2"]["info"]
    t1 = stages["teacher"]["info"]
    assert t2["version"] != t1["version"]
    history = [
        json.loads(x) for x in (run / "teacher_round2" / "history.jsonl").read_text().splitlines()
    ]
    assert [h["epoch"] for h in history] == [0]
    assert {"train_task", "train_match"} <= set(history[0])
    cfg2 = yaml.safe_load((run / "teacher_round2" / "config.yaml").read_text())
    assert cfg2["distill"]["alpha"] == pytest.approx(0.6)  # 1 - feedback
    w1 = load_checkpoint_state(run / t1["checkpoint"])["model"]
    w2 = load_checkpoint_state(run / t2["checkpoint"])["model"]
    assert any(not torch.equal(w1[k], w2[k]) for k in w1)
    # the round-2 student learned from that teacher
    teachers = json.loads((run / "student_kd_round2" / "teachers.json").read_text())["teachers"]
    assert [t["version"] for t in teachers] == [t2["version"]]

    # both rounds in metrics.json and the report, with a plain verdict
    rounds = json.loads((run / "metrics.json").read_text())["rounds"]
    rows = rounds["rounds"]
    assert [r["round"] for r in rows] == [1, 2]
    assert [r["teacher"] for r in rows] == [t1["version"], t2["version"]]
    assert rows[0]["student"] == student.version
    assert all(r["student_test_mae"] > 0 and r["teacher_test_mae"] > 0 for r in rows)
    assert ("did not help" in rounds["verdict"]) == (
        rows[1]["student_test_mae"] >= rows[0]["student_test_mae"]
    )
    assert "## Distillation rounds" in (run / "report.md").read_text()

    # asking again redoes nothing; the round stages are skipped like the others
    again = stkd(storage, "distill", "--config", str(config), "--run-name", "rounds")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "stages run: none" in again.stdout
    for stage in ROUND_STAGES:
        assert f"{stage} (skipped: already complete)" in again.stdout
