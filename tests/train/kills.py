"""Killing training workers in tests: find a rank's process, wait for Ray to register a
checkpoint, then SIGKILL it (as when its node dies)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import torch

from stkd_dist.checkpoint import list_checkpoints, load_checkpoint_state


def worker_pids(experiment: Path, since: float) -> list[int]:
    """PIDs of the live training workers of the current worker group, from their status files."""
    pids = []
    for f in sorted((experiment / "workers").glob("rank-*.json")):
        try:
            status = json.loads(f.read_text())
            cmdline = Path(f"/proc/{status['pid']}/cmdline").read_bytes()
        except (OSError, ValueError, KeyError):
            continue
        if status["started"] >= since and b"RayTrainWorker" in cmdline:
            pids.append(int(status["pid"]))
    return pids


def kill_rank_after(
    experiment: Path, marker: str, rank: int, since: float
) -> tuple[list[int], threading.Thread]:
    """Kill training rank ``rank`` once Ray registered a checkpoint whose folder name starts
    with ``marker`` (it is in Ray's checkpoint manager snapshot, so a restart resumes from it)."""
    killed: list[int] = []
    snapshot = experiment / "checkpoint_manager_snapshot.json"

    def watch() -> None:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                registered = marker in snapshot.read_text()
            except OSError:
                registered = False
            if registered:
                pids = worker_pids(experiment, since)
                if len(pids) == 2:
                    killed.append(pids[rank])
                    os.kill(pids[rank], signal.SIGKILL)
                    return
            time.sleep(0.01)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return killed, thread


def last_weights(experiment: Path) -> dict[str, torch.Tensor]:
    """The weights of an experiment's newest checkpoint (an epoch's, never a mid-epoch one)."""
    latest = list_checkpoints(experiment)[-1]
    assert not latest.mid_epoch
    return load_checkpoint_state(latest.path)["model"]
