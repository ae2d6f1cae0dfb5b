"""A real sweep: Ray Tune trials with ASHA on a local Ray cluster (2 CPUs), one tiny teacher.

One sweep of 4 trials runs for the module (about a minute); the tests check what it left.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pandas as pd
import pytest
import ray

from stkd_dist.checkpoint import load_forecaster, read_checkpoint
from stkd_dist.config import read_config
from stkd_dist.pipeline.sweep import SweepOutcome
from stkd_dist.pipeline.tune_trial import read_starts
from stkd_dist.serving.cache import LabelCache
from stkd_dist.storage import open_store
from stkd_dist.train.loop import build_reader
from tests.pipeline.sweep_env import SweepEnv, make_env, read_board, swept_on_ray

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> SweepEnv:
    return make_env(tmp_path_factory.mktemp("sweep"))


@pytest.fixture(scope="module")
def swept(env: SweepEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with swept_on_ray(env, tmp_path_factory.mktemp("storage")) as swept:
        yield swept


def test_leaderboard_has_every_trial_evaluated_on_test(
    swept: dict[str, Any], env: SweepEnv
) -> None:
    outcome: SweepOutcome = swept["outcome"]
    assert not outcome.interrupted and not outcome.resumed
    board = read_board(outcome.layout.leaderboard)[0]
    assert len(board) == env.config.sweep.samples == 4
    for col in ("trial", "params", "val_mae", "test_mae", "distill.alpha", "student.model"):
        assert col in board.columns
    assert board["trial"].is_unique
    assert board["val_mae"].is_monotonic_increasing  # best first
    assert board["test_mae"].notna().all() and (board["params"] > 0).all()
    lo, hi = env.config.sweep.space["distill.alpha"]["uniform"]
    assert board["distill.alpha"].between(lo, hi).all()
    assert set(board["student.model"]) <= {"mlp", "linear"}
    # a linear student takes no embed_dim: the sampled value was not applied, and says so
    assert board.loc[board["model"] == "linear", "student.kwargs.embed_dim"].isna().all()
    # ASHA: every trial ran at least the grace period and at most max_epochs
    sweep = env.config.sweep
    assert board["epochs"].between(sweep.grace_period, sweep.max_epochs).all()
    assert (board["epochs"] == sweep.max_epochs).any()

    # each row's test MAE is that of the checkpoint it names, evaluated again here
    from stkd_dist.train.evaluate import predict_metrics

    row = board.iloc[-1]
    model, info = load_forecaster(outcome.layout.root / row["checkpoint"], role="student_sweep")
    reader = build_reader(info.config, open_store(env.store))
    assert predict_metrics(model, reader, "test", 128).mae == pytest.approx(row["test_mae"])
    assert info.val_mae == pytest.approx(row["val_mae"])
    assert model.num_params() == row["params"]


def test_soup_and_ensemble_rows_are_evaluated_and_exported(
    swept: dict[str, Any], env: SweepEnv
) -> None:
    """The leaderboard's `soup` and `ensemble` rows: the exported soup re-evaluated here gives
    the row's test MAE, the ensemble is the top 3 trials by validation MAE, and the summary's
    `beats_best` says what the numbers say."""
    from stkd_dist.pipeline.sweep_aggregate import load_ensemble
    from stkd_dist.train.evaluate import predict_metrics

    outcome: SweepOutcome = swept["outcome"]
    trials, aggregates = read_board(outcome.layout.leaderboard)
    assert list(aggregates["trial"]) == ["soup", "ensemble"]
    assert aggregates["test_mae"].notna().all()
    soup, ensemble = (aggregates.iloc[i] for i in range(2))
    assert ensemble["members"].split() == list(trials["trial"][:3])
    assert soup["members"].split()[0] == trials["trial"][0]  # the soup starts from the best
    reader = build_reader(env.config, open_store(env.store))
    model, _ = load_forecaster(outcome.layout.root / soup["checkpoint"], role="student_sweep")
    assert predict_metrics(model, reader, "test", 128).mae == pytest.approx(soup["test_mae"])
    members = load_ensemble(outcome.layout.ensemble)
    assert predict_metrics(members, reader, "test", 128).mae == pytest.approx(ensemble["test_mae"])
    summary = outcome.summary["aggregates"]
    best = trials["test_mae"][0]
    assert summary["soup"]["beats_best"] == (soup["test_mae"] < best)
    assert summary["ensemble"]["beats_best"] == (ensemble["test_mae"] < best)


def test_each_trials_stop_reason_and_processes_are_recorded(
    swept: dict[str, Any], env: SweepEnv
) -> None:
    """summary.json's stop reasons and worker processes, checked against what Tune recorded of
    each trial (its progress.csv: the epochs, the early-stopping flag, the reporting process)."""
    outcome: SweepOutcome = swept["outcome"]
    summary, sweep = outcome.summary, env.config.sweep
    records = {r["trial_id"]: r for r in summary["trial_records"]}
    board = read_board(outcome.layout.leaderboard)[0]
    assert set(records) == set(board["trial"]) and len(records) == 4
    reasons = summary["stop_reasons"]
    assert set(reasons) == {"completed", "early_stopping", "scheduler", "failed"}
    assert sum(reasons.values()) == 4 and reasons["failed"] == 0
    # no early-stopping patience in this sweep; ASHA lets the best trial run to the end
    assert reasons["early_stopping"] == 0 and reasons["completed"] >= 1
    assert sorted(summary["scheduler"]["stopped"]) == sorted(
        t for t, r in records.items() if r["stop_reason"] == "scheduler"
    )
    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    for trial, record in records.items():
        progress = pd.read_csv(outcome.layout.tune / f"trial_{trial}" / "progress.csv")
        last = progress.iloc[-1]
        assert record["epochs_done"] == last["epochs_done"] == len(progress)
        assert not last["stopped_early"]
        if record["stop_reason"] == "completed":
            assert last["epochs_done"] == sweep.max_epochs
        else:
            assert record["stop_reason"] == "scheduler"
            assert sweep.grace_period <= last["epochs_done"] < sweep.max_epochs
        # one worker process, the one Tune saw report the trial's results
        (worker,) = record["workers"]
        assert worker == {"rank": 0, "pid": int(last["pid"]), "node_id": worker["node_id"]}
        assert worker["node_id"] in nodes
        assert [s["restored_from"] for s in record["starts"]] == [None]


def test_each_trial_keeps_its_best_checkpoints(swept: dict[str, Any], env: SweepEnv) -> None:
    outcome: SweepOutcome = swept["outcome"]
    keep = env.config.sweep.keep_best
    trial_dirs = sorted(outcome.layout.tune.glob("trial_*"))
    # one Tune folder for each trial of the leaderboard: the checks below cover every trial
    board = read_board(outcome.layout.leaderboard)[0]
    assert len(trial_dirs) == env.config.sweep.samples == 4
    assert {d.name.removeprefix("trial_") for d in trial_dirs} == set(board["trial"])
    for trial_dir in trial_dirs:
        kept = {read_checkpoint(d).epoch for d in trial_dir.glob("checkpoint_*")}
        progress = pd.read_csv(trial_dir / "progress.csv")
        # the best `keep` epochs by validation MAE, plus the latest (what a restore resumes from)
        best = set(progress.nsmallest(keep, "val_mae")["epoch"])
        assert kept == best | {int(progress["epoch"].max())}
        starts = read_starts(outcome.layout.trials / trial_dir.name.removeprefix("trial_"))
        assert [s["after_epoch"] for s in starts] == [-1]  # trained once, from scratch


def test_best_student_is_exported_with_the_lowest_val_mae(
    swept: dict[str, Any], env: SweepEnv
) -> None:
    outcome: SweepOutcome = swept["outcome"]
    board = read_board(outcome.layout.leaderboard)[0]
    best = outcome.layout.best
    model, info = load_forecaster(best, role="student_sweep")
    assert not model.training
    assert info.val_mae == pytest.approx(board["val_mae"].min())
    meta = json.loads((best / "metrics.json").read_text())
    assert meta["trial"] == board.iloc[0]["trial"] == outcome.best.trial
    assert meta["test"]["mae"] == pytest.approx(board.iloc[0]["test_mae"])
    assert read_config(best / "config.yaml") == info.config
    assert info.config.student.model == board.iloc[0]["model"]
    assert info.config.distill.alpha == pytest.approx(board.iloc[0]["distill.alpha"])


def test_pareto_front_is_non_dominated(swept: dict[str, Any]) -> None:
    outcome: SweepOutcome = swept["outcome"]
    board = read_board(outcome.layout.leaderboard)[0]
    front = read_board(outcome.layout.pareto)[0]
    assert len(front) >= 1 and set(front["trial"]) <= set(board["trial"])

    def dominates(a: pd.Series, b: pd.Series) -> bool:
        return (
            a["params"] <= b["params"]
            and a["test_mae"] <= b["test_mae"]
            and (a["params"] < b["params"] or a["test_mae"] < b["test_mae"])
        )

    for _, p in front.iterrows():
        assert not any(dominates(o, p) for _, o in board.iterrows()), p["trial"]
    on_front = set(front["trial"])
    for _, o in board.iterrows():
        if o["trial"] not in on_front:
            assert any(dominates(p, o) for _, p in front.iterrows()), o["trial"]


def test_teacher_ran_once_per_distinct_window(swept: dict[str, Any], env: SweepEnv) -> None:
    """Streamed labels (``sweep.labels: stream``, the default): every trial streamed from the
    sweep's one teacher replica, which ran its model once per distinct window (its own count),
    wrote each window through to the run's label cache and served later reads from there."""
    import numpy as np

    from stkd_dist.serving.teacher import load_teacher

    outcome: SweepOutcome = swept["outcome"]
    summary = outcome.summary
    labels = summary["labels"]
    reader = build_reader(env.config, open_store(env.store))
    distinct = len(reader.windows("train"))
    assert labels["mode"] == "stream" and labels["replicas"] == 1
    # counted by the replica's model as it ran: once per window, not per trial or epoch
    assert labels["replica_forward_windows"] == distinct
    assert summary["teacher_windows_computed"] == distinct == summary["distinct_windows"]
    cache = LabelCache(labels["cache"])
    assert cache.is_complete("train") and cache.forward_windows == distinct
    # the cache holds the teacher's forecasts of the right windows: some computed again here
    windows = np.asarray(reader.windows("train"))[[0, distinct // 2, distinct - 1]]
    hit, cached = cache.lookup("train", windows, with_spread=False)
    assert hit.all() and cached is not None
    again = load_teacher(env.teacher, env.store).predict(windows)
    np.testing.assert_allclose(cached.prediction, again.prediction, rtol=1e-5, atol=1e-5)
    board = read_board(outcome.layout.leaderboard)[0].set_index("trial")
    assert labels["trial_label_reads"] == distinct * board["epochs"].sum() > distinct
    # every trial streamed its labels from the replica, one delivery record per epoch
    trials = list(outcome.layout.trials.iterdir())
    assert len(trials) == 4
    for trial_dir in trials:
        records = list(trial_dir.glob("labels/epoch_*/rank_0.json"))
        assert len(records) == board.loc[trial_dir.name, "epochs"]
        for record in records:
            (teacher,) = json.loads(record.read_text())["teachers"]
            assert teacher["teacher"].startswith("ray:stkd-teacher-")
            assert teacher["delivered"] == distinct


def test_run_report_includes_the_sweep(swept: dict[str, Any]) -> None:
    outcome: SweepOutcome = swept["outcome"]
    run = outcome.layout.root.parent
    metrics = json.loads((run / "metrics.json").read_text())
    for entry in ("student_sweep", "teacher", "last_value", "historical_average"):
        assert "mae" in metrics[entry], entry
    assert metrics["student_sweep"]["mae"] == pytest.approx(outcome.best.test_mae)
    assert metrics["student_sweep"]["params"] == outcome.best.params
    report = (run / "report.md").read_text()
    assert "Sweep leaderboard" in report and "report/pareto.png" in report
    assert (run / "report" / "pareto.png").stat().st_size > 0
    summary = json.loads((outcome.layout.summary).read_text())
    assert summary["trials"] == 4 and summary["best"]["trial"] == outcome.best.trial
    assert summary["max_concurrent"] == 0  # no cap: the cluster's resources decide
    assert any("starting sweep" in line for line in swept["lines"])
