"""``stkd demo``: the dataset stage (synthesise once, then reuse) and the hand-over to the pipeline.

The pipeline itself runs end to end in ``tests/pipeline/test_distill.py``; here it is replaced by a
stand-in that records the config it was given, so these tests take a second or two.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stkd_dist.cli import main
from stkd_dist.config import load_config
from stkd_dist.data.batch import DataDims
from stkd_dist.pipeline import distill as distill_module
from stkd_dist.pipeline.distill import DistillOutcome
from stkd_dist.pipeline.run import RunLayout
from stkd_dist.pipeline.ui import StageReport
from stkd_dist.storage import open_store


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Replace the pipeline with a stand-in returning a fixed outcome; record its calls."""
    calls: list[dict[str, Any]] = []
    monkeypatch.setenv("COLUMNS", "160")  # tables on one line each

    def fake_run_distill(cfg: Any, *, storage: Any = None, ui: Any = None, worker_logs=False):
        calls.append({"cfg": cfg, "storage": storage, "worker_logs": worker_logs})
        layout = RunLayout.of(cfg.run_name, storage)
        return DistillOutcome(
            layout,
            stages=[StageReport("teacher", "ran", 1.0, "best x")],
            metrics={
                "teacher": {"mae": 2.0, "rmse": 3.0, "mape": 4.0, "params": 100, "latency_ms": 8.0},
                "student_kd": {
                    "mae": 2.5,
                    "rmse": 3.5,
                    "mape": 5.0,
                    "params": 10,
                    "latency_ms": 1.0,
                },
                "dataset": {"name": cfg.data.dataset, "nodes": 5},
            },
            report=layout.report_html,
            seconds=1.0,
        )

    monkeypatch.setattr(distill_module, "run_distill", fake_run_distill)
    return calls


def test_demo_synthesises_once_then_reuses_and_runs_the_demo_preset(
    tmp_path: Path, recorded: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "storage"
    args = ["--storage", str(root), "demo", "--nodes", "5", "--steps", "700", "--run-name", "d1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    store = open_store(root / "datasets" / "demo.zarr")
    assert store.shape[:2] == (700, 5)
    assert "synthesised dataset 'demo'" in out
    # the summary table and the report's path close the output
    assert "student (distilled)" in out and "speed-up" in out
    assert f"report: {root / 'runs' / 'd1' / 'report.html'}" in out
    cfg = recorded[0]["cfg"]
    assert cfg.run.name == "d1" and cfg.data.dataset == "demo"
    # everything else is the demo preset
    preset = load_config("demo", ["run.name=d1"])
    assert cfg == preset and recorded[0]["storage"] == str(root)

    fingerprint = store.fingerprint
    assert main(args) == 0
    assert "reusing dataset 'demo'" in capsys.readouterr().out
    assert open_store(root / "datasets" / "demo.zarr").fingerprint == fingerprint


def test_demo_on_a_given_dataset_synthesises_nothing(
    tmp_path: Path,
    make_store: Any,
    recorded: list[dict[str, Any]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    store = make_store("mine", steps=300, nodes=4)
    root = tmp_path / "storage"
    assert main(["--storage", str(root), "demo", "--data", str(store)]) == 0
    assert f"using dataset {store}" in capsys.readouterr().out
    assert not (root / "datasets").exists()
    cfg = recorded[0]["cfg"]
    assert cfg.data.dataset == str(store) and cfg.run.name == "demo"


def test_demo_refuses_a_bad_run_name(
    tmp_path: Path, recorded: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--storage", str(tmp_path), "demo", "--run-name", "a/b"]) == 2
    assert "stkd: error: --run-name:" in capsys.readouterr().err
    assert not recorded and not (tmp_path / "datasets").exists()


def test_demo_preset_student_is_a_fraction_of_the_teacher() -> None:
    from stkd_dist.models import build_forecaster

    cfg = load_config("demo")
    dims = DataDims(nodes=50, input_steps=12, horizon=12, in_channels=1, out_channels=1)
    adj = np.eye(50, dtype=np.float32)
    params = {
        role: build_forecaster(
            cfg.model(role).model, dims, adjacency=adj, **cfg.model(role).kwargs
        ).num_params()
        for role in ("teacher", "student")
    }
    assert params["student"] * 5 <= params["teacher"]
    # the student's time-of-day embedding only sees the slots of training windows: with a stride
    # above 1 it would meet unseen slots on the other splits
    assert cfg.data.stride == 1
    assert dataclasses.asdict(cfg.serve)["mode"] in ("stream", "cache")
