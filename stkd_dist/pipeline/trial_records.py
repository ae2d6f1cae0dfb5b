"""The records a sweep's trials keep of themselves: ``<sweep>/trials/<trial id>/``.

Tune's own trial folders are not used for them: a trial writes to a working copy that Tune
syncs only at times of its choosing, and a record must be there when the driver reads it.

* ``starts.jsonl``: one line per start of the trial (first start, restart after a crash, resume,
  PBT exploit or pause), written by the trial before it trains: the epoch it continues after,
  the checkpoint it loaded (``restored_from``: its path, the trial that wrote it, its epoch and a
  digest of the weights loaded from it), the settings it trains with, and ``workers``: one
  ``{rank, pid, node_id}`` per worker process (a one-process trial: rank 0 only, its own
  process; a data-parallel trial: one per rank of its Ray Train run).
* ``stop.json``: written by the trial when it ends itself, before its last report (a scheduler
  may stop it at that report): ``reason`` ``completed`` (it ran ``sweep.max_epochs``) or
  ``early_stopping`` (its ``student.schedule.early_stopping_patience`` ran out). Each start
  removes an earlier one: a trial restarted after it was written goes on training.
* ``scheduler_stop.json``: written by the driver when ASHA stops the trial at a rung.

:func:`stop_reason` turns these into the trial's stop reason (``completed``, ``early_stopping``,
``scheduler`` or ``failed``), :func:`trial_summary` into its entry of ``summary.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping
from typing import Any, Literal

import torch

from stkd_dist.location import (
    Location,
    append_text,
    exists,
    location,
    read_json,
    read_text,
    remove,
    write_json_atomic,
)

#: experiment name stored in the trials' checkpoints
ROLE = "student_sweep"
#: the metric ASHA counts its rungs in (1-based epochs, stable across restores)
TIME_ATTR = "epochs_done"
#: Tune's folder of a trial is ``trial_<trial id>`` (see ``sweep_tuner.trial_dirname``)
TRIAL_DIR_PREFIX = "trial_"
STARTS = "starts.jsonl"
STOP = "stop.json"
SCHEDULER_STOP = "scheduler_stop.json"

StopReason = Literal["completed", "early_stopping", "scheduler", "failed", "unknown"]
#: the reasons a trial ends, in the order ``summary.json`` counts them (``unknown``: a finished
#: trial without any record of why, which only a record lost with its storage can cause)
STOP_REASONS: tuple[str, ...] = ("completed", "early_stopping", "scheduler", "failed", "unknown")


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over a state dict's names, dtypes, shapes and values: equal iff every tensor is."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        # viewed as bytes: any dtype (bfloat16 too) hashes its exact bits
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def log_start(trial_dir: Location, record: Mapping[str, Any]) -> None:
    """Append one start of the trial (``time`` added) and drop a stop record of an earlier one."""
    remove(trial_dir / STOP)
    append_text(trial_dir / STARTS, json.dumps({"time": time.time(), **record}) + "\n")


def read_starts(trial_dir: str | os.PathLike[str] | Location) -> list[dict[str, Any]]:
    """The starts of a trial (``after_epoch`` -1 = from scratch), oldest first."""
    path = location(trial_dir) / STARTS
    if not exists(path):
        return []
    return [json.loads(line) for line in read_text(path).splitlines() if line]


def write_stop(trial_dir: Location, reason: StopReason, epochs_done: int) -> None:
    """Record that the trial ends itself after ``epochs_done`` epochs, for ``reason``."""
    record = {"reason": reason, "epochs_done": epochs_done, "time": time.time()}
    write_json_atomic(trial_dir / STOP, {**record, "pid": os.getpid()})


def write_scheduler_stop(trial_dir: Location, scheduler: str, epochs_done: int) -> None:
    """Record (on the driver) that ``scheduler`` stopped the trial after ``epochs_done`` epochs."""
    record = {"scheduler": scheduler, "epochs_done": epochs_done, "time": time.time()}
    write_json_atomic(trial_dir / SCHEDULER_STOP, record)


def _read(path: Location) -> dict[str, Any] | None:
    return read_json(path) if exists(path) else None


def stop_reason(
    failed: bool, own: Mapping[str, Any] | None, scheduler: Mapping[str, Any] | None
) -> StopReason:
    """Why a trial ended, from its records.

    An error (after ``sweep.max_failures`` restarts) wins; then the trial's own ``stop.json``
    (written before its last report, so a scheduler acting on that same report did not cut the
    trial short); then the scheduler's record.
    """
    if failed:
        return "failed"
    if own is not None:
        return own["reason"]
    if scheduler is not None:
        return "scheduler"
    return "unknown"


def source_trial(restored_from: Mapping[str, Any] | None) -> str | None:
    """The trial whose checkpoint a start loaded (None: a start from scratch)."""
    return None if restored_from is None else restored_from.get("trial")


def trial_summary(
    trial_id: str, trial_dir: Location, failed: bool, epochs_done: int | None
) -> dict[str, Any]:
    """The trial's entry of ``summary.json``: why it stopped and the processes that ran it.

    ``epochs_done`` is the epoch count of the trial's last result (used when no record of the
    trial's end says it). ``workers`` are those of the trial's latest start (the processes that ran it to its end;
    ``starts`` has every start's); ``exploits`` the starts that continued from another trial's
    checkpoint (PBT).
    """
    starts = read_starts(trial_dir)
    own, by_scheduler = _read(trial_dir / STOP), _read(trial_dir / SCHEDULER_STOP)
    exploits = [
        {
            "trial": trial_id,
            "donor": source_trial(s.get("restored_from")),
            "epoch": s["restored_from"].get("epochs_done"),
            "checkpoint": s["restored_from"].get("checkpoint"),
            "params": s.get("params", {}),
        }
        for s in starts
        if source_trial(s.get("restored_from")) not in (None, trial_id)
    ]
    return {
        "trial_id": trial_id,
        "stop_reason": stop_reason(failed, own, by_scheduler),
        # the trial's own records first: a result may be another trial's (see trial_id_of)
        "epochs_done": (own or by_scheduler or {}).get("epochs_done", epochs_done),
        "workers": starts[-1].get("workers", []) if starts else [],
        "starts": [
            {
                "after_epoch": s.get("after_epoch"),
                "attempt": s.get("attempt"),
                "restored_from": source_trial(s.get("restored_from")),
                "workers": s.get("workers", []),
            }
            for s in starts
        ],
        "exploits": exploits,
    }
