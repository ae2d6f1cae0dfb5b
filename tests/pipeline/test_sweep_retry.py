"""Trials that crash, stop themselves or are stopped: retries and true stop reasons (real Ray).

One ASHA sweep (local Ray, 2 CPUs) of four trials run one at a time: a grid over the learning
rate (100: a student that diverges, worse than any other; 1e-30: a frozen student, whose weights
cannot move in float32, so its validation MAE is the same every epoch) and the early-stopping
patience (4 epochs, or none). Tune starts them in this order, and each ends for a known reason:

1. diverging, patience 4: its process is killed at its start and again at its restart
   (``sweep.max_failures: 1``): ``failed``. The sweep goes on without it.
2. frozen, patience 4: ASHA's rungs (epochs 2 and 4) let it go on (no other trial is better); its
   patience ends it after 5 epochs: ``early_stopping``.
3. diverging, no patience: at the first rung it is worse than the frozen one: ``scheduler``.
4. frozen, no patience: killed once after its second checkpoint, restarted from its latest
   checkpoint, as good as the best at every rung: it runs all 8 epochs, ``completed``.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import ray

from stkd_dist.pipeline.sweep import SweepOutcome, run_sweep
from stkd_dist.pipeline.trial_records import SCHEDULER_STOP, STOP, read_starts
from stkd_dist.pipeline.ui import LinesUI
from tests.pipeline.sweep_env import make_env, read_board

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.long]

FROZEN, DIVERGES = 1e-30, 100.0
SPACE = {
    "student.optim.lr": {"grid": [DIVERGES, FROZEN]},
    "student.schedule.early_stopping_patience": {"grid": [4, 0]},
}
#: (learning rate, patience) of each trial, in the order Tune starts them (the first key of a
#: grid varies fastest)
FAILS, EARLY, STOPPED, KILLED_ONCE = (DIVERGES, 4), (FROZEN, 4), (DIVERGES, 0), (FROZEN, 0)
TRIALS = (FAILS, EARLY, STOPPED, KILLED_ONCE)
MAX_EPOCHS = 8


def _trial(records: Path, which: tuple[float, int]) -> Path | None:
    """The records folder of the trial with ``(lr, patience)`` (None before it started)."""
    for d in records.glob("*"):
        starts = read_starts(d)
        if starts:
            params = starts[0]["params"]
            patience = params["student.schedule.early_stopping_patience"]
            if (params["student.optim.lr"], patience) == which:
                return d
    return None


class Killer(threading.Thread):
    """Kills trial processes (pids from the trials' start records) at set points of the sweep."""

    def __init__(self, records: Path, tune: Path) -> None:
        super().__init__(daemon=True)
        self.records, self.tune = records, tune
        self.done = threading.Event()
        self.kills: list[dict[str, Any]] = []
        self.error: BaseException | None = None

    def _wait(self, what: str, ready: Callable[[], Any]) -> Any:
        deadline = time.monotonic() + 240
        while not self.done.is_set() and time.monotonic() < deadline:
            value = ready()
            if value:
                return value
            time.sleep(0.02)  # polling the records a trial writes
        raise TimeoutError(f"never saw {what}")

    def _kill(self, trial: Path, start: int, **facts: Any) -> None:
        pid = read_starts(trial)[start]["pid"]
        assert pid != os.getpid()
        alive = True
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            alive = False
        self.kills.append(
            {"trial": trial.name, "start": start, "pid": pid, "alive": alive, **facts}
        )

    def _starts(self, which: tuple[float, int], n: int) -> Path | None:
        trial = _trial(self.records, which)
        return trial if trial is not None and len(read_starts(trial)) >= n else None

    def _checkpoints(self, trial: Path) -> list[int]:
        found = self.tune.glob(f"trial_{trial.name}/checkpoint_*/meta.json")
        return sorted(int(p.parent.name.removeprefix("checkpoint_")) for p in found)

    def run(self) -> None:
        try:
            for start in (0, 1):  # the failing trial: every start it gets
                trial = self._wait(
                    f"start {start} of {FAILS}", lambda n=start: self._starts(FAILS, n + 1)
                )
                self._kill(trial, start)
            trial = self._wait("the killed-once trial", lambda: self._starts(KILLED_ONCE, 1))
            # its second checkpoint in storage: its first one is registered with Tune by then
            self._wait("its 2nd checkpoint", lambda: len(self._checkpoints(trial)) >= 2)
            self._kill(trial, 0, checkpoints=self._checkpoints(trial))
        except BaseException as e:  # reported by the test
            self.error = e


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("retry")
    env = make_env(
        root,
        run="retry",
        schedule={"early_stopping_patience": 4},
        space=SPACE,
        samples=1,
        max_epochs=MAX_EPOCHS,
        grace_period=2,
        max_concurrent=1,
        max_failures=1,
    )
    storage = root / "storage"
    sweep_dir = storage / "runs" / "retry" / "sweep"
    killer = Killer(sweep_dir / "trials", sweep_dir / "tune")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STKD_DASK", "threads")  # see test_sweep_ray
        ray.init(num_cpus=2, include_dashboard=False)
        try:
            killer.start()
            outcome = run_sweep(
                env.config,
                checkpoint=str(env.teacher),
                storage=storage,
                ui=LinesUI(),
            )
            killer.done.set()
            killer.join(timeout=30)
            yield {"outcome": outcome, "killer": killer, "env": env}
        finally:
            killer.done.set()
            ray.shutdown()


def _by_params(outcome: SweepOutcome) -> dict[tuple[float, int], dict[str, Any]]:
    """Each trial's summary record (and its records folder, ``dir``) by ``(lr, patience)``."""
    records = {r["trial_id"]: r for r in outcome.summary["trial_records"]}
    out = {}
    for which in TRIALS:
        trial = _trial(outcome.layout.trials, which)
        assert trial is not None, which
        out[which] = {"dir": trial, **records[trial.name]}
    return out


def _progress(outcome: SweepOutcome, trial: str) -> pd.DataFrame:
    return pd.read_csv(outcome.layout.tune / f"trial_{trial}" / "progress.csv")


def test_the_kills_happened(swept: dict[str, Any]) -> None:
    killer: Killer = swept["killer"]
    assert killer.error is None, repr(killer.error)
    assert len(killer.kills) == 3 and all(k["alive"] for k in killer.kills), killer.kills


def test_each_trial_stops_for_its_own_reason(swept: dict[str, Any]) -> None:
    outcome: SweepOutcome = swept["outcome"]
    summary = outcome.summary
    assert summary["stop_reasons"] == {
        "completed": 1,
        "early_stopping": 1,
        "scheduler": 1,
        "failed": 1,
    }
    trials = _by_params(outcome)
    first_starts = [read_starts(trials[which]["dir"])[0]["time"] for which in TRIALS]
    assert first_starts == sorted(first_starts)  # one at a time, in the order of the docstring
    assert [trials[which]["stop_reason"] for which in TRIALS] == [
        "failed",
        "early_stopping",
        "scheduler",
        "completed",
    ]
    # the evidence besides the summary: what Tune recorded of each trial, and the trials' records
    frozen = _progress(outcome, trials[EARLY]["trial_id"])
    assert list(frozen["epochs_done"]) == [1, 2, 3, 4, 5] and frozen["stopped_early"].iloc[-1]
    assert frozen["val_mae"].nunique() == 1  # it never moved: the patience ran out
    own = json.loads((trials[EARLY]["dir"] / STOP).read_text())
    assert own["reason"] == "early_stopping" and own["epochs_done"] == 5

    stopped = _progress(outcome, trials[STOPPED]["trial_id"])
    assert list(stopped["epochs_done"]) == [1, 2] and not stopped["stopped_early"].any()
    assert not (trials[STOPPED]["dir"] / STOP).exists()
    by_asha = json.loads((trials[STOPPED]["dir"] / SCHEDULER_STOP).read_text())
    assert by_asha == {**by_asha, "scheduler": "asha", "epochs_done": 2}
    assert summary["scheduler"]["stopped"] == [trials[STOPPED]["trial_id"]]

    done = _progress(outcome, trials[KILLED_ONCE]["trial_id"])
    assert done["epochs_done"].max() == MAX_EPOCHS and not done["stopped_early"].any()
    assert json.loads((trials[KILLED_ONCE]["dir"] / STOP).read_text())["reason"] == "completed"


def test_a_crashed_trial_retries_from_its_latest_checkpoint(swept: dict[str, Any]) -> None:
    outcome: SweepOutcome = swept["outcome"]
    killer: Killer = swept["killer"]
    trial = _by_params(outcome)[KILLED_ONCE]
    kill = next(k for k in killer.kills if k["trial"] == trial["trial_id"])
    first, second = read_starts(trial["dir"])
    assert first["after_epoch"] == -1 and first["pid"] == kill["pid"]
    # a new process, continuing from the trial's own checkpoint of the latest epoch Tune had
    assert second["pid"] != kill["pid"] and second["attempt"] == 1
    restored = second["restored_from"]
    assert restored["trial"] == trial["trial_id"]
    assert Path(restored["checkpoint"]).parent.name == f"trial_{trial['trial_id']}"
    assert restored["epochs_done"] == second["after_epoch"] + 1
    assert second["after_epoch"] >= max(kill["checkpoints"]) - 1 >= 0
    # every epoch was trained, the ones after the checkpoint by the new process
    progress = _progress(outcome, trial["trial_id"])
    assert set(progress["epoch"]) == set(range(MAX_EPOCHS))
    assert set(progress.loc[progress["pid"] == second["pid"], "epoch"]) == set(
        range(second["after_epoch"] + 1, MAX_EPOCHS)
    )
    assert trial["workers"] == second["workers"] and trial["workers"][0]["pid"] == second["pid"]
    assert [s["restored_from"] for s in trial["starts"]] == [None, trial["trial_id"]]


def test_a_trial_failing_too_often_is_failed_and_the_others_go_on(swept: dict[str, Any]) -> None:
    outcome: SweepOutcome = swept["outcome"]
    killer: Killer = swept["killer"]
    trials = _by_params(outcome)
    failed = trials[FAILS]
    starts = read_starts(failed["dir"])
    assert len(starts) == 2  # its start and its one retry (sweep.max_failures: 1), both killed
    assert [s["pid"] for s in starts] == [
        k["pid"] for k in killer.kills if k["trial"] == failed["trial_id"]
    ]
    assert outcome.summary["errored"] == 1 and outcome.summary["max_failures"] == 1
    # the trials after it started once it had failed, and finished
    last_failure = starts[-1]["time"]
    for which in (EARLY, STOPPED, KILLED_ONCE):
        assert read_starts(trials[which]["dir"])[0]["time"] > last_failure
    board = read_board(outcome.layout.leaderboard)[0]
    assert set(board["trial"]) >= {trials[which]["trial_id"] for which in (EARLY, KILLED_ONCE)}
