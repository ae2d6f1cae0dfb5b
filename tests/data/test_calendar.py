"""Weekdays per split (stkd_dist.data.calendar), against hand-counted cases."""

from __future__ import annotations

import pandas as pd

from stkd_dist.data.calendar import split_weekdays, unseen_weekdays, weekday_names
from stkd_dist.data.windows import SplitSpec


def test_a_week_of_five_minute_steps_leaves_thursday_and_friday_out_of_training() -> None:
    # 2000-01-01 is a Saturday; 2016 steps = 7 days. Train: steps [0, 1411) = Sat 00:00 to
    # Wed 21:30; val [1411, 1613) = Wed 21:35 to Thu 14:20; test [1613, 2016) = Thu to Fri.
    time = pd.date_range("2000-01-01", periods=2016, freq="5min")
    held = split_weekdays(time, SplitSpec(0.7, 0.1, 0.2))
    assert held == {
        "train": frozenset({5, 6, 0, 1, 2}),
        "val": frozenset({2, 3}),
        "test": frozenset({3, 4}),
    }
    assert unseen_weekdays(time, SplitSpec(0.7, 0.1, 0.2)) == [3, 4]
    assert weekday_names(held["train"]) == "Mon, Tue, Wed, Sat, Sun"


def test_two_weeks_hold_every_weekday_in_training() -> None:
    time = pd.date_range("2016-07-01", periods=14 * 24, freq="1h")
    assert unseen_weekdays(time, SplitSpec(0.7, 0.1, 0.2)) == []
