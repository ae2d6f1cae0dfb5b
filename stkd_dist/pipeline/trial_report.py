"""A sweep trial's side of Ray Tune: what it records of itself and what it reports each epoch.

One :class:`TrialReporter` per start of a trial, in the trial's Tune function. The epoch loop
(:func:`stkd_dist.train.worker.run_worker`) hands it every epoch's metrics and checkpoint,
either directly (a one-process trial, through ``TuneSession``) or forwarded from rank 0 of the
trial's Ray Train run (:mod:`.trial_train`). It

* logs the start in ``starts.jsonl`` (:mod:`.trial_records`) once the workers are known;
* adds :data:`~stkd_dist.pipeline.trial_records.TIME_ATTR` (epochs done, 1-based) to the
  metrics, the time unit of ASHA's rungs and PBT's perturbation interval;
* writes ``stop.json`` *before* the report of the trial's last epoch: a scheduler may stop
  the trial at that very report, and the trial would not get to say so afterwards;
* calls ``ray.tune.report`` with the checkpoint, which Tune copies into the trial's storage
  before the call returns (and keeps the best ``sweep.keep_best`` of, or all with PBT).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from stkd_dist.checkpoint import TrainState
from stkd_dist.location import Location
from stkd_dist.pipeline.trial_records import TIME_ATTR, log_start, write_stop
from stkd_dist.train.session import Restored

#: the loop's metrics that are not Tune's business (digests, Ray Train's checkpoint ranking)
_NOT_REPORTED = frozenset({"param_digest", "checkpoint_score", "version"})


def finite(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Metrics for strict JSON: non-finite floats become None."""
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v)
        for k, v in metrics.items()
    }


class TrialReporter:
    """Records and reports of one start of a trial.

    Args:
        trial_dir: the trial's records folder.
        trial_id: Tune's id of the trial.
        params: the trial's sampled settings (recorded with the start).
        epochs: the epochs the trial trains at most (``sweep.max_epochs``).
    """

    def __init__(
        self, trial_dir: Location, trial_id: str, params: Mapping[str, Any], epochs: int
    ) -> None:
        self.trial_dir = trial_dir
        self.trial_id = trial_id
        self.params = dict(params)
        self.epochs = epochs
        self.logged = False
        self.ended = False
        self.num_params: int | None = None

    def log_start(
        self,
        state: TrainState,
        restored: Restored,
        weights_sha256: str | None,
        workers: Sequence[Mapping[str, Any]],
    ) -> None:
        """Append this start to ``starts.jsonl``: the epoch it continues after, the checkpoint
        it loaded (whose it is, its epoch, a digest of the weights loaded from it), the
        settings and the worker processes."""
        restored_from = None
        if restored.path is not None and restored.info is not None:
            restored_from = {
                "checkpoint": restored.path,
                "trial": restored.lineage,
                "epochs_done": restored.info.epoch + 1,
                # of the weights now in the model: what the trial continues from
                "weights_sha256": weights_sha256,
            }
        log_start(
            self.trial_dir,
            {
                "pid": os.getpid(),  # the trial's Tune function
                "after_epoch": state.epoch,
                "attempt": state.attempt,
                "restored_from": restored_from,
                "params": self.params,
                "workers": [dict(w) for w in workers],
            },
        )
        self.logged = True

    def report_epoch(self, metrics: Mapping[str, Any], checkpoint: Any) -> None:
        """Report one epoch's ``metrics`` (rank 0's) with its checkpoint (a Ray Train or Tune
        ``Checkpoint``: a folder and its filesystem)."""
        from ray import tune

        epoch = int(metrics["epoch"])
        out = {k: v for k, v in metrics.items() if k not in _NOT_REPORTED}
        out[TIME_ATTR] = epoch + 1
        if self.num_params is not None:
            out["params"] = self.num_params
        if epoch == self.epochs - 1 or metrics.get("stopped_early"):
            last = epoch == self.epochs - 1
            write_stop(self.trial_dir, "completed" if last else "early_stopping", epoch + 1)
            self.ended = True
        if checkpoint is not None and not isinstance(checkpoint, tune.Checkpoint):
            checkpoint = tune.Checkpoint(checkpoint.path, checkpoint.filesystem)
        tune.report(out, checkpoint=checkpoint)

    def finish(self, state: TrainState) -> None:
        """After the loop: record the end of a start that had nothing left to train (restored
        at its end, or after early stopping), which reported no last epoch of its own."""
        if self.ended:
            return
        done = state.epoch + 1
        run_out = state.stopped_early and done < self.epochs
        write_stop(self.trial_dir, "early_stopping" if run_out else "completed", done)


__all__ = ["TrialReporter", "finite"]
