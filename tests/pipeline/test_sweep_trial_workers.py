"""Data-parallel trials: ``sweep.trial_workers: 2`` makes every trial a Ray Train run of 2 workers.

One sweep of 4 trials (ASHA, 2 epochs each at most, labels streamed from a teacher replica) on a
local Ray cluster, in which both workers of one trial are SIGKILLed after its first epoch; the
tests check, on the data side, that each trial ran two distinct worker processes which shared
every epoch's training windows between them, that the killed trial was retried and the sweep
finished with every trial, that the teacher computed each distinct window once, and what the
sweep reported of it.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stkd_dist.location import location
from stkd_dist.pipeline.sweep import SweepOutcome
from stkd_dist.pipeline.tune_trial import read_starts
from stkd_dist.storage import open_store
from stkd_dist.train.loop import build_reader
from tests.pipeline.sweep_env import SweepEnv, make_env, read_board, swept_on_ray

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.long]

TRIALS, EPOCHS = 4, 2


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> SweepEnv:
    return make_env(
        tmp_path_factory.mktemp("dp"), run="dp", samples=TRIALS, max_epochs=EPOCHS, trial_workers=2
    )


class WorkerKiller(threading.Thread):
    """SIGKILLs both workers of the first trial to log a start (its first epoch's report):
    the trial's Ray Train run fails and Tune must start the trial again."""

    def __init__(self, records: Path) -> None:
        super().__init__(daemon=True)
        self.records = records
        self.done = threading.Event()
        self.killed: dict[str, Any] = {}

    def run(self) -> None:
        while not self.done.is_set():
            for trial in self.records.glob("*"):
                starts = read_starts(trial)
                if starts and len(starts[0]["workers"]) == 2:
                    pids = [w["pid"] for w in starts[0]["workers"]]
                    for pid in pids:
                        os.kill(pid, signal.SIGKILL)  # raises if the process were gone
                    self.killed = {"trial": trial.name, "pids": pids}
                    return
            time.sleep(0.02)  # polling the records the trials write


@pytest.fixture(scope="module")
def swept(env: SweepEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    # room for two trials of two 1-CPU workers at once; the dashboard serves the State API that
    # Ray Train's placement-group cleaner asks when a trial's run has ended
    storage = tmp_path_factory.mktemp("storage")
    killer = WorkerKiller(storage / "runs" / "dp" / "sweep" / "trials")
    killer.start()
    try:
        with swept_on_ray(env, storage, num_cpus=4, dashboard=True) as swept:
            yield {**swept, "killed": killer.killed}
    finally:
        killer.done.set()


def _train_windows(env: SweepEnv) -> int:
    store = open_store(env.config.data.dataset)
    return len(build_reader(env.config, store).windows("train"))


def test_every_trial_ran_two_distinct_worker_processes(swept: dict[str, Any]) -> None:
    outcome: SweepOutcome = swept["outcome"]
    summary = outcome.summary
    assert summary["trials"] == TRIALS and summary["errored"] == 0
    for record in summary["trial_records"]:
        trial_dir = outcome.layout.trials / record["trial_id"]
        start = read_starts(trial_dir)[-1]
        workers = start["workers"]
        assert sorted(w["rank"] for w in workers) == [0, 1]
        pids = {w["pid"] for w in workers}
        # two processes, neither of them the trial's own Tune function
        assert len(pids) == 2 and start["pid"] not in pids
        assert record["workers"] == workers


def test_each_epoch_the_two_ranks_shared_the_training_windows(
    swept: dict[str, Any], env: SweepEnv
) -> None:
    outcome: SweepOutcome = swept["outcome"]
    train = _train_windows(env)
    for record in outcome.summary["trial_records"]:
        labels = location(outcome.layout.trials / record["trial_id"]) / "labels"
        epochs = sorted(p.name for p in labels.iterdir())
        done = record["epochs_done"]
        # a trial the scheduler stops may have begun its next epoch before the stop reached it
        assert len(epochs) in (done, done + 1)
        for epoch in epochs[:done]:
            ranks = [json.loads((labels / epoch / f"rank_{r}.json").read_text()) for r in (0, 1)]
            assert [r["world_size"] for r in ranks] == [2, 2]
            # the delivery records of the data side: each rank got the labels of its own shard
            delivered = [r["teachers"][0]["delivered"] for r in ranks]
            assert all(d > 0 for d in delivered)
            assert sum(r["plan_windows"] for r in ranks) == train


def test_the_trial_whose_workers_were_killed_was_retried(swept: dict[str, Any]) -> None:
    """Both workers of one trial SIGKILLed after its first epoch: Tune started the trial again
    (new worker processes, continuing from its reported checkpoint or from scratch), and the
    sweep finished with every trial, none failed."""
    outcome: SweepOutcome = swept["outcome"]
    killed = swept["killed"]
    assert killed, "the workers were never killed"
    summary = outcome.summary
    assert summary["trials"] == TRIALS and summary["errored"] == 0
    assert summary["stop_reasons"]["failed"] == 0
    starts = read_starts(outcome.layout.trials / killed["trial"])
    assert len(starts) == 2
    again = {w["pid"] for w in starts[1]["workers"]}
    assert len(again) == 2 and not again & set(killed["pids"])
    assert starts[1]["after_epoch"] in (-1, 0)
    board = read_board(outcome.layout.leaderboard)[0]
    assert killed["trial"] in set(board["trial"]) and len(board) == TRIALS


def test_stop_reasons_match_the_epochs_each_trial_ran(swept: dict[str, Any]) -> None:
    summary = swept["outcome"].summary
    for record in summary["trial_records"]:
        done = record["epochs_done"]
        expected = "completed" if done == EPOCHS else "scheduler"
        assert record["stop_reason"] == expected, record
    assert sum(summary["stop_reasons"].values()) == TRIALS


def test_labels_were_streamed_and_computed_once_and_the_board_has_the_aggregates(
    swept: dict[str, Any], env: SweepEnv
) -> None:
    """Every rank of every trial streamed from the sweep's replica, which ran its model once
    per distinct training window (its own count) for 4 trials x 2 workers."""
    outcome: SweepOutcome = swept["outcome"]
    summary = outcome.summary
    labels = summary["labels"]
    train = _train_windows(env)
    assert labels["mode"] == "stream"
    assert labels["replica_forward_windows"] == train == summary["distinct_windows"]
    assert summary["teacher_windows_computed"] == train
    for record in summary["trial_records"]:
        folder = location(outcome.layout.trials / record["trial_id"]) / "labels"
        for rank in folder.glob("epoch_*/rank_*.json"):
            (teacher,) = json.loads(rank.read_text())["teachers"]
            assert teacher["teacher"].startswith("ray:stkd-teacher-")
    trials, aggregates = read_board(outcome.layout.leaderboard)
    assert len(trials) == TRIALS
    assert set(aggregates["kind"]) == {"soup", "ensemble"}
