"""``stkd distill`` killed twice, as when the driver's node dies, then run again to completion.

The driver (``stkd distill`` in a session of its own, with the local Ray cluster it starts, its
Ray Train workers and its teacher replicas) gets SIGKILL for its whole process group once inside
the teacher's second epoch and once inside the distilled student's training, each time right
after Ray registered a mid-epoch checkpoint. The same command then resumes each stage from its
latest checkpoint: the result is the same, to the last digit, as an uninterrupted run's.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from stkd_dist.testing import registered
from tests.pipeline.test_distill import stkd, write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.long]

RUN = "kd"
MARKER = "epoch_0001_step_"  # a mid-epoch checkpoint of the stage's second epoch
# timings differ between any two runs; everything else in metrics.json must not
TIMING = ("latency_ms",)


def _start(storage: Path, config: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "STKD_STORAGE": str(storage), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "stkd_dist.cli", "distill", "--config", str(config)]
    with open(log, "ab") as out:
        # a session of its own: the driver and every process it started die together
        return subprocess.Popen(
            [*cmd, "--run-name", RUN],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def _kill_tree_when_registered(proc: subprocess.Popen[bytes], experiment: Path, log: Path) -> None:
    deadline = time.monotonic() + 300
    while not registered(experiment, MARKER):
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def _accuracy(metrics: dict) -> dict:
    return {
        name: {k: v for k, v in entry.items() if k not in TIMING}
        for name, entry in metrics.items()
        if isinstance(entry, dict)
    }


def test_distill_killed_in_the_teacher_and_in_the_student_resumes_to_the_same_result(
    tmp_path: Path,
) -> None:
    from tests.conftest import random_store

    store = random_store(tmp_path / "tiny.zarr", steps=600, nodes=6, chunk_steps=64)
    config = write_config(tmp_path / "tiny.yaml", store)
    cfg = yaml.safe_load(config.read_text())
    cfg["checkpoint"] = {"every_steps": 4}  # 13 steps an epoch: after steps 4, 8 and 12
    config.write_text(yaml.safe_dump(cfg))

    calm = stkd(tmp_path / "calm", "distill", "--config", str(config), "--run-name", RUN)
    assert calm.returncode == 0, calm.stdout[-3000:] + calm.stderr[-3000:]

    storage, log = tmp_path / "storage", tmp_path / "distill.log"
    run = storage / "runs" / RUN
    procs = []
    try:
        for stage in ("teacher", "student_kd"):
            procs.append(_start(storage, config, log))
            _kill_tree_when_registered(procs[-1], run / stage, log)
            assert not (run / "metrics.json").exists()
        procs.append(_start(storage, config, log))
        assert procs[-1].wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
    # each killed stage was continued at the step of its mid-epoch checkpoint
    for stage in ("teacher", "student_kd"):
        status = json.loads((run / stage / "workers" / "rank-0.json").read_text())
        assert status["resumed_after_epoch"] == 0 and status["resumed_at_step"] > 0, stage
    # the same, paths under the two storage roots aside
    got = json.loads((run / "metrics.json").read_text().replace(str(storage), "<storage>"))
    calm_metrics = tmp_path / "calm" / "runs" / RUN / "metrics.json"
    want = json.loads(calm_metrics.read_text().replace(str(tmp_path / "calm"), "<storage>"))
    assert _accuracy(got) == _accuracy(want)
    assert got["student_kd"]["mae"] == want["student_kd"]["mae"]
