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
    metrics["headroom"] = {
        "worth_distilling": False,
        "message": "warning: the scratch student is as good as the teacher on validation",
    }
    metrics["weekday_check"] = {
        "unseen_weekdays": [3, 4],
        "roles": ["student"],
        "message": "warning: the training split holds Mon, Tue, Wed, Sat, Sun only",
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    md, page = write_report(run_dir)
    text = md.read_text()
    assert "**Weekday check:** warning: the training split holds Mon, Tue, Wed, Sat, Sun" in text
    assert (
        "The distilled student (test MAE 3.200) beat the student trained without distillation "
        "(3.400) and beat both naive baselines; its test MAE is 6.7 % above the teacher's."
    ) in text
    assert "**Teacher check:** warning: the teacher" in text
    assert "**Headroom:** warning: the scratch student is as good as the teacher" in text
    assert "**Distilled vs scratch over seeds:** Distillation did not help" in text
    assert "| 2 | 3.300 | 3.300 |" in text  # per-seed table
    html = page.read_text()
    assert "200,000" in html and "200000.0" not in html and "<b>Teacher check:</b>" in html


def test_sweep_section_marks_the_aggregates_and_the_schedulers_decisions(run_dir: Path):
    """A sweep with soup and ensemble rows and a summary: the leaderboard keeps the aggregates
    after the trials, and the report says in words whether they beat the best trial, why trials
    stopped and which trials ASHA stopped."""
    pd.DataFrame(
        {
            "trial": ["t1", "t2", "t3", "soup", "ensemble"],
            "kind": ["trial", "trial", "trial", "soup", "ensemble"],
            "params": [1000, 5000, 20000, 1000, 26000],
            "val_mae": [3.0, 3.2, 3.4, 2.9, 2.95],
            "test_mae": [3.5, 3.6, 3.1, 3.4, 3.7],
            "members": ["", "", "", "t1 t2", "t1 t2 t3"],
        }
    ).to_csv(run_dir / "sweep" / "leaderboard.csv", index=False)
    summary = {
        "stop_reasons": {"completed": 1, "early_stopping": 1, "scheduler": 1, "failed": 0},
        "scheduler": {"name": "asha", "stopped": ["t3"]},
        "aggregates": {
            "best": {"trial": "t1", "test_mae": 3.5},
            "soup": {"members": ["t1", "t2"], "test_mae": 3.4, "beats_best": True},
            "ensemble": {"members": ["t1", "t2", "t3"], "test_mae": 3.7, "beats_best": False},
        },
    }
    (run_dir / "sweep" / "summary.json").write_text(json.dumps(summary))
    inp = load_inputs(run_dir)
    assert list(inp.trials["trial"]) == ["t1", "t2", "t3"]
    assert list(inp.aggregates["trial"]) == ["soup", "ensemble"]
    md, page = write_report(run_dir)
    text = md.read_text()
    board = text[text.index("## Sweep leaderboard") :]
    assert board.index("| t3 ") < board.index("| soup ") < board.index("| ensemble ")
    assert "weight soup (2 member(s): t1, t2) has test MAE 3.400 and beats the best" in text
    assert "ensemble (3 member(s): t1, t2, t3) has test MAE 3.700 and does not beat" in text
    assert "ASHA stopped 1 trial(s) at a rung: t3." in text
    assert "scheduler 1" in text
    assert "ASHA stopped 1 trial(s)" in page.read_text()
