"""The report: tables, figures and the self-contained HTML."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stkd_dist.errors import InputError
from stkd_dist.report import write_report
from stkd_dist.report.inputs import load_inputs
from stkd_dist.report.plots import pareto_front
from stkd_dist.report.render import summary_table


def _entry(mae: float, params: int | None = None, latency: float | None = None) -> dict:
    e = {
        "mae": mae,
        "rmse": mae * 1.5,
        "mape": mae * 2,
        "mae_per_horizon": [mae * (0.8 + 0.05 * h) for h in range(6)],
    }
    if params is not None:
        e.update(
            params=params, latency_ms=latency, mae_per_node=list(np.linspace(mae - 1, mae + 1, 5))
        )
    return e


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    metrics = {
        "teacher": _entry(3.0, 200_000, 40.0),
        "student_kd": _entry(3.2, 15_000, 4.0),
        "student_scratch": _entry(3.4, 15_000, 4.0),
        "last_value": _entry(4.0),
        "historical_average": _entry(5.0),
        "dataset": {"name": "toy", "fingerprint": "abc", "nodes": 5, "steps": 1000},
    }
    (run / "metrics.json").write_text(json.dumps(metrics))
    history = {
        m: [{"epoch": e, "train_loss": 5 - e, "val_mae": 4 - e / 2} for e in range(1, 4)]
        for m in ("teacher", "student_kd")
    }
    (run / "history.json").write_text(json.dumps(history))
    t = np.arange(
        "2024-01-01T00:00", "2024-01-02T00:00", np.timedelta64(5, "m"), dtype="datetime64[m]"
    )
    truth = np.sin(np.linspace(0, 6, len(t)))[:, None] * np.ones((1, 2))
    np.savez(
        run / "forecasts.npz",
        time=t,
        node_ids=np.array(["a", "b"]),
        truth=truth,
        pred_teacher=truth + 0.1,
    )
    np.savez(
        run / "locations.npz",
        latitude=np.linspace(34, 34.1, 5),
        longitude=np.linspace(-118.3, -118.2, 5),
    )
    (run / "sweep").mkdir()
    pd.DataFrame(
        {"trial": ["t1", "t2", "t3"], "params": [1000, 5000, 20000], "test_mae": [3.5, 3.6, 3.1]}
    ).to_csv(run / "sweep" / "leaderboard.csv", index=False)
    return run


def test_report_has_table_figures_and_embedded_images(run_dir: Path):
    md, page = write_report(run_dir)
    text = md.read_text()
    assert "| student (distilled) |  | 3.200 |" in text
    assert "| teacher | ★ | 3.000 |" in text and "200,000" in text and "200000.000" not in text
    pngs = sorted(p.name for p in (run_dir / "report").glob("*.png"))
    assert pngs == [
        "error_map.png",
        "forecasts.png",
        "horizon_mae.png",
        "learning_curves.png",
        "pareto.png",
    ]
    for name in pngs:
        assert (run_dir / "report" / name).read_bytes()[:4] == b"\x89PNG"
    html = page.read_text()
    assert html.count("data:image/png;base64,") == 5
    assert "report/" not in html  # self-contained: no links to files next to it


def test_speedup_relative_to_teacher(run_dir: Path):
    table = summary_table(load_inputs(run_dir)).set_index("model")
    assert table.loc["teacher", "speed-up"] == pytest.approx(1.0)
    assert table.loc["student (distilled)", "speed-up"] == pytest.approx(10.0)
    assert pd.isna(table.loc["last value", "speed-up"])


def test_optional_inputs_are_optional(tmp_path: Path):
    (tmp_path / "metrics.json").write_text(json.dumps({"teacher": {"mae": 1.0}}))
    md, _ = write_report(tmp_path)
    assert "teacher" in md.read_text()
    assert list((tmp_path / "report").glob("*.png")) == []


def test_missing_metrics_is_a_clear_error(tmp_path: Path):
    with pytest.raises(InputError, match=r"metrics.json: no metrics.json"):
        write_report(tmp_path)


def test_pareto_front():
    params = np.array([10, 20, 30, 40, 15])
    mae = np.array([5.0, 4.0, 4.5, 3.0, 6.0])
    assert pareto_front(params, mae) == [0, 1, 3]


def test_findings_verdict_and_integers(run_dir: Path):
    from stkd_dist.stats import kd_vs_scratch

    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["kd_vs_scratch"] = kd_vs_scratch([3.2, 3.1, 3.3], [3.4, 3.5, 3.3], 3.0, [0, 1, 2])
    metrics["teacher_check"] = {
        "beats_baselines": False,
        "message": "warning: the teacher (validation MAE 4.1) does not beat last value 4.0",
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    md, page = write_report(run_dir)
    text = md.read_text()
    assert (
        "The distilled student (test MAE 3.200) beat the student trained without distillation "
        "(3.400) and beat both naive baselines; its test MAE is 6.7 % above the teacher's."
    ) in text
    assert "**Teacher check:** warning: the teacher" in text
    assert "**Distilled vs scratch over seeds:** Distillation did not help" in text
    assert "| 2 | 3.300 | 3.300 |" in text  # per-seed table
    html = page.read_text()
    assert "200,000" in html and "200000.0" not in html and "<b>Teacher check:</b>" in html
