"""A sweep whose driver is killed resumes with the same run name (``stkd sweep`` subprocesses).

The first ``stkd sweep`` runs one trial at a time; once the first trial has finished (the second
one has started) its driver gets SIGKILL. Running the same command again restores the Tune
experiment from ``<run>/sweep/tune``: the finished trial is kept as it is, the others are run or
continued, and the sweep completes.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from stkd_dist.pipeline.tune_trial import read_starts
from stkd_dist.serving.cache import LabelCache
from tests.pipeline.sweep_env import make_env, read_board

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def _sweep(storage: Path, config: Path, teacher: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        # snapshot the experiment state at every step, so that a kill loses no finished trial
        # (Tune's default is every 10 s or more)
        "TUNE_GLOBAL_CHECKPOINT_S": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONPATH": str(REPO),
    }
    cmd = [sys.executable, "-m", "stkd_dist.cli", "--storage", str(storage), "sweep"]
    cmd += ["--config", str(config), "--checkpoint", str(teacher)]
    with open(log, "ab") as out:
        # a session of its own: the driver and the Ray cluster it starts can be ended together
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True
        )


def _end_group(proc: subprocess.Popen[bytes]) -> None:
    """Kill what is left of a sweep subprocess's session (its Ray cluster)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _started(records: Path) -> list[Path]:
    """Trials that started, in order of their first start."""
    found = [d for d in records.glob("*") if (d / "starts.jsonl").is_file()]
    return sorted(found, key=lambda d: read_starts(d)[0]["time"])


def _state_saved(tune_dir: Path, started: list[Path]) -> bool:
    """Whether Tune's newest saved state knows every started trial, in both of its files.

    Tune uploads the trial list and its searcher's state one after the other; a driver killed
    between them leaves parts that disagree (a trial the searcher made but the trial list lacks
    is lost on restore). The test kills only once both know every started trial: the list
    names each, and the searcher counts the newest among its live trials (or is finished).
    """
    try:
        state = max(tune_dir.glob("experiment_state-*.json"), key=lambda p: p.stat().st_mtime)
        searcher = max(tune_dir.glob("basic-variant-state-*.json"), key=lambda p: p.stat().st_mtime)
        listed = {json.loads(t[0])["trial_id"] for t in json.loads(state.read_text())["trial_data"]}
        with searcher.open("rb") as f:
            made = pickle.load(f)
    except (ValueError, OSError, EOFError, pickle.UnpicklingError):
        return False  # not there yet, or caught mid-copy
    newest = started[-1].name
    return {d.name for d in started} <= listed and (
        made["_finished"] or newest in made["_live_trials"]
    )


def _epochs(progress: Path) -> list[int] | None:
    """The epochs in a trial's Tune ``progress.csv`` in storage, or None while it has none."""
    try:
        return [int(e) for e in pd.read_csv(progress)["epoch"]]
    except (OSError, pd.errors.EmptyDataError, KeyError):
        return None


def test_killed_sweep_resumes_and_keeps_finished_trials(tmp_path: Path) -> None:
    env = make_env(tmp_path, run="resume", samples=2, max_epochs=2, max_concurrent=1)
    storage, log = tmp_path / "storage", tmp_path / "sweep.log"
    config = tmp_path / "sweep.yaml"
    sweep_dir = storage / "runs" / "resume" / "sweep"
    records, tune = sweep_dir / "trials", sweep_dir / "tune"

    first = _sweep(storage, config, env.teacher, log)
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and len(_started(records)) < 2:
            assert first.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        assert len(_started(records)) >= 2, log.read_text()[-3000:]
        while time.monotonic() < deadline and not _state_saved(tune, _started(records)):
            assert first.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        assert _state_saved(tune, _started(records)), log.read_text()[-3000:]
        # Tune's own record of the finished trial's epochs: the driver uploads it with the rest
        # of its experiment at a save, not necessarily the save that listed the second trial
        done = _started(records)[0]
        progress = tune / f"trial_{done.name}" / "progress.csv"
        while time.monotonic() < deadline and _epochs(progress) != [0, 1]:
            assert first.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        assert _epochs(progress) == [0, 1], log.read_text()[-3000:]
        os.kill(first.pid, signal.SIGKILL)  # the driver only, mid-sweep
        first.wait(timeout=30)
    finally:
        _end_group(first)
    assert first.returncode == -signal.SIGKILL
    assert not (sweep_dir / "leaderboard.csv").exists()
    assert _started(records)[0] == done
    done_starts = read_starts(done)
    # whole after the kill, though the driver re-uploads it at every save (location.whole_files)
    assert _epochs(progress) == [0, 1]
    done_progress = progress.read_bytes()
    # the windows the killed sweep's replica wrote through to the run's label cache
    (cache_path,) = (storage / "runs" / "resume" / "labels").glob("*.zarr")
    cached_before = LabelCache(cache_path).filled_windows("train")

    second = _sweep(storage, config, env.teacher, log)
    try:
        rc = second.wait(timeout=240)
    finally:
        _end_group(second)
    output = log.read_text()
    assert rc == 0, output[-3000:]
    assert "resuming sweep 'resume'" in output

    board = read_board(sweep_dir / "leaderboard.csv")[0]
    assert len(board) == 2, output[-3000:]
    assert set(board["trial"]) == {d.name for d in _started(records)}
    # the trial that had finished was not run again: no new start, no new epoch
    assert read_starts(done) == done_starts
    assert progress.read_bytes() == done_progress  # Tune logged no result of it after the kill
    for trial in _started(records):
        starts = read_starts(trial)
        assert starts[0]["after_epoch"] == -1 and len(starts) <= 2
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert summary["resumed"] and summary["trials"] == 2
    # the resumed sweep's replica served what the killed one had cached and computed only the
    # rest: over both runs, the teacher computed each training window once
    labels = summary["labels"]
    assert labels["mode"] == "stream" and cached_before > 0
    assert labels["replica_forward_windows"] == labels["distinct_windows"] - cached_before
    assert LabelCache(cache_path).is_complete("train")
    assert (sweep_dir / "best" / "meta.json").is_file()
