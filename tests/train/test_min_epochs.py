"""Early stopping waits for ``min_epochs``: the patience in force per epoch."""

from __future__ import annotations

from stkd_dist.checkpoint import TrainState
from stkd_dist.config import ScheduleSection


def test_patience_is_off_before_min_epochs() -> None:
    sched = ScheduleSection(epochs=20, early_stopping_patience=2, min_epochs=6)
    assert [sched.patience_at(e) for e in range(7)] == [0, 0, 0, 0, 0, 2, 2]
    assert ScheduleSection(early_stopping_patience=3).patience_at(0) == 3  # min_epochs 0


def test_no_progress_stops_at_min_epochs_not_before() -> None:
    sched = ScheduleSection(epochs=20, early_stopping_patience=1, min_epochs=4)
    state = TrainState()
    maes = [5.0, 6.0, 6.0, 6.0, 6.0, 6.0]  # best at epoch 0, no progress after it
    stopped_after = None
    for epoch, mae in enumerate(maes):
        state.end_epoch(epoch, mae, 10, sched.patience_at(epoch))
        if state.stopped_early:
            stopped_after = epoch
            break
    # patience 1 alone would stop after epoch 1; min_epochs 4 keeps it going to epoch 3
    assert stopped_after == 3
